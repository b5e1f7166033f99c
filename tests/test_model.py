"""Config, state-dict layout, MoE lowerings and RoPE modes of the reference model."""


import pytest
import torch

from hidream_export.model import PRESETS, HiDreamTransformer, TransformerConfig
from hidream_export.model.embeddings import RopeTables
from hidream_export.model.moe import MoEFeedForward
from hidream_export.moe import ort_moe  # noqa: F401  (defines torch.ops.ort.MoE, which the `ort` lowering calls)


# ---- config ----------------------------------------------------------------------------------

def test_from_dict_reads_real_config_and_ignores_unknown_keys():
    real = {
        "_class_name": "HiDreamImageTransformer2DModel", "_diffusers_version": "0.32.0.dev0",
        "attention_head_dim": 128, "axes_dims_rope": [64, 32, 32], "caption_channels": [4096, 4096],
        "force_inference_output": False, "in_channels": 16, "llama_layers": list(range(32)) + [31] * 16,
        "max_resolution": [128, 128], "num_activated_experts": 2, "num_attention_heads": 20,
        "num_layers": 16, "num_routed_experts": 4, "num_single_layers": 32, "out_channels": 16,
        "patch_size": 2, "text_emb_dim": 2048,
    }
    assert TransformerConfig.from_dict(real) == PRESETS["real"]


@pytest.mark.parametrize("change,needle", [
    ({"axes_dims_rope": [64, 32, 16]}, "must sum to attention_head_dim=128, got sum([64, 32, 16]) = 112"),
    ({"num_activated_experts": 5}, "num_activated_experts must be in 1..num_routed_experts=4, got 5"),
    ({"llama_layers": [0, 1]}, "one entry per block: num_layers + num_single_layers = 16 + 32 = 48, got 2"),
    ({"axes_dims_rope": [63, 33, 32]}, "positive and even"),
    ({"patch_size": 0}, "patch_size must be an integer in 1..4096, got 0"),
    # Types and bounds come before anything is built: a float, a bool or a huge depth is refused at once.
    ({"num_layers": 2.0}, "num_layers must be an integer in 0..1024, got 2.0"),
    ({"num_layers": True}, "num_layers must be an integer in 0..1024, got True"),
    ({"num_layers": 10_000_000}, "num_layers must be an integer in 0..1024, got 10000000"),
    ({"caption_channels": [4096, "4096"]}, "caption_channels must be a list of integers"),
])
def test_validation_names_the_numbers(change, needle):
    data = {**PRESETS["real"].to_dict(), **change}
    with pytest.raises(ValueError) as exc:
        TransformerConfig.from_dict(data)
    assert needle in str(exc.value)


def test_presets_sizes():
    assert PRESETS["real"].parameter_counts()["total"] == 17_105_733_184
    assert 100e6 < PRESETS["small"].parameter_counts()["total"] < 1e9
    assert PRESETS["tiny"].parameter_counts()["total"] < 1e6


# ---- state-dict layout -----------------------------------------------------------------------------

def test_real_preset_keys_match_diffusers_and_spec():
    import diffusers
    cfg = PRESETS["real"]
    with torch.device("meta"):
        ours = HiDreamTransformer(cfg)
        ref = diffusers.HiDreamImageTransformer2DModel(
            **{k: v for k, v in cfg.to_dict().items() if not k.startswith("_")})
    ours_sd = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_sd = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert len(ours_sd) == 1615
    assert ours_sd == ref_sd
    # A few rows of the spec's key table, as an oracle independent of diffusers.
    spec = {
        "double_stream_blocks.0.block.adaLN_modulation.1.weight": (30720, 2560),
        "double_stream_blocks.15.block.ff_i.experts.3.w2.weight": (2560, 6912),
        "double_stream_blocks.0.block.ff_i.shared_experts.w1.weight": (3584, 2560),
        "double_stream_blocks.0.block.ff_i.gate.weight": (4, 2560),
        "single_stream_blocks.31.block.adaLN_modulation.1.weight": (15360, 2560),
        "single_stream_blocks.0.block.attn1.k_rms_norm.weight": (2560,),
        "final_layer.adaLN_modulation.1.weight": (5120, 2560),
        "final_layer.linear.weight": (64, 2560),
        "caption_projection.48.linear.weight": (2560, 4096),
        "x_embedder.proj.weight": (2560, 64),
        "t_embedder.timestep_embedder.linear_1.weight": (2560, 256),
        "p_embedder.pooled_embedder.linear_1.weight": (2560, 2048),
    }
    for key, shape in spec.items():
        assert ours_sd[key] == shape, key


# ---- MoE lowerings -----------------------------------------------------------------------------------

def _moe(num_experts=4, top_k=2, dim=32, seed=0):
    torch.manual_seed(seed)
    moe = MoEFeedForward(dim, 64, 32, num_experts, top_k)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    return moe


def _official_moe_infer(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """The official `moe_infer` algorithm (argsort + host-side counts + scatter_reduce), as the oracle."""
    flat = x.reshape(-1, x.shape[-1])
    idx, w = moe.gate(flat)
    flat_idx, flat_w = idx.view(-1), w.view(-1, 1)
    cache = torch.zeros_like(flat)
    order = flat_idx.argsort()
    counts = flat_idx.bincount(minlength=moe.num_experts).cpu().numpy().cumsum(0)
    token_idx = order // moe.top_k
    for e, end in enumerate(counts):
        start = 0 if e == 0 else counts[e - 1]
        if start == end:
            continue
        rows = token_idx[start:end]
        out = moe.experts[e](flat[rows]) * flat_w[order[start:end]]
        cache.scatter_reduce_(0, rows.view(-1, 1).repeat(1, flat.shape[-1]), out, reduce="sum")
    return cache.view(x.shape) + moe.shared_experts(x)


@pytest.mark.parametrize("num_experts,top_k", [(4, 2), (2, 1), (2, 2), (4, 1)])
@pytest.mark.parametrize("routing", ["random", "one_expert_gets_all", "one_expert_gets_none"])
def test_moe_lowerings_agree_with_official_algorithm(num_experts, top_k, routing):
    moe = _moe(num_experts, top_k)
    x = torch.randn(2, 37, 32)
    if routing != "random":
        with torch.no_grad():
            # Make the routing deterministic by biasing the gate through a constant input feature.
            x[..., 0] = 50.0
            moe.gate.weight.zero_()
            favoured = 1 if routing == "one_expert_gets_all" else 0
            moe.gate.weight[:, 0] = torch.linspace(-1, 1, num_experts)
            if routing == "one_expert_gets_all":
                moe.gate.weight[favoured, 0] = 2.0
    idx, _ = moe.gate(x.reshape(-1, 32))
    counts = torch.bincount(idx.flatten(), minlength=num_experts)
    if routing == "one_expert_gets_all":
        assert counts[1] == x.shape[0] * x.shape[1]
    if routing == "one_expert_gets_none" and top_k < num_experts:
        assert (counts == 0).any()
    with torch.no_grad():
        expected = _official_moe_infer(moe, x)
        for lowering in ("reference", "dense", "gather", "ort"):  # ort: torch.ops.ort.MoE's own maths
            moe.lowering = lowering
            got = moe(x)
            assert (got - expected).abs().max() <= 1e-5 * expected.abs().max(), lowering


def test_reference_lowering_is_bit_exact_to_official_algorithm():
    moe = _moe()
    x = torch.randn(3, 11, 32)
    with torch.no_grad():
        moe.lowering = "reference"
        got, expected = moe(x), _official_moe_infer(moe, x)
    # Same per-row products and the same ascending-expert additions: only GEMM blocking can differ.
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_lowering_switch_and_validation():
    model = HiDreamTransformer("tiny", moe_lowering="dense")
    assert model.moe_lowering == "dense"
    model.set_moe_lowering("gather")
    assert {m.lowering for m in model.modules() if isinstance(m, MoEFeedForward)} == {"gather"}
    with pytest.raises(ValueError, match="moe_lowering must be one of"):
        model.set_moe_lowering("sparse")


# ---- RoPE ----------------------------------------------------------------------------------------

def test_rope_float32_tables_match_float64_everywhere_in_range():
    rope = RopeTables((64, 32, 32), max_positions=128)
    c64, s64 = rope(96, 128, torch.device("cpu"))
    rope.rope_dtype = "float32"
    c32, s32 = rope(96, 128, torch.device("cpu"))
    assert (c32 - c64).abs().max() <= 1e-6 and (s32 - s64).abs().max() <= 1e-6


def test_rope_matches_diffusers_table():
    import diffusers.models.transformers.transformer_hidream_image as emb
    rows, cols = 5, 7
    ids = torch.zeros(1, rows * cols, 3)
    ids[0, :, 1] = torch.arange(rows).repeat_interleave(cols).float()
    ids[0, :, 2] = torch.arange(cols).repeat(rows).float()
    table = emb.HiDreamImageEmbedND(theta=10000, axes_dim=[8, 4, 4])(ids)  # (1, L, 1, 8, 2, 2)
    cos, sin = RopeTables((8, 4, 4), 16)(rows, cols, torch.device("cpu"))
    assert torch.equal(table[0, :, 0, :, 0, 0], cos) and torch.equal(table[0, :, 0, :, 1, 0], sin)


# ---- export-friendliness -----------------------------------------------------------------------------

def test_forward_traces_with_dynamic_sizes_and_no_host_values():
    """torch.export fails on .item()/.tolist()/data-dependent Python branches; dynamic H, W and batch
    must stay symbolic (square vs non-square handled by arithmetic, not control flow)."""
    model = HiDreamTransformer("tiny", moe_lowering="dense", rope_dtype="float32").eval()
    cfg = model.config
    args = (torch.randn(2, 16, 16, 24), torch.tensor([10.0, 500.0]), torch.randn(2, 8, 32),
            torch.randn(3, 2, 8, 24), torch.randn(2, 32))
    Dim = torch.export.Dim
    b, h, w = Dim("b", min=1, max=4), Dim("h", min=1, max=16), Dim("w", min=1, max=16)
    shapes = ({0: b, 2: 2 * h, 3: 2 * w}, {0: b}, {0: b}, {1: b}, {0: b})
    program = torch.export.export(model, args, dynamic_shapes=shapes, strict=False)
    for bs, hh, ww in [(1, 8, 8), (3, 4, 30), (2, 32, 32)]:
        x = (torch.randn(bs, 16, hh, ww), torch.rand(bs) * 1000, torch.randn(bs, 8, 32),
             torch.randn(3, bs, 8, 24), torch.randn(bs, 32))
        with torch.no_grad():
            assert torch.allclose(program.module()(*x), model(*x), rtol=1e-5, atol=1e-6)
    assert cfg.max_seq == 256


def test_forward_rejects_bad_shapes():
    model = HiDreamTransformer("tiny").eval()
    ok = dict(hidden_states=torch.randn(1, 16, 8, 8), timesteps=torch.tensor([1.0]),
              encoder_hidden_states_t5=torch.randn(1, 4, 32), encoder_hidden_states_llama3=torch.randn(3, 1, 4, 24),
              pooled_embeds=torch.randn(1, 32))
    cases = {
        "hidden_states": (torch.randn(1, 16, 9, 8), "multiple of patch_size=2"),
        "encoder_hidden_states_llama3": (torch.randn(2, 1, 4, 24), "n_layers>=3"),
        "pooled_embeds": (torch.randn(1, 7), "pooled_embeds must have shape (1, 32)"),
    }
    for name, (bad, needle) in cases.items():
        with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            model(**{**ok, name: bad})
    with pytest.raises(ValueError, match="max_seq=256"):
        model(**{**ok, "hidden_states": torch.randn(1, 16, 32, 40)})

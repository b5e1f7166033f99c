"""The HiDream-I1 transformer (`HiDreamImageTransformer2DModel`), written for export.

Same arguments, layouts, state-dict keys and numbers as diffusers/official, with two structural
differences that keep one traced graph valid for every input:

1. Non-square padding without padding. The official model pads every non-square latent to `max_seq`
   image tokens and multiplies the padded KEYS by zero (not a real mask: their logits are 0, their values
   still count). All padded tokens start identical (the patch-embed bias, position (0,0,0)) and every
   operation treats them identically, so they stay identical through the network. We therefore carry ONE
   padding token and give its key a logit bias of log(n_pad): softmax then weighs it exactly like n_pad
   copies. For square latents n_pad = 0 and the bias is -inf, which removes it. The sequence length is
   N+1 for every size, square or not, and the square/non-square choice is arithmetic, not control flow.
2. MoE routing with no host sync (see moe.py), and RoPE without float64 on request (see embeddings.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import AttentionContext, BlockWrapper, DoubleStreamBlock, SingleStreamBlock
from .config import TransformerConfig, resolve_config
from .embeddings import FinalLayer, PatchEmbed, PooledEmbed, RopeTables, TextProjection, TimestepEmbed
from .moe import MoEFeedForward


class HiDreamTransformer(nn.Module):
    def __init__(self, config: TransformerConfig | str, moe_lowering: str = "reference",
                 rope_dtype: str = "float64", rope_max_positions: int | None = None):
        super().__init__()
        config = resolve_config(config)
        self.config = config
        D, p = config.inner_dim, config.patch_size
        patch_in, patch_out = p * p * config.in_channels, p * p * config.out_channels
        self.t_embedder = TimestepEmbed(D)
        self.p_embedder = PooledEmbed(config.text_emb_dim, D)
        self.x_embedder = PatchEmbed(patch_in, D)
        block_args = (D, config.num_attention_heads, config.num_routed_experts, config.num_activated_experts,
                      config.expert_hidden_dim, config.shared_expert_hidden_dim, moe_lowering)
        self.double_stream_blocks = nn.ModuleList(
            BlockWrapper(DoubleStreamBlock(*block_args)) for _ in range(config.num_layers))
        self.single_stream_blocks = nn.ModuleList(
            BlockWrapper(SingleStreamBlock(*block_args)) for _ in range(config.num_single_layers))
        self.final_layer = FinalLayer(D, patch_out)
        # One Llama projection per block, then the T5 projection last (checkpoint order).
        self.caption_projection = nn.ModuleList(
            [TextProjection(config.llama_dim, D) for _ in range(config.num_blocks)]
            + [TextProjection(config.t5_dim, D)])
        if rope_max_positions is None:
            # Twice the trained grid: square latents may exceed max_resolution (they are never padded).
            rope_max_positions = 2 * max(config.max_resolution) // p
        self.rope = RopeTables(config.axes_dims_rope, rope_max_positions, rope_dtype)

    # ---- switches ------------------------------------------------------------------------------
    @property
    def moe_lowering(self) -> str:
        return next((m.lowering for m in self.modules() if isinstance(m, MoEFeedForward)), "none")

    def set_moe_lowering(self, lowering: str) -> "HiDreamTransformer":
        for module in self.modules():
            if isinstance(module, MoEFeedForward):
                module.lowering = lowering
        return self

    @property
    def rope_dtype(self) -> str:
        return self.rope.rope_dtype

    def set_rope_dtype(self, rope_dtype: str) -> "HiDreamTransformer":
        self.rope.rope_dtype = rope_dtype
        return self

    # ---- input checks (Python shapes only; skipped while tracing) --------------------------------
    def check_inputs(self, hidden_states, timesteps, t5, llama, pooled) -> None:
        c = self.config
        if hidden_states.dim() != 4:
            raise ValueError(f"hidden_states must be (B, C, H, W), got shape {tuple(hidden_states.shape)}")
        B, C, H, W = hidden_states.shape
        if C != c.in_channels:
            raise ValueError(f"hidden_states has {C} channels, the model expects in_channels={c.in_channels}")
        if H % c.patch_size or W % c.patch_size:
            raise ValueError(f"latent size {H}x{W} must be a multiple of patch_size={c.patch_size}")
        rows, cols = H // c.patch_size, W // c.patch_size
        if H != W and rows * cols > c.max_seq:
            raise ValueError(
                f"non-square latent {H}x{W} has {rows * cols} patches; the model pads non-square inputs to "
                f"max_seq={c.max_seq} (max_resolution={list(c.max_resolution)}), so at most {c.max_seq} fit")
        if max(rows, cols) > self.rope.max_positions and self.rope_dtype == "float32":
            raise ValueError(
                f"latent {H}x{W} has {max(rows, cols)} patch positions per side; the float32 RoPE tables hold "
                f"{self.rope.max_positions} (raise rope_max_positions)")
        expect = {
            "timesteps": (timesteps, (B,)),
            "pooled_embeds": (pooled, (B, c.text_emb_dim)),
        }
        for name, (t, shape) in expect.items():
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t5.dim() != 3 or t5.shape[0] != B or t5.shape[2] != c.t5_dim:
            raise ValueError(f"encoder_hidden_states_t5 must be (B={B}, L, {c.t5_dim}), got {tuple(t5.shape)}")
        if (llama.dim() != 4 or llama.shape[0] < c.num_llama_layers or llama.shape[1] != B
                or llama.shape[3] != c.llama_dim):
            raise ValueError(
                f"encoder_hidden_states_llama3 must be (n_layers>={c.num_llama_layers}, B={B}, L, {c.llama_dim}), "
                f"got {tuple(llama.shape)}")

    # ---- forward ---------------------------------------------------------------------------------
    # The forward is three stages around the two block stacks. The export traces each stage and one block
    # of each kind on its own (hidream_export/export/blockwise.py), so the steps below are the single
    # definition of what happens between blocks.
    def forward(self, hidden_states: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states_t5: torch.Tensor,
                encoder_hidden_states_llama3: torch.Tensor, pooled_embeds: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            self.check_inputs(hidden_states, timesteps, encoder_hidden_states_t5, encoder_hidden_states_llama3,
                              pooled_embeds)
        img, temb, txt0, llama, ctx = self.embed(hidden_states, timesteps, encoder_hidden_states_t5,
                                                 encoder_hidden_states_llama3, pooled_embeds)
        for i, block in enumerate(self.double_stream_blocks):
            img, txt0 = double_step(block, img, txt0, llama[i], temb, ctx)
        h = torch.cat([img, txt0], dim=1)
        for j, block in enumerate(self.single_stream_blocks):
            h = single_step(block, h, llama[self.config.num_layers + j], temb, ctx)
        return self.unembed(h, temb, hidden_states)

    def embed(self, hidden_states, timesteps, encoder_hidden_states_t5, encoder_hidden_states_llama3, pooled_embeds):
        """Inputs -> (image tokens, conditioning, T5 + last-Llama text tokens, one projected Llama layer per
        block, attention context)."""
        return embed(self, hidden_states, timesteps, encoder_hidden_states_t5, encoder_hidden_states_llama3,
                     pooled_embeds)

    def unembed(self, h: torch.Tensor, temb: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Joint tokens after the last block -> the output latent (shaped like `hidden_states`)."""
        return unembed(self, h, temb, hidden_states)

    def split(self) -> "TransformerParts":
        """The model as the four parts the block-by-block export traces (see TransformerParts)."""
        c = self.config
        return TransformerParts(
            Prologue(self), DoubleBlockPart(self.double_stream_blocks[0]) if c.num_layers else None,
            SingleBlockPart(self.single_stream_blocks[0]) if c.num_single_layers else None, Epilogue(self))


# ---- the steps between blocks (shared by the model and its parts) --------------------------------------
# `m` is the model, or a part that holds the same modules under the same names.

def embed(m, hidden_states, timesteps, encoder_hidden_states_t5, encoder_hidden_states_llama3, pooled_embeds):
    c = m.config
    p = c.patch_size
    B, C, H, W = hidden_states.shape
    rows, cols = H // p, W // p
    n_img = rows * cols
    dtype = hidden_states.dtype

    # Patchify: tokens row-major, features ordered (p_row, p_col, C); one zero patch appended for
    # the padding token (see the module docstring).
    patches = hidden_states.reshape(B, C, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1).reshape(B, n_img, p * p * C)
    patches = torch.cat([patches, patches.new_zeros(B, 1, p * p * C)], dim=1)
    img = m.x_embedder(patches)

    temb = m.t_embedder(timesteps, dtype) + m.p_embedder(pooled_embeds)

    llama = [m.caption_projection[i](encoder_hidden_states_llama3[layer]) for i, layer in enumerate(c.llama_layers)]
    t5 = m.caption_projection[-1](encoder_hidden_states_t5)
    txt0 = torch.cat([t5, llama[-1]], dim=1)
    n_txt = txt0.shape[1] + llama[0].shape[1]

    ctx = attention_context(m, rows, cols, n_txt, H, W, hidden_states.device)
    return img, temb, txt0, llama, ctx


def unembed(m, h: torch.Tensor, temb: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
    p = m.config.patch_size
    B, _, H, W = hidden_states.shape
    rows, cols = H // p, W // p
    out = m.final_layer(h[:, :rows * cols], temb)
    return out.reshape(B, rows, cols, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(B, -1, H, W)


def attention_context(m, rows, cols, n_txt, H, W, device) -> AttentionContext:
    n_img = rows * cols
    cos_img, sin_img = m.rope(rows, cols, device)
    n_rest = 1 + n_txt  # padding token + text tokens: identity rotation
    cos = torch.cat([cos_img, cos_img.new_ones(n_rest, cos_img.shape[1])])
    sin = torch.cat([sin_img, sin_img.new_zeros(n_rest, sin_img.shape[1])])
    n_pad = padding_multiplicity(H, W, n_img, m.config.max_seq, device)
    one = torch.ones(1, device=device)
    key_scale = torch.cat([one.expand(n_img), one * 0, one.expand(n_txt)])
    bias = torch.cat([(one * 0).expand(n_img), torch.log(n_pad).reshape(1), (one * 0).expand(n_txt)])
    return AttentionContext(cos, sin, key_scale, bias)


def double_step(block, img, txt0, llama_i, temb, ctx):
    """One double-stream block: its text input is the running T5/Llama tokens plus this block's Llama
    layer, and the block's Llama tokens are dropped again after it."""
    img, txt = block(img, torch.cat([txt0, llama_i], dim=1), temb, ctx)
    return img, txt[:, :txt0.shape[1]]


def single_step(block, h, llama_j, temb, ctx):
    """One single-stream block over the joint tokens plus this block's Llama layer, which is dropped after."""
    return block(torch.cat([h, llama_j], dim=1), temb, ctx)[:, :h.shape[1]]


def padding_multiplicity(H, W, n_img, max_seq, device) -> torch.Tensor:
    """How many zero tokens the official model would append: 0 for square latents, else max_seq - N.

    Computed with tensor arithmetic on the sizes, so a traced graph keeps the square/non-square choice.
    """
    h, w, n = (torch.scalar_tensor(v, dtype=torch.float32, device=device) for v in (H, W, n_img))
    return (h != w).float() * (max_seq - n)


# ---- the model in parts ------------------------------------------------------------------------------
# The streaming export traces each kind of part once (hidream_export/export/blockwise.py) and repeats the
# block parts with each block's weights. Each part holds exactly its own modules, shared with the model,
# under the checkpoint's key names (a block part holds block 0 of its kind); its forward takes and
# returns flat tensors, named by INPUTS / OUTPUTS.

CONTEXT = ("cos", "sin", "key_scale", "bias")


class Prologue(nn.Module):
    """Inputs -> image tokens, conditioning, text tokens, attention context, one Llama layer per block."""

    INPUTS = ("hidden_states", "timesteps", "encoder_hidden_states_t5", "encoder_hidden_states_llama3",
              "pooled_embeds")
    OUTPUTS = ("img", "temb", "txt0", *CONTEXT)  # then llama.0 .. llama.{num_blocks - 1}

    def __init__(self, model: HiDreamTransformer):
        super().__init__()
        self.config = model.config
        for name in ("t_embedder", "p_embedder", "x_embedder", "caption_projection", "rope"):
            setattr(self, name, getattr(model, name))

    def forward(self, hidden_states, timesteps, encoder_hidden_states_t5, encoder_hidden_states_llama3,
                pooled_embeds):
        img, temb, txt0, llama, ctx = embed(self, hidden_states, timesteps, encoder_hidden_states_t5,
                                            encoder_hidden_states_llama3, pooled_embeds)
        return (img, temb, txt0, ctx.cos, ctx.sin, ctx.key_scale, ctx.bias, *llama)


class DoubleBlockPart(nn.Module):
    INPUTS = ("img", "txt0", "llama", "temb", *CONTEXT)
    OUTPUTS = ("img_out", "txt0_out")
    PREFIX = "double_stream_blocks.0."

    def __init__(self, block: nn.Module):
        super().__init__()
        self.double_stream_blocks = nn.ModuleList([block])

    def forward(self, img, txt0, llama, temb, cos, sin, key_scale, bias):
        return double_step(self.double_stream_blocks[0], img, txt0, llama, temb,
                           AttentionContext(cos, sin, key_scale, bias))


class SingleBlockPart(nn.Module):
    INPUTS = ("h", "llama", "temb", *CONTEXT)
    OUTPUTS = ("h_out",)
    PREFIX = "single_stream_blocks.0."

    def __init__(self, block: nn.Module):
        super().__init__()
        self.single_stream_blocks = nn.ModuleList([block])

    def forward(self, h, llama, temb, cos, sin, key_scale, bias):
        return single_step(self.single_stream_blocks[0], h, llama, temb, AttentionContext(cos, sin, key_scale, bias))


class Epilogue(nn.Module):
    """Joint tokens after the last block -> the output latent."""

    INPUTS = ("h", "temb", "hidden_states")
    OUTPUTS = ("sample",)

    def __init__(self, model: HiDreamTransformer):
        super().__init__()
        self.config = model.config
        self.final_layer = model.final_layer

    def forward(self, h, temb, hidden_states):
        return unembed(self, h, temb, hidden_states)


@dataclass
class TransformerParts:
    """prologue -> double blocks -> concat(img, txt0) -> single blocks -> epilogue. A block part is None
    when the config has no block of that kind."""

    prologue: Prologue
    double: DoubleBlockPart | None
    single: SingleBlockPart | None
    epilogue: Epilogue

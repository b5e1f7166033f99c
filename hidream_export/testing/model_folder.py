"""A complete random-weight HiDream-I1 model folder in the real diffusers on-disk layout.

`hidream_export.testing.checkpoints.write_transformer` covers the transformer alone. End-to-end work (the torch-free
runtime, the exporters of the text encoders and the VAE, and diffusers' `HiDreamImagePipeline` as the
oracle they are compared with) needs every component, in the same files and formats as the real
HiDream-I1-{Full,Dev,Fast} repositories, so that the code paths that read a real download are the ones
the tests exercise. Nothing can be downloaded, so everything is generated here:

    OUT/
      model_index.json                  HiDreamImagePipeline and its nine shipped components
      scheduler/scheduler_config.json   UniPC (Full) or FlowMatchLCM (Dev, Fast), values from variants.py
      transformer/                      hidream_export.testing.checkpoints.write_transformer
      text_encoder/, text_encoder_2/    CLIPTextModelWithProjection (CLIP-L, CLIP-G)
      tokenizer/, tokenizer_2/          CLIP BPE: vocab.json + merges.txt (+ tokenizer_config, special map)
      text_encoder_3/                   T5EncoderModel
      tokenizer_3/                      T5: SentencePiece spiece.model (+ tokenizer_config, special map)
      vae/                              AutoencoderKL shaped like the FLUX VAE (16 latent channels, 8x)
      llama/                            LlamaForCausalLM + Llama-3.1 tokenizer.json: text_encoder_4 and
                                        tokenizer_4, which the HF repos do not ship (passed separately)

Component widths are derived from the transformer config, so they always fit it: CLIP projections sum
to `text_emb_dim` (split 3:5 like the real 768 + 1280), T5 `d_model` = `caption_channels[0]`, Llama
hidden = `caption_channels[1]` with `max(llama_layers) + 1` layers. Everything a component does not need
to match (attention width, MLP width, vocabularies) is kept tiny.

Tokenizers are trained at generation time (testing/tokenizers.py). Weights come
from the libraries' default initialisations under a seed derived per component. The result is
deterministic for a given (variant, preset, seed), byte for byte except the transformer safetensors
header, whose metadata safetensors writes in hash-map order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from hidream_export.errors import OutputExists
from hidream_export.files import staged_dir, swap_dir
from hidream_export.model.config import TransformerConfig, resolve_config
from hidream_export.testing.checkpoints import write_transformer
from hidream_export.testing.tokenizers import (LLAMA_CHAT_TEMPLATE, LLAMA_SPECIALS, added_token, clip_vocab_and_merges,
                                               llama_tokenizer_json, map_token, t5_spiece_model, write_clip_tokenizers,
                                               write_json)
from hidream_export.variants import TEXT_LENGTH, VAE_SCALE, Variant, get_variant

__all__ = ["write_model_folder", "EncoderSizes", "LLAMA_SUBDIR", "COMPONENTS"]

# Where the Llama text encoder goes inside the model folder. The HF repos do not ship it (users pass
# meta-llama/Meta-Llama-3.1-8B-Instruct); keeping it in the folder makes one path describe a whole model.
LLAMA_SUBDIR = "llama"

# model_index.json entries, exactly as the real HiDream-I1 repos list them (the scheduler is per variant).
COMPONENTS: dict[str, tuple[str, str]] = {
    "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
    "text_encoder_3": ("transformers", "T5EncoderModel"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "tokenizer_2": ("transformers", "CLIPTokenizer"),
    "tokenizer_3": ("transformers", "T5Tokenizer"),
    "transformer": ("diffusers", "HiDreamImageTransformer2DModel"),
    "vae": ("diffusers", "AutoencoderKL"),
}

@dataclass(frozen=True)
class EncoderSizes:
    """The widths the text encoders must have to feed a given transformer."""

    clip_l_projection: int  # CLIP-L text_embeds width (768 in the real model)
    clip_g_projection: int  # CLIP-G text_embeds width (1280); the two concatenate to text_emb_dim
    t5_dim: int  # T5 d_model = caption_channels[0]
    llama_dim: int  # Llama hidden_size = caption_channels[1]
    llama_layers: int  # decoder layers whose hidden states the transformer indexes

    @classmethod
    def for_transformer(cls, config: TransformerConfig) -> "EncoderSizes":
        """Split text_emb_dim 3:5 like the real 768 + 1280 = 2048. Unequal widths on purpose: a runtime
        that concatenates the pooled embeddings in the wrong order fails on shapes, not silently."""
        if config.text_emb_dim < 2:
            raise ValueError(f"text_emb_dim={config.text_emb_dim} cannot be split between two CLIP encoders")
        clip_l = max(1, config.text_emb_dim * 3 // 8)
        return cls(clip_l, config.text_emb_dim - clip_l, config.t5_dim, config.llama_dim, config.num_llama_layers)


# ---- public entry point -----------------------------------------------------------------------------

def write_model_folder(out_dir: str | Path, variant: str = "full", preset: "str | TransformerConfig" = "tiny",
                       seed: int = 0, *, overwrite: bool = False, transformer_dtype: torch.dtype = torch.float32,
                       transformer_shards: int | None = None) -> Path:
    """Write a complete random-weight HiDream-I1-{Full,Dev,Fast} model folder at `out_dir`; return it.

    Loads with `HiDreamImagePipeline.from_pretrained(out_dir, tokenizer_4=..., text_encoder_4=...)`,
    the Llama pair coming from `out_dir/llama` (see `LLAMA_SUBDIR`). `preset` is any transformer preset
    or config; only the transformer grows with it (the encoders keep tiny attention/MLP widths and
    only take the input/output widths the transformer needs). `transformer_dtype`/`transformer_shards`
    go to `write_transformer` (the real checkpoint is bf16 in 7 shards); the other components are fp32.

    The folder is assembled in a temporary sibling and renamed into place, so readers never see half a
    model. An existing non-empty `out_dir` is an error unless `overwrite=True`, which replaces it:
    a mistyped path must not wipe a real download.
    """
    out = Path(out_dir)
    spec = get_variant(variant)
    config = resolve_config(preset)
    sizes = EncoderSizes.for_transformer(config)
    if out.exists() and not out.is_dir():
        raise OutputExists(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExists(f"{out} is not empty; pass overwrite=True (--overwrite) to replace it, or choose "
                           f"another folder")

    tmp = staged_dir(out.parent, out.name)
    try:
        with _quiet_saves():
            _write_components(tmp, spec, config, sizes, seed, transformer_dtype, transformer_shards)
        swap_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_components(root: Path, spec: Variant, config: TransformerConfig, sizes: EncoderSizes, seed: int,
                      transformer_dtype: torch.dtype, transformer_shards: int | None) -> None:
    """Every component, each independent of the others but for the widths in `sizes`."""
    _write_model_index(root, spec)
    _write_scheduler(root / "scheduler", spec)
    write_transformer(root / "transformer", config, seed=seed, dtype=transformer_dtype, shards=transformer_shards)
    write_clip_tokenizers(root)
    _write_clip_encoders(root, sizes, seed)
    _write_t5(root, sizes, seed)
    _write_vae(root / "vae", config, seed)
    _write_llama(root / LLAMA_SUBDIR, sizes, seed)


# ---- helpers shared by the components ---------------------------------------------------------------

def _component_seed(seed: int, name: str) -> int:
    """Independent, stable seeds per component: changing one component's architecture must not change
    the weights of the others."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") % (2**63)


def _build_seeded(factory, seed: int, name: str):
    """Run `factory()` (a model constructor, which initialises from torch's global RNG) under a
    component seed, without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_component_seed(seed, name))
        return factory().eval()


@contextlib.contextmanager
def _quiet_saves():
    """transformers' save_pretrained draws a progress bar per model; generation should print nothing."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


# ---- model_index.json and scheduler -----------------------------------------------------------------

def _write_model_index(root: Path, spec: Variant) -> None:
    """The nine components the HF repos list; no text_encoder_4/tokenizer_4 (the user passes Llama)."""
    index: dict = {"_class_name": "HiDreamImagePipeline", "_diffusers_version": _diffusers_version(),
                   "scheduler": ["diffusers", spec.diffusers_scheduler]}
    index.update({name: list(lib_cls) for name, lib_cls in COMPONENTS.items()})
    # Key order as diffusers writes it: the "_" entries first, then components alphabetically.
    write_json(root / "model_index.json", dict(sorted(index.items(), key=lambda kv: (kv[0][0] != "_", kv[0]))))


def _write_scheduler(folder: Path, spec: Variant) -> None:
    """scheduler_config.json as the real repos ship it, from the variant's recipe.

    Full: UniPCMultistepScheduler on flow sigmas (flow_shift, prediction_type "flow_prediction"; the
    default "epsilon" would be wrong). Dev/Fast: FlowMatchLCMScheduler with a static shift. Written by
    the scheduler class itself so every default the real file spells out is present."""
    from diffusers import FlowMatchLCMScheduler, UniPCMultistepScheduler

    if spec.diffusers_scheduler == "UniPCMultistepScheduler":
        scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, use_flow_sigmas=True, flow_shift=spec.shift,
                                            prediction_type="flow_prediction")
    elif spec.diffusers_scheduler == "FlowMatchLCMScheduler":
        scheduler = FlowMatchLCMScheduler(num_train_timesteps=1000, shift=spec.shift, use_dynamic_shifting=False)
    else:  # a new variant recipe must say how its scheduler is written
        raise ValueError(f"variant {spec.name!r}: no writer for scheduler {spec.diffusers_scheduler!r}")
    scheduler.save_pretrained(folder)


# ---- CLIP-L / CLIP-G ---------------------------------------------------------------------------------



def _write_clip_encoders(root: Path, sizes: EncoderSizes, seed: int) -> None:
    """CLIP-L (quick_gelu, like OpenAI's) and CLIP-G (gelu, like OpenCLIP bigG) text towers with
    projection heads. 128 positions: HiDream's long CLIPs take 128 tokens, not 77. bos/eos/pad ids are
    the legacy 0/2/1 of the real configs (pooling then uses argmax(input_ids), see the vocab layout)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    vocab_size = len(clip_vocab_and_merges()[0])
    for sub, hidden, act, projection in (("text_encoder", 32, "quick_gelu", sizes.clip_l_projection),
                                         ("text_encoder_2", 40, "gelu", sizes.clip_g_projection)):
        config = CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=projection,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=TEXT_LENGTH, hidden_act=act,
            layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1,
            architectures=["CLIPTextModelWithProjection"])
        model = _build_seeded(lambda: CLIPTextModelWithProjection(config), seed, sub)
        model.save_pretrained(root / sub)


# ---- T5 ------------------------------------------------------------------------------------------

T5_EXTRA_IDS = 100  # sentinel tokens <extra_id_0..99> appended after the sentencepiece vocabulary


def _write_t5(root: Path, sizes: EncoderSizes, seed: int) -> None:
    """tokenizer_3/ (spiece.model + configs, like google/t5-v1_1-xxl) and text_encoder_3/ (a T5 v1.1
    encoder: gated-gelu, untied, relative position buckets), d_model = the transformer's T5 width."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel

    proto = t5_spiece_model()
    n_pieces = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    folder = root / "tokenizer_3"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(proto)
    # Sentinels: <extra_id_0> is the LAST id, counting down (T5's convention).
    extra = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    decoder = {"0": added_token("<pad>"), "1": added_token("</s>"), "2": added_token("<unk>")}
    decoder.update({str(n_pieces + T5_EXTRA_IDS - 1 - i): added_token(t) for i, t in enumerate(extra)})
    write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": True,
        "added_tokens_decoder": dict(sorted(decoder.items(), key=lambda kv: int(kv[0]))),
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "extra_ids": T5_EXTRA_IDS,
        "legacy": True,
        "model_max_length": 512,
        "pad_token": "<pad>",
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    })
    write_json(folder / "special_tokens_map.json", {
        "additional_special_tokens": [map_token(t) for t in extra],
        "eos_token": map_token("</s>"), "pad_token": map_token("<pad>"), "unk_token": map_token("<unk>"),
    })

    # Like the real 32128 (= 32000 pieces + 100 sentinels, padded to a multiple of 128), rounded up to 8.
    vocab_size = -(-(n_pieces + T5_EXTRA_IDS) // 8) * 8
    config = T5Config(
        vocab_size=vocab_size, d_model=sizes.t5_dim, d_kv=8, d_ff=64, num_layers=2,
        num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, is_encoder_decoder=True, use_cache=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, architectures=["T5EncoderModel"])
    model = _build_seeded(lambda: T5EncoderModel(config), seed, "text_encoder_3")
    model.save_pretrained(root / "text_encoder_3")


# ---- VAE -----------------------------------------------------------------------------------------

def _write_vae(folder: Path, config: TransformerConfig, seed: int) -> None:
    """The FLUX VAE's structure with narrow channels: four down/up levels (so the pipeline's
    vae_scale_factor = 2**(4-1) = 8, as in the real model), 16 latent channels = transformer input,
    no quant convs, FLUX's scaling/shift factors."""
    from diffusers import AutoencoderKL

    levels = 4
    assert 2 ** (levels - 1) == VAE_SCALE
    vae_kwargs = dict(
        in_channels=3, out_channels=3, latent_channels=config.in_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(8, 16, 32, 32), layers_per_block=2, norm_num_groups=4, act_fn="silu",
        sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, force_upcast=True,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
    model = _build_seeded(lambda: AutoencoderKL(**vae_kwargs), seed, "vae")
    model.save_pretrained(folder)


# ---- Llama 3.1 -----------------------------------------------------------------------------------

# Meta-Llama-3.1's 256 special tokens, in id order after the BPE vocabulary (128000..128255 there).
def _write_llama(folder: Path, sizes: EncoderSizes, seed: int) -> None:
    """llama/: LlamaForCausalLM + tokenizer files as in meta-llama/Meta-Llama-3.1-8B-Instruct
    (tokenizer.json, tokenizer_config.json with PreTrainedTokenizerFast, special_tokens_map.json,
    generation_config.json). Llama-3.1 structure: GQA (4 query / 2 key-value heads), llama3 RoPE
    scaling, untied head; hidden = the transformer's Llama width, layers = what llama_layers index."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_json = llama_tokenizer_json()
    (folder / "tokenizer.json").write_text(tokenizer_json + "\n", encoding="utf-8")
    n_base = len(json.loads(tokenizer_json)["model"]["vocab"])
    ids = {t: n_base + i for i, t in enumerate(LLAMA_SPECIALS)}
    bos = ids["<|begin_of_text|>"]
    eos_ids = [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]  # as the real config lists them
    write_json(folder / "tokenizer_config.json", {
        "added_tokens_decoder": {str(i): added_token(t) for t, i in ids.items()},
        "bos_token": "<|begin_of_text|>",
        "chat_template": LLAMA_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        "eos_token": "<|eot_id|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    write_json(folder / "special_tokens_map.json", {
        "bos_token": map_token("<|begin_of_text|>"), "eos_token": map_token("<|eot_id|>"),
    })

    config = LlamaConfig(
        vocab_size=n_base + len(LLAMA_SPECIALS), hidden_size=sizes.llama_dim, intermediate_size=64,
        num_hidden_layers=sizes.llama_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
        bos_token_id=bos, eos_token_id=eos_ids, attention_bias=False, mlp_bias=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        architectures=["LlamaForCausalLM"])
    model = _build_seeded(lambda: LlamaForCausalLM(config), seed, "llama")
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos_ids, do_sample=True,
                                               temperature=0.6, top_p=0.9)
    model.save_pretrained(folder)
    _legacy_rope_keys(folder / "config.json")


def _legacy_rope_keys(path: Path) -> None:
    """Rewrite a transformers-5 Llama config.json with the keys the real Meta-Llama-3.1 file has
    (`rope_theta` + `rope_scaling`, `torch_dtype`; v5 writes one `rope_parameters` dict and `dtype`).
    Code that reads the real config.json without transformers sees the same keys here; transformers 5
    still reads this layout."""
    data = json.loads(path.read_text())
    rope = dict(data.pop("rope_parameters"))
    data["rope_theta"] = rope.pop("rope_theta")
    data["rope_scaling"] = rope
    if "dtype" in data:
        data["torch_dtype"] = data.pop("dtype")
    write_json(path, dict(sorted(data.items())))

"""What an exported transformer takes and returns: names, dtypes, symbolic axes, batch and size ranges.
Torch-free: export, compare, the runtime, the TensorRT plan and the tools all read it from here.

    hidden_states                  (batch, C, latent_height, latent_width)   export dtype
    timesteps                      (batch,)                                   int64 (Full) / float32
    encoder_hidden_states_t5       (batch, 128, t5_dim)                       export dtype
    encoder_hidden_states_llama3   (n_llama_layers, batch, 128, llama_dim)    export dtype
    pooled_embeds                  (batch, text_emb_dim)                      export dtype
    -> sample                      (batch, C, latent_height, latent_width)    export dtype

Batch: images x the variant's CFG factor (Full runs [negative, positive] pairs), up to
MAX_IMAGES_PER_PROMPT images. Sizes: the variant's pixel range scaled to the model's trained grid.
"""

from __future__ import annotations

from dataclasses import dataclass

from hidream_export.errors import ExportError
from hidream_export.variants import (SIZE_MULTIPLE, TEXT_LENGTH, VAE_SCALE, SizeRange, Variant, parse_size,
                                     size_range_for)

INPUT_NAMES = ("hidden_states", "timesteps", "encoder_hidden_states_t5", "encoder_hidden_states_llama3",
               "pooled_embeds")
OUTPUT_NAMES = ("sample",)
MAX_IMAGES_PER_PROMPT = 4
MAX_TEXT_BATCH = 2 * MAX_IMAGES_PER_PROMPT  # a Full prompt pair per image
MAX_VAE_BATCH = MAX_IMAGES_PER_PROMPT  # the runtime decodes the images of one prompt (no CFG pair)

EXPORT_DTYPES = ("fp32", "fp16", "bf16")
# Export dtype -> the tensor dtype (numpy name) the graph takes and returns.
TENSOR_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def tensor_dtype(dtype: str) -> str:
    """'float32' for 'fp32' (numpy names pass through); ExportError naming --dtype otherwise."""
    if dtype in TENSOR_DTYPES.values():
        return dtype
    try:
        return TENSOR_DTYPES[dtype]
    except KeyError:
        raise ExportError(f"--dtype {dtype!r} is not one of {EXPORT_DTYPES}") from None


@dataclass(frozen=True)
class BatchRange:
    min: int
    max: int
    multiple: int  # Full feeds [negative, positive] pairs

    def to_dict(self) -> dict:
        return {"min": self.min, "max": self.max, "multiple": self.multiple}


def batch_range(variant: Variant, max_images: int = MAX_IMAGES_PER_PROMPT) -> BatchRange:
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ExportError(f"max_images must be an integer >= 1, got {max_images!r}")
    f = variant.cfg_batch_factor
    return BatchRange(f, f * max_images, f)


def resolve_size_range(variant: Variant, config, min_size=None, max_size=None, opt_size=None) -> SizeRange:
    """The pixel range an export serves: the variant's, scaled to `config.max_resolution`, with any of
    --min-size / --max-size / --opt-size ('WxH' or (w, h)) replacing its bound."""
    base = size_range_for(variant, config.max_resolution)

    def pick(value, default):
        return parse_size(value) if isinstance(value, str) else (tuple(value) if value else default)

    return SizeRange(pick(min_size, base.min), pick(max_size, base.max), pick(opt_size, base.opt))


@dataclass(frozen=True)
class TensorIO:
    name: str
    dtype: str
    shape: tuple


@dataclass(frozen=True)
class TransformerSignature:
    """The exported transformer's contract, as its manifest entry records it."""

    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]
    axes: dict  # symbolic axis -> (min, max)
    batch_multiple: int
    size_range: SizeRange
    max_seq: int


def transformer_signature(config, variant: Variant, size_range: SizeRange, batch: BatchRange,
                          dtype: str) -> TransformerSignature:
    """`config` is a TransformerConfig (or anything with its fields)."""
    def lat(px: int) -> int:
        return px // VAE_SCALE

    t = tensor_dtype(dtype)
    axes = {
        "batch": (batch.min, batch.max),
        "latent_height": (lat(size_range.min[1]), lat(size_range.max[1])),
        "latent_width": (lat(size_range.min[0]), lat(size_range.max[0])),
    }
    inputs = (
        TensorIO("hidden_states", t, ("batch", config.in_channels, "latent_height", "latent_width")),
        TensorIO("timesteps", variant.timestep_dtype, ("batch",)),
        TensorIO("encoder_hidden_states_t5", t, ("batch", TEXT_LENGTH, config.t5_dim)),
        TensorIO("encoder_hidden_states_llama3", t,
                 (config.num_llama_layers, "batch", TEXT_LENGTH, config.llama_dim)),
        TensorIO("pooled_embeds", t, ("batch", config.text_emb_dim)),
    )
    outputs = (TensorIO("sample", t, ("batch", config.out_channels, "latent_height", "latent_width")),)
    return TransformerSignature(inputs, outputs, axes, batch.multiple, size_range, config.max_seq)


def trace_size(size_range: SizeRange) -> tuple[int, int]:
    """The (width, height) the export traces at: the opt size made non-square by one step, so nothing in
    the graph can specialise on a square input (square is not special in the graph anyway)."""
    w, h = size_range.opt
    if h - SIZE_MULTIPLE >= size_range.min[1]:
        h -= SIZE_MULTIPLE
    elif h + SIZE_MULTIPLE <= size_range.max[1]:
        h += SIZE_MULTIPLE
    return w, h

"""One frozen description of a transformer export, and the trace inputs derived from it.

`export_transformer` builds an `ExportSpec` from its arguments once; the plain export and the
block-by-block export (blockwise.py) both trace from it, so they cannot disagree on sizes, dtypes,
the MoE lowering or the opset.
"""

from __future__ import annotations

from dataclasses import dataclass

from hidream_export.quant.scheme import QuantScheme
from hidream_export.signature import (BatchRange, TransformerSignature, trace_size, transformer_signature)
from hidream_export.variants import SIZE_MULTIPLE, TEXT_LENGTH, VAE_SCALE, SizeRange, Variant


@dataclass(frozen=True)
class ExportSpec:
    config: object  # TransformerConfig
    variant: Variant
    size_range: SizeRange
    batch: BatchRange
    dtype: str  # "fp32" | "fp16" | "bf16"
    opset: int
    moe: str  # the MoE lowering (hidream_export.model.lowerings)
    target: str = "tensorrt"  # the runtime the graph is shaped for (hidream_export.export.targets)
    quant: QuantScheme | None = None  # quantized linear weights (hidream_export.quant), None: all in `dtype`

    @property
    def torch_dtype(self):
        from hidream_export.export.common import torch_dtype

        return torch_dtype(self.dtype)

    @property
    def max_positions(self) -> int:
        """Rows of the float32 RoPE tables: the largest latent side in patches, at least the model's own
        default (twice its trained grid)."""
        cfg = self.config
        return max(max(self.size_range.max) // SIZE_MULTIPLE, 2 * max(cfg.max_resolution) // cfg.patch_size)

    @property
    def signature(self) -> TransformerSignature:
        return transformer_signature(self.config, self.variant, self.size_range, self.batch, self.dtype)

    def translation_table(self) -> dict | None:
        """The torch -> ONNX translations the lowering and the target need (the HiDreamMoE node for
        `plugin`, the com.microsoft.MoE node for `ort`, the fused attention of the onnxruntime target);
        importing them defines the torch op a lowering calls."""
        from hidream_export.export import targets

        table = dict(targets.translation_table(self.target))
        if self.moe == "plugin":
            from hidream_export.moe import onnx_node

            table.update(onnx_node.translation_table())
        if self.moe == "ort":
            from hidream_export.moe import ort_moe

            table.update(ort_moe.translation_table())
        return table or None

    def to_key(self) -> dict:
        """What the export's settings key hashes (besides checkpoint and versions)."""
        key = {"variant": self.variant.name, "moe": self.moe, "dtype": self.dtype, "opset": self.opset,
               "size_range": self.size_range.to_dict(), "batch": self.batch.to_dict()}
        if self.target != "tensorrt":  # so folders exported before targets existed keep their settings
            key["target"] = self.target
        if self.quant is not None:  # absent for float exports, so their keys (and caches) stay as they were
            key["quant"] = self.quant.to_key()
        return key


def sample_inputs(spec: ExportSpec, seed: int = 0):
    """Trace inputs: two images' worth of batch (dims of size 0/1 would be specialised) at the trace size."""
    import torch

    cfg, dtype = spec.config, spec.torch_dtype
    g = torch.Generator().manual_seed(seed)
    b = min(2 * spec.batch.multiple, spec.batch.max)
    w, h = trace_size(spec.size_range)
    t = torch.rand(b, generator=g) * 1000
    return (
        torch.randn(b, cfg.in_channels, h // VAE_SCALE, w // VAE_SCALE, generator=g).to(dtype),
        t.long() if spec.variant.timestep_dtype == "int64" else t,
        torch.randn(b, TEXT_LENGTH, cfg.t5_dim, generator=g).to(dtype),
        torch.randn(cfg.num_llama_layers, b, TEXT_LENGTH, cfg.llama_dim, generator=g).to(dtype),
        torch.randn(b, cfg.text_emb_dim, generator=g).to(dtype),
    )


def dynamic_shapes(spec: ExportSpec):
    """torch.export dynamic shapes of the five model inputs: batch in images (times the CFG factor),
    height and width in 16 px steps (so the latent is always a whole number of patches)."""
    from torch.export import Dim

    size_range, batch = spec.size_range, spec.batch
    cell = SIZE_MULTIPLE // VAE_SCALE  # latent cells per 16 px (= patch size 2)

    def side(name: str, lo: int, hi: int):
        # A fixed side (min == max) stays static: torch.export rejects a Dim with min == max.
        return None if lo == hi else cell * Dim(name, min=lo // SIZE_MULTIPLE, max=hi // SIZE_MULTIPLE)

    h = side("latent_height_16px", size_range.min[1], size_range.max[1])
    w = side("latent_width_16px", size_range.min[0], size_range.max[0])
    if batch.min == batch.max:
        b = None  # a fixed batch (one image per prompt): nothing to make dynamic
    elif batch.multiple > 1:
        b = batch.multiple * Dim("images", min=batch.min // batch.multiple, max=batch.max // batch.multiple)
    else:
        b = Dim("batch", min=batch.min, max=batch.max)

    def axes(d: dict) -> dict:
        return {k: v for k, v in d.items() if v is not None}

    return (axes({0: b, 2: h, 3: w}), axes({0: b}), axes({0: b}), axes({1: b}), axes({0: b}))

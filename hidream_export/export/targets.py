"""Which runtime a transformer graph is shaped for: `--target tensorrt|onnxruntime`, recorded in the
manifest as `target`.

- tensorrt (default for every lowering but `ort`): standard ops that TensorRT's ONNX parser reads, at the
  default opset (20). Attention is MatMul/Softmax/MatMul and RMSNorm its arithmetic, which TensorRT fuses
  itself; the lint checks the graph against the parser's op table.
- onnxruntime: the fused operators ONNX Runtime runs on CPU and CUDA. The graph is written at opset 23,
  so RMSNorm is one `RMSNormalization` node and attention one `Attention` node (on CUDA ONNX Runtime
  dispatches it to its flash / memory-efficient kernels). `--moe ort` (ONNX Runtime's contrib MoE node)
  always gives an onnxruntime graph. Not a TensorRT graph: the lint and the TensorRT build refuse it.

The ONNX exporter's own `Attention` translation passes the attention bias as it is, (1, 1, 1, T); the
standard lets it broadcast, but ONNX Runtime's CPU kernel requires the query axis spelled out, so the
translation here expands it to (1, 1, S, T) first. Same numbers: only the layout of the bias changes.
"""

from __future__ import annotations

from hidream_export.errors import ExportError

TENSORRT, ONNXRUNTIME = "tensorrt", "onnxruntime"
TARGETS = {
    TENSORRT: "standard ops TensorRT's ONNX parser reads (opset 20 by default)",
    ONNXRUNTIME: "ONNX Runtime's fused ops: opset-23 Attention and RMSNormalization (always with --moe ort)",
}
ONNXRUNTIME_OPSET = 23  # the first opset with Attention and RMSNormalization
ONNXRUNTIME_LOWERINGS = ("ort",)  # MoE lowerings whose graph only ONNX Runtime runs


def resolve_target(target: str | None, moe: str, opset: int | None) -> tuple[str, int | None]:
    """(target, opset) for an export: the target defaults to onnxruntime for ONNX-Runtime-only lowerings and
    to tensorrt otherwise; an onnxruntime graph is written at opset 23 unless a later one is asked for.
    ExportError (one line, naming the flag) for a contradiction."""
    if target is None:
        target = ONNXRUNTIME if moe in ONNXRUNTIME_LOWERINGS else TENSORRT
    if target not in TARGETS:
        raise ExportError(f"--target {target!r} is not one of {tuple(TARGETS)}")
    if target == TENSORRT and moe in ONNXRUNTIME_LOWERINGS:
        raise ExportError(f"--moe {moe} writes ONNX Runtime's contrib MoE node, which TensorRT cannot parse; use "
                          f"--target {ONNXRUNTIME} (its default) or another --moe for TensorRT")
    if target == ONNXRUNTIME:
        if opset is not None and opset < ONNXRUNTIME_OPSET:
            raise ExportError(f"--target {ONNXRUNTIME} writes opset-{ONNXRUNTIME_OPSET} Attention and "
                              f"RMSNormalization; --opset {opset} is too old (leave it out, or give >= "
                              f"{ONNXRUNTIME_OPSET})")
        opset = opset if opset is not None else ONNXRUNTIME_OPSET
    return target, opset


def translation_table(target: str) -> dict:
    """The torch -> ONNX translations a target adds to the exporter's own (none for tensorrt)."""
    if target != ONNXRUNTIME:
        return {}
    import torch
    from onnxscript.onnx_opset import opset23 as op

    def attention(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                  scale: float | None = None, enable_gqa: bool = False):
        if dropout_p or is_causal or enable_gqa or attn_mask is None:
            raise ExportError("the onnxruntime target translates HiDream's attention only (a float bias, no dropout, "
                              "causal mask or grouped query heads)")
        # Spell out the bias's query axis: (..., 1, T) -> (..., S, T) (see the module docstring).
        shape = op.Concat(op.Shape(attn_mask, end=-2), op.Shape(query, start=-2, end=-1),
                          op.Shape(attn_mask, start=-1), axis=0)
        out, _, _, _ = op.Attention(query, key, value, op.Expand(attn_mask, shape), scale=scale)
        return out

    return {torch.ops.aten.scaled_dot_product_attention.default: attention}

"""What the transformer export (export/transformer.py) asks of the quantizer, in one place: the checks
before anything is traced, the sizes a quantized export writes, where each quantized tensor comes from, and
the manifest record."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from hidream_export.errors import ExportError
from hidream_export.quant.policy import kept_summary, transformer_quantizes
from hidream_export.quant.scheme import (BITS, INPUT_SCALE, MIN_OPSET, QWEIGHT, CalibrationTable, QuantRecord,
                                         QuantScheme, module_of, parse_quant_name)
from hidream_export.quant.weights import check_block

ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}
# Measured with onnxruntime 1.32 (tools/bench_quant.py checks it on every run): the CPU provider's graph
# optimizer fuses a blocked DequantizeLinear (INT4 and INT8) feeding MatMul or Gemm into MatMulNBits.
ORT_FUSION = "onnxruntime CPU: DequantizeLinear(int4/int8, blocked) + MatMul/Gemm -> MatMulNBits"
# Lowerings whose expert weights reach the graph as linear layers (the `plugin` op takes stacked float weights).
QUANT_LOWERINGS = ("gather", "dense")


@dataclass
class TransformerQuant:
    """A resolved --quant request for one checkpoint: the scheme (settings key) and, for fp8, its ranges."""

    scheme: QuantScheme
    calibration: CalibrationTable | None = None


def resolve(quant: str | None, block: int | None, calibration: str | Path | None, *, shapes: dict, moe: str,
            opset: int | None, streaming: bool, ort_accuracy_level: int | None = None
            ) -> tuple[TransformerQuant | None, int | None]:
    """Check a --quant request against the checkpoint's shapes before anything is traced.

    Returns (the resolved request or None, the opset to export with). One-line errors: unknown scheme or
    block, a block that does not divide a quantized weight's input dimension, fp8 without a calibration file
    or with one that lacks a layer, a lowering or opset that cannot carry the quantized weights."""
    if quant is None:
        if calibration is not None:
            raise ExportError("--calibration goes with --quant fp8")
        QuantScheme.parse(None, block, None, ort_accuracy_level)
        return None, opset
    table = CalibrationTable.read(calibration) if calibration is not None else None
    scheme = QuantScheme.parse(quant, block, table.sha256 if table else None, ort_accuracy_level)
    if moe not in QUANT_LOWERINGS:
        raise ExportError(f"--quant {quant} with --moe {moe}: the {moe} lowering's experts are not linear layers in "
                          f"the graph; use --moe {' or '.join(QUANT_LOWERINGS)}")
    if not streaming:
        raise ExportError(f"--quant {quant} quantizes while the weights stream; drop --no-streaming")
    if opset is None:
        opset = MIN_OPSET
    elif opset < MIN_OPSET:
        raise ExportError(f"--quant {quant} needs --opset {MIN_OPSET} or newer (blocked DequantizeLinear and FP8 "
                          f"types), got {opset}")
    for key, shape in shapes.items():
        if transformer_quantizes(key) and len(shape) == 2:
            check_block(key, shape, scheme)
            if quant == "int4" and shape[0] % 2:
                raise ExportError(f"--quant int4: weight {key!r} has {shape[0]} output channels; INT4 [in, out] "
                                  f"packs two per byte, so an even count is needed")
            if table is not None:
                table.input_amax(module_of(key))
    return TransformerQuant(scheme, table), opset


def weight_bytes(shapes: dict, dtype: str, scheme: QuantScheme | None) -> int:
    """Bytes of the weights an export writes (without alignment)."""
    item = ITEMSIZE[dtype]
    total = 0
    for key, shape in shapes.items():
        n = math.prod(shape)
        if scheme is None or len(shape) != 2 or not transformer_quantizes(key):
            total += n * item
            continue
        out_dim, in_dim = shape
        total += n * BITS[scheme.scheme] // 8
        total += (out_dim if scheme.scheme == "fp8" else in_dim // scheme.block_size * out_dim) * item
        total += item if scheme.scheme == "fp8" else 0
    return total


def source_key(name: str) -> str:
    """The checkpoint key an initializer is made from (its own name unless it is a quantized tensor's)."""
    parsed = parse_quant_name(name)
    return name if parsed is None else f"{parsed[0]}.weight"


def initializer_source(name: str, scheme: QuantScheme | None) -> str | None:
    """The manifest initializer_map value of a quantized tensor (None for any other initializer)."""
    parsed = parse_quant_name(name)
    if parsed is None or scheme is None:
        return None
    module, role = parsed
    if role == INPUT_SCALE:
        return f"computed:calibrated amax({module}) / 448"
    return f"computed:{scheme.scheme} {role} of {module}.weight"


def weight_only_record(scheme: QuantScheme, count: int, kept: dict, ort_version: str, fusion: str = "") -> QuantRecord:
    """The manifest record of an int8/int4 weight-only export (transformer or text encoder)."""
    kernel = "quantize_qdq_matmul_4bits" if scheme.scheme == "int4" else "quantize_matmul_8bits"
    return QuantRecord(
        scheme=scheme.scheme, block_size=scheme.block_size,
        weight_format=(f"{scheme.scheme.upper()} [in, out] -> DequantizeLinear(axis=0, block_size="
                       f"{scheme.block_size}, opset 21) -> MatMul/Gemm"),
        activations="export dtype", arithmetic=f"onnxruntime {ort_version} {kernel} (symmetric)",
        quantized_weights=count, kept=kept, ort_fusion=fusion, ort_accuracy_level=scheme.ort_accuracy_level)


def record(request: TransformerQuant, slot_names, ort_version: str) -> QuantRecord:
    """The transformer's manifest record (`slot_names`: the streamed initializers, to count the weights)."""
    scheme = request.scheme
    count = sum(1 for n in slot_names if (parse_quant_name(n) or ("", ""))[1] == QWEIGHT)
    if scheme.scheme != "fp8":
        return weight_only_record(scheme, count, kept_summary(), ort_version, ORT_FUSION)
    import modelopt

    table = request.calibration
    return QuantRecord(
        scheme="fp8", block_size=None,
        weight_format="FLOAT8E4M3FN [in, out] -> DequantizeLinear(axis=1, per output channel) -> MatMul/Gemm",
        activations="e4m3 per tensor: QuantizeLinear/DequantizeLinear, scale = calibrated amax / 448",
        arithmetic=f"nvidia-modelopt {modelopt.__version__} FP8QTensor", quantized_weights=count,
        kept=kept_summary(), calibration={"sha256": table.sha256, "checkpoint_sha256": table.checkpoint_sha256,
                                          **table.meta})

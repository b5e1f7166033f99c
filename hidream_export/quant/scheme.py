"""What a quantized export asks for, what it records, and what its tensors are called. Torch- and numpy-free.

Schemes (`--quant`):

    int8, int4   weight-only, block-wise symmetric along the input dimension (`--quant-block` 32/64/128):
                 each linear weight W [out, in] is stored transposed, as INT8/INT4 [in, out] with one scale
                 per block of `block` input rows per output column, and dequantized by a DequantizeLinear
                 (opset 21, `block_size`) feeding the MatMul. Activations stay in the export dtype.
    fp8          e4m3 Q/DQ on the transformer's matmuls: weights per output channel (FLOAT8E4M3FN [in, out],
                 DequantizeLinear axis 1), activations per tensor (QuantizeLinear/DequantizeLinear with a
                 scale from a calibration file written by `hidream-export calibrate`).

A quantized linear weight `M.weight` becomes `M.qweight` (the codes), `M.weight_scale` and, for fp8,
`M.input_scale` (the names ModelOpt's checkpoints use); everything else keeps its checkpoint name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from hidream_export.errors import ExportError, ManifestError

SCHEMES = ("int8", "int4", "fp8")
BLOCK_SIZES = (32, 64, 128)
# int4: 64 balances error against scale overhead (one fp32 scale per 64 weights is 1/8 of the codes' bytes).
# int8 at block 128 missed the bounds on the `small` preset (cosine 0.99946, routing 98.85% at a late Dev
# timestep); block 32 holds them (0.99962, 99.09%) and its bf16 export is still about half the bf16 size.
DEFAULT_BLOCK = {"int8": 32, "int4": 64}
BITS = {"int8": 8, "int4": 4, "fp8": 8}
FP8_MAX = 448.0  # largest finite e4m3fn value: scale = amax / FP8_MAX, as ModelOpt computes it
# ONNX Runtime's CPU provider fuses DequantizeLinear + MatMul into MatMulNBits, whose `accuracy_level` picks the
# compute: 1 = float32 (the exact weight-only product), 4 = int8 (activations quantized per block at run time:
# faster on CPUs with int8 dot products, less accurate). Measured on `small` (README): int8 weights keep
# cosine >= 0.9995 only with 1; int4's own error dwarfs the difference, so it takes the faster one.
ORT_ACCURACY_LEVELS = (1, 2, 3, 4)
DEFAULT_ORT_ACCURACY = {"int8": 1, "int4": 4}
ORT_ACCURACY_CONFIG = "session.qdq_matmulnbits_accuracy_level"
# Blocked DequantizeLinear (and FP8 types everywhere) need opset 21.
MIN_OPSET = 21
CALIBRATION_FORMAT = 1

QWEIGHT, WEIGHT_SCALE, INPUT_SCALE = "qweight", "weight_scale", "input_scale"
ROLES = (QWEIGHT, WEIGHT_SCALE, INPUT_SCALE)


def module_of(weight_name: str) -> str:
    """`a.b.weight` -> `a.b`: the linear layer a weight belongs to (names without `.weight` are their own)."""
    return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name


def quant_name(weight_name: str, role: str) -> str:
    """The initializer holding `role` (qweight, weight_scale, input_scale) of a quantized weight."""
    return f"{module_of(weight_name)}.{role}"


def parse_quant_name(name: str) -> tuple[str, str] | None:
    """(module, role) of an initializer written by the quantizer, None for any other name."""
    module, _, role = name.rpartition(".")
    return (module, role) if module and role in ROLES else None


@dataclass(frozen=True)
class QuantScheme:
    """The request: part of the export settings (another scheme, block or calibration is another export)."""

    scheme: str
    block_size: int | None = None  # int8/int4; fp8 is per channel
    calibration_sha256: str | None = None  # fp8: the amax.json the activation scales come from
    ort_accuracy_level: int | None = None  # int8/int4: MatMulNBits compute ONNX Runtime sessions use

    @classmethod
    def parse(cls, scheme: str | None, block_size: int | None = None, calibration_sha256: str | None = None,
              ort_accuracy_level: int | None = None, *, flag: str = "--quant") -> "QuantScheme | None":
        """The scheme for `--quant`/`--quant-block` (None when not quantizing); one-line errors."""
        if scheme is None:
            if block_size is not None or ort_accuracy_level is not None:
                raise ExportError(f"{flag}-block and --ort-accuracy-level need {flag} int8 or int4")
            return None
        if scheme not in SCHEMES:
            raise ExportError(f"{flag} {scheme!r} is not one of {SCHEMES}")
        if scheme == "fp8":
            if ort_accuracy_level is not None:
                raise ExportError(f"--ort-accuracy-level applies to {flag} int8/int4 (MatMulNBits), not fp8")
            if block_size is not None:
                raise ExportError(f"{flag}-block does not apply to {flag} fp8 (weights are scaled per output "
                                  f"channel, activations per tensor)")
            if not calibration_sha256:
                raise ExportError(f"{flag} fp8 needs activation ranges: run `hidream-export calibrate CKPT "
                                  f"--variant V --prompts FILE --out amax.json` and pass --calibration amax.json")
            return cls(scheme, None, calibration_sha256)
        if calibration_sha256:
            raise ExportError(f"--calibration applies to {flag} fp8 only ({scheme} is weight-only)")
        block = DEFAULT_BLOCK[scheme] if block_size is None else block_size
        if isinstance(block, bool) or block not in BLOCK_SIZES:
            raise ExportError(f"{flag}-block {block_size!r} is not one of {BLOCK_SIZES}")
        level = DEFAULT_ORT_ACCURACY[scheme] if ort_accuracy_level is None else ort_accuracy_level
        if isinstance(level, bool) or level not in ORT_ACCURACY_LEVELS:
            raise ExportError(f"--ort-accuracy-level {ort_accuracy_level!r} is not one of {ORT_ACCURACY_LEVELS} "
                              f"(1 float32, 2 float16, 3 bfloat16, 4 int8 compute)")
        return cls(scheme, block, None, level)

    def to_key(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        if self.scheme == "fp8":
            return "fp8 (e4m3 Q/DQ: weights per channel, activations per tensor, calibrated)"
        return f"{self.scheme} weight-only (block {self.block_size})"


@dataclass
class QuantRecord:
    """What a quantized export did: the manifest's `quant` field (engines/README.md documents it)."""

    scheme: str
    block_size: int | None = None  # int8/int4 (fp8 is per channel)
    weight_format: str = ""  # how the graph holds the quantized weights
    activations: str = ""  # "export dtype" or the FP8 activation scaling
    arithmetic: str = ""  # the library whose kernels computed the codes and scales
    quantized_weights: int = 0  # linear weights quantized
    kept: dict[str, str] = field(default_factory=dict)  # weight group -> why it stays in the export dtype
    calibration: dict | None = None  # fp8: the calibration file's hash, checkpoint, prompts, recipe
    ort_fusion: str = ""  # what ONNX Runtime's CPU optimizer makes of the weight pattern
    ort_accuracy_level: int | None = None  # MatMulNBits compute every ONNX Runtime session is given

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantRecord":
        if not isinstance(data, Mapping) or data.get("scheme") not in SCHEMES:
            raise ManifestError(f"quant record {data!r} names no scheme of {SCHEMES}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def ort_session_config(self) -> dict[str, str]:
        """Session config entries an ONNX Runtime session of this graph needs (runtime, compare, bench)."""
        return {ORT_ACCURACY_CONFIG: str(self.ort_accuracy_level)} if self.ort_accuracy_level else {}

    def describe(self) -> str:
        block = f", block {self.block_size}" if self.block_size else ""
        return f"{self.scheme}{block}: {self.quantized_weights} weights, activations {self.activations}"


# ---- the calibration file (written by quant/calibrate.py, read by the fp8 export) --------------------------

@dataclass
class CalibrationTable:
    """amax.json: per linear layer, the largest |input| seen over the calibration trajectory."""

    amax: dict[str, float]  # module (checkpoint key without ".weight") -> amax
    checkpoint_sha256: str  # the transformer checkpoint it was measured on (what the export hashes)
    meta: dict = field(default_factory=dict)  # variant, prompts, steps, size, seed, tool versions
    sha256: str = ""  # of the file as read
    path: str = ""

    def to_dict(self) -> dict:
        return {"format": CALIBRATION_FORMAT, "checkpoint_sha256": self.checkpoint_sha256, **self.meta,
                "amax": dict(sorted(self.amax.items()))}

    @classmethod
    def read(cls, path: str | Path) -> "CalibrationTable":
        """Read and check amax.json (`check_checkpoint` then refuses one measured on another checkpoint)."""
        path = Path(path)
        try:
            raw = path.read_bytes()
            data = json.loads(raw)
        except FileNotFoundError:
            raise ExportError(f"--calibration {path}: no such file (write it with `hidream-export calibrate`)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ExportError(f"--calibration {path}: unreadable ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT or \
                not isinstance(data.get("amax"), dict) or not isinstance(data.get("checkpoint_sha256"), str):
            raise ExportError(f"--calibration {path}: not a calibration file of format {CALIBRATION_FORMAT} "
                              f"(expected format, checkpoint_sha256 and amax, as `hidream-export calibrate` writes)")
        amax = {}
        for module, value in data["amax"].items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
                raise ExportError(f"--calibration {path}: amax of {module!r} is {value!r}; expected a positive number")
            amax[str(module)] = float(value)
        meta = {k: v for k, v in data.items() if k not in ("format", "checkpoint_sha256", "amax")}
        return cls(amax, data["checkpoint_sha256"], meta, hashlib.sha256(raw).hexdigest(), str(path))

    def check_checkpoint(self, checkpoint_sha256: str) -> None:
        """Refuse ranges measured on another checkpoint: its activations are another model's."""
        if self.checkpoint_sha256 != checkpoint_sha256:
            raise ExportError(f"--calibration {self.path} was measured on another checkpoint (sha256 "
                              f"{self.checkpoint_sha256[:12]}..., this one is {checkpoint_sha256[:12]}...); "
                              f"calibrate this checkpoint")

    def input_amax(self, module: str) -> float:
        try:
            return self.amax[module]
        except KeyError:
            raise ExportError(f"--calibration {self.path}: no amax for {module!r} (the file covers {len(self.amax)} layers); "
                              f"calibrate again with this hidream-export") from None

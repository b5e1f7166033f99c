"""The MoE lowerings of the reference model, by name: the one table every layer reads, from the model's
`set_moe_lowering` to the CLI's `--moe` choices and the manifest's `moe_lowering`. Plain data (no torch),
so torch-free code can list them; hidream_export/model/moe.py binds each name to its implementation."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoweringInfo:
    name: str
    exported: bool  # offered by the ONNX export (`--moe NAME`)
    summary: str  # one line, for --help and reports


LOWERINGS: dict[str, LoweringInfo] = {info.name: info for info in (
    LoweringInfo("reference", False, "official summation order, every expert on every token"),
    LoweringInfo("dense", True, "static shapes; every expert on every token (E/k times the routed FLOPs)"),
    LoweringInfo("gather", True, "exact FLOPs: each expert runs on the tokens that picked it (ONNX Runtime)"),
    LoweringInfo("plugin", True, "one HiDreamMoE op per layer: Triton kernels on CUDA, a TensorRT plugin node"),
    LoweringInfo("ort", True, "one com.microsoft.MoE node per layer: ONNX Runtime's own MoE kernels (not TensorRT)"),
)}
EXPORT_LOWERINGS = tuple(name for name, info in LOWERINGS.items() if info.exported)


def describe_export_lowerings() -> str:
    return "; ".join(f"{name}: {LOWERINGS[name].summary}" for name in EXPORT_LOWERINGS)

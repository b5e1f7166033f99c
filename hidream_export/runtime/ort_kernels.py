"""What ONNX Runtime's kernels can run: checked where a session is created, so that a graph an execution
provider would compute wrongly is refused with one line instead of returning wrong numbers.

Two rules, both about transformers whose nodes would land on the CPU provider (no CUDA provider listed):

- a bf16 transformer of any lowering: the CPU provider has no bfloat16 TopK (the MoE routing), so the
  session would fail with INVALID_GRAPH from deep inside onnxruntime;
- the `ort` MoE lowering's `com.microsoft.MoE` node, measured against a numpy HiDream MoE:

- fp32: matches to ~1e-6 (every release with the op's current weight layout);
- fp16: returned all zeros in releases 1.23 to 1.31; 1.32.0 matches to fp16 rounding (cosine 0.99998+);
- bf16: no CPU kernel at all (onnxruntime fails to create the session, naming only the node).

Torch-free, and onnxruntime is imported only to read its version when the caller does not give it.
"""

from __future__ import annotations

from typing import Any, Sequence

from hidream_export.errors import BackendUnavailable

# Providers that take the MoE node before the CPU provider does, in every dtype the export writes.
MOE_DEVICE_PROVIDERS = ("CUDAExecutionProvider",)
CPU_FP16_MOE_FIXED = (1, 32)  # the first onnxruntime whose CPU MoE kernel computes fp16 correctly


def provider_names(providers: Sequence[Any] | None) -> list[str]:
    """Names from an onnxruntime providers list (names, or (name, options) pairs); None means CPU only."""
    if not providers:
        return ["CPUExecutionProvider"]
    return [p[0] if isinstance(p, (tuple, list)) else str(p) for p in providers]


def _version_tuple(version: str) -> tuple[int, ...]:
    numbers = []
    for part in str(version).split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        numbers.append(int(digits) if digits else 0)
    return tuple(numbers)


def check_providers(entry: Any, providers: Sequence[Any] | None, where: str = "", version: str | None = None) -> None:
    """Refuse (BackendUnavailable, one line) to run a manifest entry on providers that would compute it
    wrongly or fail deep inside onnxruntime (the rules above); other components and fp32 always pass.
    `entry` is a manifest component (anything with `moe_lowering` and `dtype`); `version` is onnxruntime's
    (default: the installed one). Call it right before creating the InferenceSession."""
    names = provider_names(providers)
    if any(name in MOE_DEVICE_PROVIDERS for name in names) or not hasattr(entry, "moe_lowering"):
        return
    if entry.dtype == "bf16" and entry.moe_lowering != "ort":
        raise BackendUnavailable(f"{where or 'transformer'}: a bf16 transformer does not run on {names}: ONNX "
                                 f"Runtime's CPU provider has no bfloat16 kernel for TopK (the MoE routing); use "
                                 f"--providers CUDAExecutionProvider on a GPU with onnxruntime-gpu, or export "
                                 f"--dtype fp16 or fp32")
    if entry.moe_lowering != "ort" or entry.dtype == "fp32":
        return
    if version is None:
        import onnxruntime

        version = onnxruntime.__version__
    if entry.dtype == "fp16" and _version_tuple(version) >= CPU_FP16_MOE_FIXED:
        return
    reason = ("has no bf16 MoE kernel" if entry.dtype == "bf16" else
              f"computes fp16 MoE as zeros before {'.'.join(map(str, CPU_FP16_MOE_FIXED))} (this is {version})")
    raise BackendUnavailable(f"{where or 'transformer'}: a {entry.dtype} --moe ort graph cannot run on ONNX Runtime's "
                             f"CPU provider, which {reason}; use the CUDA provider (onnxruntime-gpu), or export with "
                             f"--moe gather")

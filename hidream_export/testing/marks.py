"""pytest marks that skip a test with doctor's reason, so a skipped test says exactly what
`hidream-export doctor` says about this machine."""

from __future__ import annotations

import pytest

from hidream_export.doctor import cached

__all__ = ["tensorrt_skip_reason", "gpu_skip_reason", "requires_tensorrt", "requires_gpu"]


def tensorrt_skip_reason() -> str | None:
    """None when TensorRT engines can be built and run here, else doctor's reason."""
    target = cached()["build_targets"]["trt_engines"]
    return None if target["available"] else f"TensorRT engines unavailable here: {target['reason']}"


def gpu_skip_reason() -> str | None:
    gpu = cached()["gpu"]
    return None if gpu["available"] else f"no GPU: {gpu['reason']}"


def requires_tensorrt():
    """Skip where TensorRT cannot build/run engines."""
    reason = tensorrt_skip_reason()
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def requires_gpu():
    """Skip where there is no CUDA GPU."""
    reason = gpu_skip_reason()
    return pytest.mark.skipif(reason is not None, reason=reason or "")

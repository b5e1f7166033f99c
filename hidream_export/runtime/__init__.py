"""The torch-free HiDream-I1 runtime: load an engine folder, generate images.

    from hidream_export.runtime import Pipeline

    pipe = Pipeline.from_dir("engines/fast")               # backend="ort" (onnxruntime) by default
    result = pipe("A cat holding a sign", seed=0)
    result.image.save("cat.png")

Needs only numpy, onnxruntime, tokenizers, pillow and tqdm (and safetensors for LoRAs applied at load
time); importing it (or generating with it) never imports torch, and onnxruntime is imported only when a
backend is made.
"""

from .backends import Backend, BackendUnavailable, OrtBackend, Session, available_backends, get_backend, register_backend
from .pipeline import GenerationResult, Pipeline
from .report import Timings
from .text import PromptTruncatedWarning

__all__ = [
    "Backend",
    "BackendUnavailable",
    "GenerationResult",
    "OrtBackend",
    "Pipeline",
    "PromptTruncatedWarning",
    "Session",
    "Timings",
    "available_backends",
    "get_backend",
    "register_backend",
]

"""hidream-export: HiDream-I1 from PyTorch to ONNX, TensorRT and a torch-free runtime."""

__version__ = "0.1.0"

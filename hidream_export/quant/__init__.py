"""Quantized exports: weight-only int8/int4 and FP8 (e4m3) Q/DQ, written while the weights stream.

    scheme.py     what was asked (QuantScheme: part of the export settings key) and what was done
                  (QuantRecord: the manifest field); the names of the tensors a quantized weight becomes.
                  Torch- and numpy-free (the runtime reads manifests).
    policy.py     which weights stay in the export dtype, and why.
    graph.py      the ONNX rewrite of a weightless graph: each quantized linear weight becomes a
                  DequantizeLinear (opset 21) feeding its MatMul/Gemm; FP8 adds a Q/DQ pair on the input.
    weights.py    the arithmetic, tensor by tensor as the weights stream: ONNX Runtime's block quantization
                  kernels for int4/int8, ModelOpt's FP8 tensor quantizer for FP8.
    calibrate.py  `hidream-export calibrate`: activation ranges for FP8 from a ModelOpt max calibration of
                  the reference model over the sampling trajectory of a prompt file (amax.json).

The package imports nothing at import time; each module imports what it needs.
"""

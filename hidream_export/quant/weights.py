"""The arithmetic of a quantized export, one weight at a time, as the weights stream.

The codes and scales come from the libraries made for them, never from code of ours:

    int4   onnxruntime's `quantize_qdq_matmul_4bits` (the MLAS kernel behind its MatMulNBits quantizer, in the
           DequantizeLinear layout: INT4 [in, out], scales [in / block, out]);
    int8   onnxruntime's `quantize_matmul_8bits` (MatMulNBits layout, symmetric: codes + 128 as uint8), whose
           codes and scales are moved into the same DequantizeLinear layout;
    fp8    ModelOpt's `FP8QTensor.quantize` (scale = amax / 448 per output channel, cast to e4m3fn).

Streaming: a weight W [out, in] arrives as bytes in pieces; it is cut into chunks of whole rows (about
8 MiB each) and each chunk is quantized on its own. That is exact, because every block and every channel
lies inside one row. Only the quantized weight (at most half or a quarter of the float one) is held until it
is written, because it is stored transposed ([in, out], as MatMul takes it) and each chunk fills columns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from hidream_export.errors import ExportError
from hidream_export.quant.scheme import (FP8_MAX, INPUT_SCALE, QWEIGHT, WEIGHT_SCALE, CalibrationTable, QuantScheme,
                                         parse_quant_name)

CHUNK_BYTES = 8 * 2**20


def scale_array(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 scales in the export dtype (a DequantizeLinear's output type is its scale's type)."""
    if dtype == "fp32":
        return values.astype(np.float32)
    if dtype == "fp16":
        return values.astype(np.float16)
    import ml_dtypes

    return values.astype(ml_dtypes.bfloat16)


def quantize_rows(rows: np.ndarray, scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray]:
    """Quantize `rows` (float32 [r, in], whole rows of W) -> (codes, scales) in the stored layout:
    int4 codes packed [in, r / 2] uint8 (two signed nibbles per byte, low first), int8 codes int8 [in, r],
    fp8 codes e4m3fn bits uint8 [in, r]; scales [in / block, r] (int) or [r] (fp8), float32."""
    r, k = rows.shape
    if scheme.scheme == "fp8":
        return _fp8_rows(rows)
    from onnxruntime.capi._pybind_state import quantize_matmul_8bits, quantize_qdq_matmul_4bits

    block = scheme.block_size
    k_blocks = k // block
    columns = np.ascontiguousarray(rows.T)  # [in, r]: the kernels quantize a MatMul's B
    if scheme.scheme == "int4":
        packed = np.zeros((k * r + 1) // 2, dtype=np.uint8)
        scales = np.zeros((k_blocks, r), dtype=np.float32)
        zero_points = np.zeros((r * k_blocks + 1) // 2, dtype=np.uint8)  # unused: symmetric
        quantize_qdq_matmul_4bits(packed, columns, scales, zero_points, block, r, k, True)
        return packed.reshape(k, r // 2), scales
    packed = np.zeros((r, k_blocks, block), dtype=np.uint8)
    scales = np.zeros((r, k_blocks), dtype=np.float32)
    zero_points = np.zeros((r, k_blocks), dtype=np.uint8)  # unused: symmetric (implied 128)
    quantize_matmul_8bits(packed, columns, scales, zero_points, block, r, k, True)
    codes = (packed.reshape(r, k).astype(np.int16) - 128).astype(np.int8)
    return np.ascontiguousarray(codes.T), np.ascontiguousarray(scales.T)


def _fp8_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch
    from modelopt.torch.quantization.qtensor import FP8QTensor

    w = torch.from_numpy(rows)
    # An all-zero row would get scale 0 (and 0/0 codes); any positive scale encodes it exactly.
    amax = w.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny * FP8_MAX)
    qtensor, scales = FP8QTensor.quantize(w, scales=amax / FP8_MAX, axis=0)
    codes = qtensor._quantized_data.view(torch.uint8).numpy()
    return np.ascontiguousarray(codes.T), scales.reshape(-1).numpy().astype(np.float32)


@dataclass
class QuantizedWeight:
    """One weight's codes ([in, out] layout, bytes as stored) and float32 scales."""

    codes: np.ndarray
    scales: np.ndarray


def quantize_weight(shape: tuple[int, int], pieces: Iterable[bytes | memoryview], scheme: QuantScheme,
                    name: str = "") -> QuantizedWeight:
    """Quantize a float32 weight [out, in] given as its bytes in pieces (any piece boundaries), chunk of rows
    by chunk of rows; returns its codes and scales in the DequantizeLinear layout."""
    out_dim, in_dim = shape
    check_block(name, shape, scheme)
    if scheme.scheme == "int4" and out_dim % 2:
        raise ExportError(f"--quant int4: weight {name!r} has {out_dim} output channels; INT4 [in, out] packs "
                          f"two per byte, so an even count is needed")
    if scheme.scheme == "int4":
        codes = np.empty((in_dim, out_dim // 2), dtype=np.uint8)
    else:
        codes = np.empty((in_dim, out_dim), dtype=np.int8 if scheme.scheme == "int8" else np.uint8)
    scales = np.empty((out_dim,) if scheme.scheme == "fp8" else (in_dim // scheme.block_size, out_dim), np.float32)
    row_bytes = in_dim * 4
    rows_per_chunk = max(2, CHUNK_BYTES // row_bytes // 2 * 2)
    start = 0
    for rows in _row_chunks(pieces, in_dim, rows_per_chunk):
        r = rows.shape[0]
        c, s = quantize_rows(rows, scheme)
        if scheme.scheme == "int4":
            codes[:, start // 2:(start + r) // 2] = c
        else:
            codes[:, start:start + r] = c
        scales[..., start:start + r] = s
        start += r
    if start != out_dim:
        raise ValueError(f"weight {name!r}: got {start} rows, expected {out_dim}")
    return QuantizedWeight(codes, scales)


def _row_chunks(pieces: Iterable[bytes | memoryview], in_dim: int, rows_per_chunk: int) -> Iterator[np.ndarray]:
    """Whole float32 rows, `rows_per_chunk` at a time (the last chunk may be shorter, but stays even in
    length whenever the row count is), from bytes in arbitrary pieces."""
    chunk_bytes = rows_per_chunk * in_dim * 4
    buffer = bytearray()
    for piece in pieces:
        buffer += piece
        while len(buffer) >= chunk_bytes:
            yield np.frombuffer(bytes(buffer[:chunk_bytes]), dtype=np.float32).reshape(rows_per_chunk, in_dim)
            del buffer[:chunk_bytes]
    if buffer:
        if len(buffer) % (in_dim * 4):
            raise ValueError(f"{len(buffer)} trailing bytes are not whole rows of {in_dim} float32")
        yield np.frombuffer(bytes(buffer), dtype=np.float32).reshape(-1, in_dim)


def check_block(name: str, shape: tuple[int, ...], scheme: QuantScheme, flag: str = "--quant") -> None:
    """One line for a weight the scheme cannot quantize: not 2-D, or an input dim the block does not divide."""
    if len(shape) != 2:
        raise ExportError(f"{flag} {scheme.scheme}: weight {name!r} has shape {list(shape)}; only 2-D linear "
                          f"weights are quantized")
    if scheme.block_size and shape[1] % scheme.block_size:
        raise ExportError(f"{flag} {scheme.scheme} --quant-block {scheme.block_size}: weight {name!r} has input "
                          f"dimension {shape[1]}, which {scheme.block_size} does not divide; pick a block size that "
                          f"divides it")


class QuantFetch:
    """`fetch(name)` for the quantizer's initializers (streaming.stream_weights calls it per slot).

    `float_pieces(weight_name)` gives the float weight as (shape, float32 byte pieces). A weight is quantized
    when its codes are asked for; its scales, asked for next, come from the same pass (asked for alone, e.g.
    when a resumed export starts at the scales, the weight is quantized again)."""

    def __init__(self, scheme: QuantScheme, dtype: str,
                 float_pieces: Callable[[str], tuple[tuple[int, ...], Iterable[bytes]]],
                 weight_of: Callable[[str], str], calibration: CalibrationTable | None = None):
        self.scheme, self.dtype = scheme, dtype
        self.float_pieces, self.weight_of, self.calibration = float_pieces, weight_of, calibration
        self._last: tuple[str, QuantizedWeight] | None = None

    def __call__(self, name: str):
        """(shape, bytes) of the named initializer, or None when it is not one of the quantizer's."""
        parsed = parse_quant_name(name)
        if parsed is None:
            return None
        module, role = parsed
        if role == INPUT_SCALE:
            if self.calibration is None:
                raise ExportError(f"{name}: an FP8 input scale, but no --calibration file was given")
            value = np.array(self.calibration.input_amax(module) / FP8_MAX, dtype=np.float32)
            return (), scale_array(value, self.dtype).tobytes()
        if self._last is None or self._last[0] != module:
            self._last = None  # free the previous weight first
            weight = self.weight_of(module)
            shape, pieces = self.float_pieces(weight)
            self._last = (module, quantize_weight(tuple(shape), pieces, self.scheme, weight))
        q = self._last[1]
        if role == QWEIGHT:
            return (q.codes.shape[0], q.codes.shape[1] * (2 if self.scheme.scheme == "int4" else 1)), _bytes(q.codes)
        assert role == WEIGHT_SCALE
        scales = scale_array(q.scales, self.dtype)
        self._last = None  # the scales are the last thing asked of a weight
        return scales.shape, _bytes(scales)


def _bytes(array: np.ndarray) -> memoryview:
    # As raw bytes: the buffer protocol knows no bfloat16 (ml_dtypes' scales in a bf16 export).
    return memoryview(np.ascontiguousarray(array).view(np.uint8).reshape(-1))

"""Arrays that live where ONNX Runtime runs the models, so the sampling loop never copies through the host.

On the CUDA provider, feeding numpy arrays to every transformer step copies the latents and the text
embeddings to the GPU and the prediction back, once per step. Here they stay on the device instead:
``DeviceArray`` wraps an ``OrtValue`` on the session's device, and its arithmetic (``+ - * /``, negation,
``astype``, row slicing) runs there as one-operator ONNX graphs through I/O binding. The numpy schedulers
and the CFG mix are written with plain operators, so the same code drives numpy arrays and DeviceArrays,
and each operator is the same IEEE operation in the same dtype: on the CPU provider the device loop gives
the numpy loop's images bit for bit (a test holds that).

Numpy's rules for scalars are kept: a Python number takes the array's dtype, a numpy scalar must already
have it (numpy would widen the result instead, which the device loop refuses rather than imitate).

No ``onnx`` package at run time: the one-operator graphs are written directly as protobuf bytes (the
ONNX ``ModelProto`` fields they need), and onnxruntime is imported only when a Device is made.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping

import numpy as np

from hidream_export.errors import BackendUnavailable

__all__ = ["ORT_ELEMENT_NAMES", "Device", "DeviceArray", "bfloat16_dtype", "concat_rows", "device_for", "numpy_dtype",
           "op_model_bytes"]

# The operator set the one-operator graphs use; every operator below has had its current form since 13.
_OPSET = 17
_IR_VERSION = 8

# ONNX TensorProto element types, by numpy dtype name.
_ONNX_TYPES = {"float32": 1, "uint8": 2, "int8": 3, "int32": 6, "int64": 7, "bool": 9, "float16": 10,
               "float64": 11, "bfloat16": 16}


# --- protobuf writing (just the ModelProto fields a one-operator graph needs) -------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # negative int64s are written as their two's complement
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field_int(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _field_bytes(number: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _value_info(name: str, elem_type: int, rank: int) -> bytes:
    shape = b"".join(_field_bytes(1, b"") for _ in range(rank))  # `rank` dimensions of unknown size
    tensor_type = _field_int(1, elem_type) + _field_bytes(2, shape)
    return _field_bytes(1, name) + _field_bytes(2, _field_bytes(1, tensor_type))


def _attribute(name: str, value: int) -> bytes:
    return _field_bytes(1, name) + _field_int(3, value) + _field_int(20, 2)  # i, type = INT


def op_model_bytes(op_type: str, inputs: list[tuple[str, str, int]], output: tuple[str, str, int],
                   attributes: Mapping[str, int] | None = None) -> bytes:
    """A serialized ONNX model with one node, ``output = op_type(*inputs)``; each value as (name, numpy dtype
    name, rank)."""
    node = b"".join(_field_bytes(1, name) for name, _, _ in inputs) + _field_bytes(2, output[0])
    node += _field_bytes(3, op_type.lower()) + _field_bytes(4, op_type)
    node += b"".join(_field_bytes(5, _attribute(k, v)) for k, v in (attributes or {}).items())
    graph = _field_bytes(1, node) + _field_bytes(2, f"hidream_{op_type.lower()}")
    graph += b"".join(_field_bytes(11, _value_info(name, _ONNX_TYPES[dtype], rank)) for name, dtype, rank in inputs)
    graph += _field_bytes(12, _value_info(output[0], _ONNX_TYPES[output[1]], output[2]))
    opset = _field_bytes(1, "") + _field_int(2, _OPSET)
    return (_field_int(1, _IR_VERSION) + _field_bytes(2, "hidream-export") + _field_bytes(7, graph)
            + _field_bytes(8, opset))


# --- the device -------------------------------------------------------------------------------------

class Device:
    """An ONNX Runtime device ("cpu", or "cuda" with an id) and the one-operator sessions that compute there.

    Made by ``OrtBackend.device()`` for the backend's first execution provider. Sessions are made on
    first use per (operator, dtypes) and shared by threads (ONNX Runtime's run is thread-safe; each call
    binds its own inputs and outputs).
    """

    def __init__(self, ort: Any, providers: list[Any], device_type: str, device_id: int = 0):
        self._ort = ort
        self.providers = providers
        self.device_type = device_type
        self.device_id = device_id
        self._sessions: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Device({self.device_type}:{self.device_id})"

    # -- moving data ------------------------------------------------------------------------------------
    def upload(self, array: Any) -> "DeviceArray":
        """A copy of a host array on this device (bfloat16 arrays go as their 16-bit words)."""
        arr = np.ascontiguousarray(array)
        if arr.dtype.name not in _ONNX_TYPES:
            raise TypeError(f"cannot place a {arr.dtype} array on {self}; expected one of {sorted(_ONNX_TYPES)}")
        if arr.dtype.name == "bfloat16":
            if self.device_type != "cpu":  # exact: every bfloat16 is a float32
                return self.upload(arr.astype(np.float32)).astype(arr.dtype)
            value = self._ort.OrtValue.ortvalue_from_numpy_with_onnx_type(arr.view(np.uint16).copy(), 16)
        else:
            value = self._ort.OrtValue.ortvalue_from_numpy(arr.copy(), self.device_type, self.device_id)
        return DeviceArray(self, value, arr.dtype)

    def wrap(self, value: Any) -> "DeviceArray":
        """A DeviceArray for an OrtValue a session returned on this device."""
        return DeviceArray(self, value, _dtype_of(value))

    # -- arithmetic ---------------------------------------------------------------------------------------
    def _session(self, op_type: str, ins: tuple[tuple[str, int], ...], out: tuple[str, int], attributes: tuple):
        key = (op_type, ins, out, attributes)
        session = self._sessions.get(key)
        if session is None:
            with self._lock:
                session = self._sessions.get(key)
                if session is None:
                    model = op_model_bytes(op_type, [(f"x{i}", *x) for i, x in enumerate(ins)], ("y", *out),
                                           dict(attributes))
                    opts = self._ort.SessionOptions()
                    opts.log_severity_level = 3
                    # One operator: nothing to optimise, and no rewrite may change its rounding.
                    opts.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                    session = self._ort.InferenceSession(model, sess_options=opts, providers=self.providers)
                    self._sessions[key] = session
        return session

    def run_op(self, op_type: str, inputs: list[Any], out_dtype: str, out_rank: int, **attributes: int
               ) -> "DeviceArray":
        """``op_type(*inputs)`` on this device; inputs are DeviceArrays or host numpy arrays (small ones:
        scalars, shapes and slice bounds, which ONNX Runtime copies where the kernel needs them)."""
        ins = tuple((np.dtype(x.dtype).name, len(x.shape)) for x in inputs)
        session = self._session(op_type, ins, (out_dtype, out_rank), tuple(sorted(attributes.items())))
        binding = session.io_binding()
        for i, x in enumerate(inputs):
            if isinstance(x, DeviceArray):
                x._check_device(self)
                binding.bind_ortvalue_input(f"x{i}", x.value)
            else:
                binding.bind_cpu_input(f"x{i}", np.ascontiguousarray(x))
        binding.bind_output("y", self.device_type, self.device_id)
        session.run_with_iobinding(binding)
        return DeviceArray(self, binding.get_outputs()[0], numpy_dtype(out_dtype))


def bfloat16_dtype() -> np.dtype:
    """ml_dtypes' bfloat16 (numpy has none), or one line saying what to install."""
    try:
        import ml_dtypes
    except ImportError:
        raise BackendUnavailable(
            "this model takes or returns bfloat16 tensors, which numpy cannot hold; install ml_dtypes "
            "(pip install ml_dtypes) or export the model as fp16/fp32") from None
    return np.dtype(ml_dtypes.bfloat16)


def numpy_dtype(name: str) -> np.dtype:
    """A numpy dtype by name, bfloat16 included."""
    return bfloat16_dtype() if name == "bfloat16" else np.dtype(name)


# ONNX tensor element types as onnxruntime spells them (session inputs, OrtValues), by numpy dtype name.
ORT_ELEMENT_NAMES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
                     "tensor(bfloat16)": "bfloat16", "tensor(int64)": "int64", "tensor(int32)": "int32",
                     "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def _dtype_of(value: Any) -> np.dtype:
    name = ORT_ELEMENT_NAMES.get(value.data_type())
    if name is None:
        raise TypeError(f"an OrtValue of type {value.data_type()} is not a DeviceArray dtype")
    return numpy_dtype(name)


def _operator(op_type: str, reflected: bool = False):
    """A binary numpy operator of DeviceArray as one ONNX operator (``reflected``: ``other op self``)."""
    def method(self: "DeviceArray", other: Any):
        return self._binary(op_type, other, reflected)

    method.__name__ = f"__{'r' if reflected else ''}{op_type.lower().replace('div', 'truediv')}__"
    return method


class DeviceArray:
    """An array on a Device with numpy's operators (see the module docstring). Immutable: every
    operation returns a new array, so the schedulers' history never aliases what the caller holds."""

    __array_ufunc__ = None  # numpy scalars defer to our reflected operators (np.float32(2) * a)

    def __init__(self, device: Device, value: Any, dtype: np.dtype):
        self.device = device
        self.value = value
        self.dtype = np.dtype(dtype)
        self.shape = tuple(value.shape())

    def __repr__(self) -> str:
        return f"DeviceArray({self.shape}, {self.dtype}, {self.device})"

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _check_device(self, device: Device) -> None:
        if self.device is not device:
            raise ValueError(f"{self} is on another Device than {device}")

    def numpy(self) -> np.ndarray:
        """A host copy."""
        if self.dtype.name == "bfloat16":
            return self.astype(np.float32).numpy().astype(self.dtype)
        return np.array(self.value.numpy(), copy=True)

    # -- numpy's operators, one ONNX operator each -------------------------------------------------------
    def _operand(self, other: Any) -> Any:
        if isinstance(other, DeviceArray):
            other._check_device(self.device)
            if other.dtype != self.dtype:
                raise TypeError(f"{self} and {other}: numpy would promote mixed dtypes; cast one first")
            return other
        if isinstance(other, np.ndarray) and other.ndim > 0:
            raise TypeError(f"{self}: upload host arrays with Device.upload before mixing them in")
        if isinstance(other, (np.generic, np.ndarray)) and np.dtype(other.dtype) != self.dtype:
            raise TypeError(f"{self}: a {np.dtype(other.dtype)} scalar would widen the result in numpy; pass a "
                            f"{self.dtype} scalar")
        if not isinstance(other, (int, float, np.generic, np.ndarray)) or isinstance(other, bool):
            return NotImplemented
        return np.asarray(other, dtype=self.dtype)

    def _binary(self, op_type: str, other: Any, reflected: bool = False):
        operand = self._operand(other)
        if operand is NotImplemented:
            return NotImplemented
        inputs = [operand, self] if reflected else [self, operand]
        return self.device.run_op(op_type, inputs, self.dtype.name, self.ndim)

    __add__ = _operator("Add")
    __radd__ = _operator("Add", reflected=True)
    __sub__ = _operator("Sub")
    __rsub__ = _operator("Sub", reflected=True)
    __mul__ = _operator("Mul")
    __rmul__ = _operator("Mul", reflected=True)
    __truediv__ = _operator("Div")
    __rtruediv__ = _operator("Div", reflected=True)

    def __neg__(self):
        return self.device.run_op("Neg", [self], self.dtype.name, self.ndim)

    def astype(self, dtype: Any, copy: bool = True) -> "DeviceArray":
        """numpy's astype (round to nearest even, as numpy and ml_dtypes do)."""
        dtype = np.dtype(dtype)
        if dtype == self.dtype:
            return self.copy() if copy else self
        return self.device.run_op("Cast", [self], dtype.name, self.ndim, to=_ONNX_TYPES[dtype.name])

    def copy(self) -> "DeviceArray":
        return self.device.run_op("Identity", [self], self.dtype.name, self.ndim)

    def __getitem__(self, key: Any) -> "DeviceArray":
        """Rows ``a[start:stop]`` (axis 0, step 1), the one indexing the sampling loop uses."""
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"{self}: only a[start:stop] along the first axis is supported, got {key!r}")
        start, stop, _ = key.indices(self.shape[0])
        if (start, stop) == (0, self.shape[0]):
            return self  # numpy returns a view with the same values; arrays here are immutable
        bounds = [np.array([start], np.int64), np.array([max(stop, start)], np.int64), np.array([0], np.int64)]
        return self.device.run_op("Slice", [self, *bounds], self.dtype.name, self.ndim)

    def repeat_rows(self, n: int) -> "DeviceArray":
        """``np.repeat(a, n, axis=0)`` for a one-row array: n copies of the row."""
        if self.shape[0] != 1:
            raise ValueError(f"{self}: repeat_rows takes a one-row array")
        if n == 1:
            return self
        return self.device.run_op("Expand", [self, np.array([n, *self.shape[1:]], np.int64)], self.dtype.name,
                                  self.ndim)


def concat_rows(arrays: list[DeviceArray]) -> DeviceArray:
    """``np.concatenate(arrays, axis=0)`` for arrays of one dtype on one device."""
    if len(arrays) == 1:
        return arrays[0]
    first = arrays[0]
    for other in arrays[1:]:
        first._operand(other)  # same device, same dtype
    return first.device.run_op("Concat", list(arrays), first.dtype.name, first.ndim, axis=0)


def device_for(ort: Any, providers: list[Any]) -> Device:
    """The Device of a provider list's first provider: CPU memory, or a CUDA device (its ``device_id``)."""
    first = providers[0] if providers else "CPUExecutionProvider"
    name, options = (first[0], dict(first[1])) if isinstance(first, (tuple, list)) else (first, {})
    if name == "CUDAExecutionProvider":
        return Device(ort, providers, "cuda", int(options.get("device_id", 0)))
    if name == "CPUExecutionProvider":
        return Device(ort, providers, "cpu", 0)
    raise BackendUnavailable(f"I/O binding supports the CUDA and CPU execution providers, not {name}; run with "
                             f"io_binding=False (--no-io-binding)")

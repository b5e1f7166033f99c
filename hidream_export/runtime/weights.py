"""The initializers of an exported ONNX graph as the runtime sees them when it changes weights (LoRA):
name, element type, shape and where each lives in the external data file, with values memory-mapped.

The runtime does not depend on onnx, so the graph is read with the protobuf library (which onnxruntime
itself requires) and a schema that declares only the fields read here, under onnx.proto's field numbers;
protobuf skips every other field of the file. Weights are never read from the protobuf itself: only
initializers stored as external data can be replaced (that is also what onnxruntime's
`add_external_initializers` accepts), and every exported transformer weight is one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from hidream_export.errors import ManifestError

__all__ = ["Initializer", "read_initializers", "initializer_value", "ONNX_ELEMENT_TYPES"]

# TensorProto.DataType -> numpy dtype, for the weight types an export writes.
ONNX_ELEMENT_TYPES = {1: np.dtype(np.float32), 10: np.dtype(np.float16), 11: np.dtype(np.float64),
                      16: np.dtype(ml_dtypes.bfloat16)}
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_PACKAGE = "hidream_export_onnx_subset"


@dataclass(frozen=True)
class Initializer:
    """One graph initializer: its type and shape, and (when stored as external data) its file and bytes."""

    name: str
    data_type: int  # TensorProto.DataType
    shape: tuple[int, ...]
    location: str | None  # the external data file, relative to the graph's folder; None: inside the graph
    offset: int = 0
    length: int = 0

    @property
    def dtype(self) -> np.dtype | None:
        return ONNX_ELEMENT_TYPES.get(self.data_type)


@functools.lru_cache(maxsize=1)
def _model_class():
    """A ModelProto message class knowing only graph.initializer's name/type/dims/external data."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name=f"{_PACKAGE}.proto", package=_PACKAGE, syntax="proto2")

    def message(name: str, fields) -> None:
        msg = proto.message_type.add(name=name)
        for field_name, number, kind, repeated, type_name in fields:
            f = msg.field.add(name=field_name, number=number, type=kind,
                              label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
            if type_name:
                f.type_name = f".{_PACKAGE}.{type_name}"

    message("StringStringEntryProto", [("key", 1, F.TYPE_STRING, False, None), ("value", 2, F.TYPE_STRING, False, None)])
    message("TensorProto", [("dims", 1, F.TYPE_INT64, True, None), ("data_type", 2, F.TYPE_INT32, False, None),
                            ("name", 8, F.TYPE_STRING, False, None),
                            ("external_data", 13, F.TYPE_MESSAGE, True, "StringStringEntryProto"),
                            ("data_location", 14, F.TYPE_INT32, False, None)])
    message("GraphProto", [("initializer", 5, F.TYPE_MESSAGE, True, "TensorProto")])
    message("ModelProto", [("graph", 7, F.TYPE_MESSAGE, False, "GraphProto")])
    pool = descriptor_pool.DescriptorPool()  # not the default pool: onnx's own ModelProto may live there
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.ModelProto"))


def read_initializers(onnx_path: str | Path) -> dict[str, Initializer]:
    """Every initializer of the graph at `onnx_path`, by name (reads the protobuf, never the weights)."""
    from google.protobuf.message import DecodeError

    onnx_path = Path(onnx_path)
    model = _model_class()()
    try:
        model.ParseFromString(onnx_path.read_bytes())
    except DecodeError as exc:
        raise ManifestError(f"{onnx_path}: not an ONNX graph protobuf ({exc})") from None
    out = {}
    for init in model.graph.initializer:
        location, offset, length = None, 0, 0
        if init.data_location == _EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            location = info.get("location")
            offset = int(info.get("offset", 0))
            length = int(info.get("length", 0))
        out[init.name] = Initializer(init.name, init.data_type, tuple(int(d) for d in init.dims), location, offset,
                                     length)
    return out


def initializer_value(data_path: Path, init: Initializer) -> np.ndarray:
    """The values of an external-data initializer, memory-mapped read-only from `data_path` (the file its
    `location` names, resolved by the caller inside the engine folder)."""
    dtype = init.dtype
    if dtype is None or init.location is None:
        raise ManifestError(f"initializer {init.name!r} is not a float weight in external data")
    count = int(np.prod(init.shape, dtype=np.int64))
    length = init.length or count * dtype.itemsize
    if length != count * dtype.itemsize:
        raise ManifestError(f"{data_path}: initializer {init.name!r} {dtype}{list(init.shape)} needs "
                            f"{count * dtype.itemsize} bytes, its external data entry says {length}")
    size = data_path.stat().st_size
    if init.offset + length > size:
        raise ManifestError(f"{data_path}: initializer {init.name!r} ends at byte {init.offset + length}, the file "
                            f"has {size}")
    raw = np.memmap(data_path, dtype=np.uint8, mode="r", offset=init.offset, shape=(length,))
    return raw.view(dtype).reshape(init.shape)

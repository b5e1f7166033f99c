"""What the lint knows about the tensors of a graph (types, shapes, constants, scoped for subgraphs), and
the per-node view handed to the checks. External data is never read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from hidream_export.lint.table import DEFAULT_DOMAINS

# --------------------------------------------------------------------------------------------------------------
# What we know about tensors


Shape = tuple  # of int | str (dim_param) | None (unknown)


def shape_of(type_proto) -> tuple[int | None, Shape | None]:
    if not type_proto.HasField("tensor_type"):
        return None, None
    tt = type_proto.tensor_type
    elem = tt.elem_type or None
    if not tt.HasField("shape"):
        return elem, None
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
    return elem, dims


class Scope:
    """Tensor types, shapes and constants visible in one graph; subgraphs see their parents' names."""

    def __init__(self, parent: "Scope | None" = None):
        self.parent = parent
        self.types: dict[str, tuple[int | None, Shape | None]] = {}
        self.consts: dict[str, TensorProto] = {}   # initializers and Constant-node tensors
        self.const_names: set[str] = set()          # also Constant nodes with value_int(s)/value_float(s)
        self.graph_io: set[str] = set()

    def add_value_info(self, vi) -> None:
        elem, shape = shape_of(vi.type)
        if elem is not None or shape is not None:
            old = self.types.get(vi.name, (None, None))
            self.types[vi.name] = (elem or old[0], shape if shape is not None else old[1])

    def add_tensor(self, name: str, tensor: TensorProto) -> None:
        self.consts[name] = tensor
        self.const_names.add(name)
        self.types[name] = (tensor.data_type or None, tuple(tensor.dims))

    def _chain(self) -> Iterator["Scope"]:
        scope = self
        while scope is not None:
            yield scope
            scope = scope.parent

    def lookup(self, name: str) -> tuple[int | None, Shape | None]:
        return next((s.types[name] for s in self._chain() if name in s.types), (None, None))

    def is_const(self, name: str) -> bool:
        return any(name in s.const_names for s in self._chain())

    def const_tensor(self, name: str) -> TensorProto | None:
        return next((s.consts[name] for s in self._chain() if name in s.consts), None)

    def is_graph_io(self, name: str) -> bool:
        return any(name in s.graph_io for s in self._chain())


def fill_scope(scope: Scope, graph: onnx.GraphProto) -> None:
    for vi in list(graph.input) + list(graph.output):
        scope.add_value_info(vi)
        scope.graph_io.add(vi.name)
    for vi in graph.value_info:
        scope.add_value_info(vi)
    for init in graph.initializer:
        scope.add_tensor(init.name, init)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and node.output:
            out = node.output[0]
            for attr in node.attribute:
                if attr.name == "value" and attr.type == AttributeProto.TENSOR:
                    scope.add_tensor(out, attr.t)
                elif attr.name in ("value_int", "value_ints", "value_float", "value_floats"):
                    scope.const_names.add(out)
                    elem = TensorProto.INT64 if "int" in attr.name else TensorProto.FLOAT
                    scope.types.setdefault(out, (elem, None))


def inline_array(tensor: TensorProto | None):
    """The constant's values, or None when it lives in external data (never read: the lint must not load it)."""
    if tensor is None or tensor.data_location == TensorProto.EXTERNAL:
        return None
    try:
        return numpy_helper.to_array(tensor)
    except Exception:  # noqa: BLE001 - an odd constant only means one check is skipped
        return None


# --------------------------------------------------------------------------------------------------------------
# Per-node view handed to the checks


@dataclass
class NodeCtx:
    node: onnx.NodeProto
    label: str
    where: str
    scope: Scope
    opset: int

    def attr(self, name: str, default=None):
        for a in self.node.attribute:
            if a.name == name:
                value = helper.get_attribute_value(a)
                return value.decode() if isinstance(value, bytes) else value
        return default

    def has_attr(self, name: str) -> bool:
        return any(a.name == name for a in self.node.attribute)

    def input(self, index: int) -> str:
        return self.node.input[index] if index < len(self.node.input) else ""

    def output(self, index: int) -> str:
        return self.node.output[index] if index < len(self.node.output) else ""

    def elem_type(self, name: str) -> int | None:
        return self.scope.lookup(name)[0] if name else None

    def shape(self, name: str) -> Shape | None:
        return self.scope.lookup(name)[1] if name else None

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def is_const(self, name: str) -> bool:
        return self.scope.is_const(name)

    def const_value(self, name: str):
        return inline_array(self.scope.const_tensor(name))

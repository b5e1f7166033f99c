"""Op-support lint: will TensorRT's ONNX parser accept this graph?

TensorRT cannot be installed on the development and CI machines, so the closest check we can run there is a
comparison of the exported graph against the parser's published operator support matrix (onnx-tensorrt
`docs/operators.md`, transcribed into `hidream_export/data/trt_onnx_ops.json`, which names the TensorRT version it
is for). This module never decides from memory what TensorRT supports: the table is the data, the code only says
what each table entry means for one node.

What it reports (severities: error = the parser or builder is documented to reject it; warning = documented to
be fragile, or something the table does not list; info = what the build must provide, or what was not checked):

* ops the table marks unsupported or does not list at all (error);
* node attributes and inputs the table's "Restrictions" column rules out, e.g. ScatterND with a `reduction`,
  TopK with `sorted=0` (error), and data types the table does not list for an op (warning; a type TensorRT has no
  equivalent for at all is an error);
* DOUBLE (float64) tensors anywhere (error: TensorRT has no fp64; the parser silently casts them down);
* data-dependent shapes (NonZero and its consumers): warnings, since TensorRT builds them but they defeat
  Myelin fusion and are a known source of build failures;
* custom-domain nodes: a node that a registered plugin will implement (by default our `hidream::HiDreamMoE`,
  see `hidream_export.plugins.schema`) is listed as a plugin expectation (info) and its attributes are checked
  against the schema (error on mismatch); any other unknown custom-domain node is an error.

Model-local ONNX functions: when a function has the same name as a plugin node (our ORT fallback body for
`HiDreamMoE`), the TensorRT build removes the function so the parser reaches the plugin (and TensorRT >= 10.7
prefers a registered plugin over a local function anyway). Such a body is therefore linted separately
(`LintReport.shadowed`) and never counts against `ok`. A function with no plugin is inlined by the parser, so its
body is linted like the main graph.

The model is loaded with `load_external_data=False`: a 34 GB transformer lints in seconds, and the lint works on
a graph whose weights file is not even present.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from hidream_export.plugins import schema as moe_schema

__all__ = [
    "ERROR", "WARNING", "INFO",
    "Finding", "LintReport", "LintInputError", "PluginSpec", "OpTable",
    "HIDREAM_MOE_PLUGIN", "DEFAULT_PLUGINS",
    "load_op_table", "lint_onnx", "add_arguments", "run", "main",
]

ERROR = "error"
WARNING = "warning"
INFO = "info"
_SEVERITY_ORDER = {ERROR: 0, WARNING: 1, INFO: 2}

_DEFAULT_DOMAINS = ("", "ai.onnx")

# ONNX element types as the table names them. FLOAT8E4M3FN is TensorRT's only FP8 format; the other FP8
# variants, INT16, UINT16/32/64, STRING and COMPLEX have no TensorRT type and keep their ONNX names, so they
# never match a table entry.
_TABLE_TYPE_NAMES = {
    TensorProto.FLOAT: "FP32",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.DOUBLE: "DOUBLE",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.INT8: "INT8",
    TensorProto.UINT8: "UINT8",
    TensorProto.BOOL: "BOOL",
    TensorProto.INT4: "INT4",
    TensorProto.FLOAT8E4M3FN: "FP8",
    TensorProto.FLOAT4E2M1: "FP4",
}
# The table's global list spells some types differently from its per-op column.
_GLOBAL_TYPE_ALIASES = {"FLOAT32": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16"}


def _flat(text: str) -> str:
    """Restriction text as one line (the table separates some clauses with HTML line breaks)."""
    return " ".join(text.replace("<br />", " ").split())


def _type_name(elem_type: int) -> str:
    if elem_type in _TABLE_TYPE_NAMES:
        return _TABLE_TYPE_NAMES[elem_type]
    return helper.tensor_dtype_to_string(elem_type).replace("TensorProto.", "")


# --------------------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class OpEntry:
    """One row of the parser's support matrix, as transcribed."""

    name: str
    supported: bool
    types: tuple[str, ...]
    restrictions: str


@dataclass(frozen=True)
class OpTable:
    """The transcribed support matrix plus the TensorRT custom ops, read from the packaged JSON."""

    tensorrt_version: str
    opset_range: tuple[int, int]
    supported_types: frozenset[str]
    ops: Mapping[str, OpEntry]
    custom_ops: Mapping[str, Mapping]
    source: Mapping

    @classmethod
    def from_json(cls, data: Mapping) -> "OpTable":
        ops = {name: OpEntry(name, bool(row["supported"]), tuple(row.get("types", ())), row.get("restrictions", ""))
               for name, row in data["operators"].items()}
        types = frozenset(_GLOBAL_TYPE_ALIASES.get(t, t) for t in data["supported_data_types"])
        lo, hi = data["opset_range"]
        return cls(tensorrt_version=str(data["source"]["tensorrt_version"]), opset_range=(int(lo), int(hi)),
                   supported_types=types, ops=ops, custom_ops=dict(data.get("custom_ops", {}).get("ops", {})),
                   source=dict(data["source"]))


@lru_cache(maxsize=4)
def _load_packaged_table() -> OpTable:
    text = resources.files("hidream_export").joinpath("data/trt_onnx_ops.json").read_text(encoding="utf-8")
    return OpTable.from_json(json.loads(text))


def load_op_table(path: str | Path | None = None) -> OpTable:
    """The packaged table, or another transcription (e.g. for a different TensorRT version) from `path`."""
    if path is None:
        return _load_packaged_table()
    return OpTable.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


# --------------------------------------------------------------------------------------------------------------
# Plugins the build will register


@dataclass(frozen=True)
class PluginSpec:
    """A plugin that the TensorRT build registers, so that nodes of this `op_type` reach it.

    The parser's fallback importer looks plugins up by node `op_type`, the string attribute `plugin_version`
    (default "1") and `plugin_namespace` (default ""); since TensorRT 10.10 it also reads the namespace from the
    node's domain. `attributes` maps each attribute the plugin expects to its ONNX attribute type; `validate`
    may add op-specific checks."""

    op_type: str
    namespace: str = ""
    version: str = "1"
    domain: str | None = None
    attributes: Mapping[str, int] = field(default_factory=dict)
    num_inputs: int | None = None
    num_outputs: int | None = None
    validate: Callable[["_NodeCtx"], Iterable[tuple[str, str]]] | None = None

    @property
    def plugin_id(self) -> str:
        return f"{self.namespace}::{self.op_type}" if self.namespace else self.op_type

    @classmethod
    def parse(cls, text: str) -> "PluginSpec":
        """'namespace::OpType' or 'namespace::OpType:version' (no attribute checks)."""
        ns, _, rest = text.rpartition("::")
        name, _, version = rest.partition(":")
        return cls(op_type=name, namespace=ns, version=version or "1")


_FLOAT_ACTIVATIONS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}


def _validate_hidream_moe(ctx: "_NodeCtx") -> Iterator[tuple[str, str]]:
    """Checks beyond attribute names/types: values, input dtypes and the six shapes (schema.infer_shapes)."""
    node = ctx.node
    top_k, num_experts = ctx.attr("top_k"), ctx.attr("num_experts")
    if isinstance(top_k, int) and top_k < 1:
        yield ERROR, f"top_k={top_k} must be >= 1"
    if isinstance(num_experts, int) and num_experts < 1:
        yield ERROR, f"num_experts={num_experts} must be >= 1"
    if isinstance(top_k, int) and isinstance(num_experts, int) and top_k > num_experts:
        yield ERROR, f"top_k={top_k} exceeds num_experts={num_experts}"
    if len(node.input) != len(moe_schema.INPUT_NAMES):
        return
    for index, name in enumerate(moe_schema.INPUT_NAMES):
        elem = ctx.elem_type(node.input[index])
        if elem is None:
            continue
        if name == "selected_experts" and elem != TensorProto.INT32:
            yield ERROR, f"input {index} ({name}) is {_type_name(elem)}; the plugin contract requires INT32"
        elif name != "selected_experts" and elem not in _FLOAT_ACTIVATIONS:
            yield ERROR, f"input {index} ({name}) is {_type_name(elem)}; the plugin takes FP32, FP16 or BF16"
    shapes = [ctx.shape(name) for name in node.input]
    if all(s is not None for s in shapes):
        dims = [tuple(moe_schema.AnyDim() if d is None or isinstance(d, str) else d for d in s) for s in shapes]
        try:
            got = moe_schema.infer_shapes(*dims)
        except ValueError as exc:
            yield ERROR, f"input shapes do not fit the plugin contract: {exc}"
            return
        if isinstance(got.top_k, int) and isinstance(top_k, int) and got.top_k != top_k:
            yield ERROR, f"top_k attribute {top_k} != k dimension {got.top_k} of selected_experts"
        if isinstance(got.num_experts, int) and isinstance(num_experts, int) and got.num_experts != num_experts:
            yield ERROR, f"num_experts attribute {num_experts} != E dimension {got.num_experts} of the weights"


def _attribute_types(example: Mapping[str, object]) -> dict[str, int]:
    """ONNX attribute types of an example attribute dict, so the schema module stays the one definition."""
    kinds = {str: AttributeProto.STRING, int: AttributeProto.INT, float: AttributeProto.FLOAT}
    return {name: kinds[type(value)] for name, value in example.items()}


HIDREAM_MOE_PLUGIN = PluginSpec(
    op_type=moe_schema.OP_TYPE,
    namespace=moe_schema.PLUGIN_NAMESPACE,
    version=moe_schema.PLUGIN_VERSION,
    domain=moe_schema.DOMAIN,
    attributes=_attribute_types(moe_schema.node_attributes(top_k=1, num_experts=1)),
    num_inputs=len(moe_schema.INPUT_NAMES),
    num_outputs=len(moe_schema.OUTPUT_NAMES),
    validate=_validate_hidream_moe,
)
DEFAULT_PLUGINS: tuple[PluginSpec, ...] = (HIDREAM_MOE_PLUGIN,)


# --------------------------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class Finding:
    """One thing the lint has to say about one node (or tensor)."""

    severity: str
    op_type: str
    node: str
    message: str
    where: str = "graph"

    def to_dict(self) -> dict:
        return {"severity": self.severity, "op_type": self.op_type, "node": self.node, "where": self.where,
                "message": self.message}

    def format(self) -> str:
        place = f" [{self.where}]" if self.where != "graph" else ""
        return f"{self.severity.upper():7s} {self.op_type} '{self.node}'{place}: {self.message}"


@dataclass
class LintReport:
    """Findings for the graph TensorRT will parse, plus (separately) function bodies a plugin replaces.

    `op_counts` counts the nodes the parser will see, per op type (`domain::op_type` outside the default
    domain), including If/Loop bodies and inlined model-local functions (once per call)."""

    model: str
    tensorrt_version: str
    source: Mapping
    findings: list[Finding] = field(default_factory=list)
    shadowed: list[Finding] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)
    shadowed_op_counts: dict[str, int] = field(default_factory=dict)

    def _of(self, severity: str) -> list[Finding]:
        return [f for f in self.findings if f.severity == severity]

    @property
    def errors(self) -> list[Finding]:
        return self._of(ERROR)

    @property
    def warnings(self) -> list[Finding]:
        return self._of(WARNING)

    @property
    def infos(self) -> list[Finding]:
        return self._of(INFO)

    @property
    def ok(self) -> bool:
        """No errors in what TensorRT parses (warnings and shadowed function bodies do not count)."""
        return not self.errors

    def summary(self) -> str:
        nodes = sum(self.op_counts.values())
        verdict = "OK" if self.ok else "FAIL"
        return (f"{verdict}: {self.model}: {nodes} nodes in {len(self.op_counts)} op types checked against "
                f"onnx-tensorrt docs/operators.md (TensorRT {self.tensorrt_version}): "
                f"{len(self.errors)} error(s), {len(self.warnings)} warning(s), {len(self.infos)} note(s)")

    def format(self, *, show_info: bool = True) -> str:
        """One line per finding (errors first), then the replaced function bodies, the op counts, a summary."""
        order = sorted(self.findings, key=lambda f: _SEVERITY_ORDER[f.severity])
        lines = [f.format() for f in order if show_info or f.severity != INFO]
        if self.shadowed:
            lines.append("-- model-local function bodies replaced by a plugin (not parsed by TensorRT; not counted):")
            lines += ["   " + f.format() for f in self.shadowed if show_info or f.severity != INFO]
        counts = ", ".join(f"{op} {n}" for op, n in sorted(self.op_counts.items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"ops: {counts or '(none)'}")
        lines.append(self.summary())
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "ok": self.ok,
            "tensorrt_version": self.tensorrt_version,
            "table_source": dict(self.source),
            "counts": {"errors": len(self.errors), "warnings": len(self.warnings), "infos": len(self.infos)},
            "op_counts": dict(sorted(self.op_counts.items())),
            "findings": [f.to_dict() for f in self.findings],
            "shadowed_function_findings": [f.to_dict() for f in self.shadowed],
            "shadowed_function_op_counts": dict(sorted(self.shadowed_op_counts.items())),
        }


class LintInputError(Exception):
    """The file could not be read as an ONNX model."""


# --------------------------------------------------------------------------------------------------------------
# What we know about tensors


_Shape = tuple  # of int | str (dim_param) | None (unknown)


def _shape_of(type_proto) -> tuple[int | None, _Shape | None]:
    if not type_proto.HasField("tensor_type"):
        return None, None
    tt = type_proto.tensor_type
    elem = tt.elem_type or None
    if not tt.HasField("shape"):
        return elem, None
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
    return elem, dims


class _Scope:
    """Tensor types, shapes and constants visible in one graph; subgraphs see their parents' names."""

    def __init__(self, parent: "_Scope | None" = None):
        self.parent = parent
        self.types: dict[str, tuple[int | None, _Shape | None]] = {}
        self.consts: dict[str, TensorProto] = {}   # initializers and Constant-node tensors
        self.const_names: set[str] = set()          # also Constant nodes with value_int(s)/value_float(s)
        self.graph_io: set[str] = set()

    def add_value_info(self, vi) -> None:
        elem, shape = _shape_of(vi.type)
        if elem is not None or shape is not None:
            old = self.types.get(vi.name, (None, None))
            self.types[vi.name] = (elem or old[0], shape if shape is not None else old[1])

    def add_tensor(self, name: str, tensor: TensorProto) -> None:
        self.consts[name] = tensor
        self.const_names.add(name)
        self.types[name] = (tensor.data_type or None, tuple(tensor.dims))

    def _chain(self) -> Iterator["_Scope"]:
        scope = self
        while scope is not None:
            yield scope
            scope = scope.parent

    def lookup(self, name: str) -> tuple[int | None, _Shape | None]:
        return next((s.types[name] for s in self._chain() if name in s.types), (None, None))

    def is_const(self, name: str) -> bool:
        return any(name in s.const_names for s in self._chain())

    def const_tensor(self, name: str) -> TensorProto | None:
        return next((s.consts[name] for s in self._chain() if name in s.consts), None)

    def is_graph_io(self, name: str) -> bool:
        return any(name in s.graph_io for s in self._chain())


def _fill_scope(scope: _Scope, graph: onnx.GraphProto) -> None:
    for vi in list(graph.input) + list(graph.output):
        scope.add_value_info(vi)
        scope.graph_io.add(vi.name)
    for vi in graph.value_info:
        scope.add_value_info(vi)
    for init in graph.initializer:
        scope.add_tensor(init.name, init)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and node.output:
            out = node.output[0]
            for attr in node.attribute:
                if attr.name == "value" and attr.type == AttributeProto.TENSOR:
                    scope.add_tensor(out, attr.t)
                elif attr.name in ("value_int", "value_ints", "value_float", "value_floats"):
                    scope.const_names.add(out)
                    elem = TensorProto.INT64 if "int" in attr.name else TensorProto.FLOAT
                    scope.types.setdefault(out, (elem, None))


def _inline_array(tensor: TensorProto | None):
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
class _NodeCtx:
    node: onnx.NodeProto
    label: str
    where: str
    scope: _Scope
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

    def shape(self, name: str) -> _Shape | None:
        return self.scope.lookup(name)[1] if name else None

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def is_const(self, name: str) -> bool:
        return self.scope.is_const(name)

    def const_value(self, name: str):
        return _inline_array(self.scope.const_tensor(name))


# --------------------------------------------------------------------------------------------------------------
# Restriction checks: one function per op whose "Restrictions" text is mechanically checkable. Each yields
# (severity, message); the table's own restriction text is appended to every message by the caller.

_Check = Callable[[_NodeCtx], Iterable[tuple[str, str]]]
_CHECKS: dict[str, _Check] = {}


def _check(*ops: str):
    def register(fn: _Check) -> _Check:
        for op in ops:
            _CHECKS[op] = fn
        return fn
    return register


def _reduction(ctx: _NodeCtx) -> str:
    return str(ctx.attr("reduction", "none") or "none")


@_check("ScatterND")
def _scatter_nd(ctx):
    if _reduction(ctx) != "none":
        yield ERROR, f"reduction='{_reduction(ctx)}' is rejected by the parser"


@_check("ScatterElements")
def _scatter_elements(ctx):
    # The table lists no restriction; the parser routes reduction != none to the ScatterElements plugin
    # (NVIDIA/TensorRT plugin/scatterElementsPlugin, shipped in libnvinfer_plugin), whose README lists limits.
    reduction = _reduction(ctx)
    if reduction == "none":
        return
    yield WARNING, (f"reduction='{reduction}' is not a core TensorRT layer: the parser routes it to the "
                    "ScatterElements plugin (libnvinfer_plugin must be loaded); scatter-add is a known source of "
                    "TensorRT build failures and wrong results")
    data_t = ctx.elem_type(ctx.input(0))
    if data_t in (TensorProto.BFLOAT16, TensorProto.INT8):
        yield ERROR, f"the ScatterElements plugin does not support {_type_name(data_t)} data (plugin README)"
    index_t = ctx.elem_type(ctx.input(1))
    if index_t is not None and index_t != TensorProto.INT64:
        yield WARNING, f"indices are {_type_name(index_t)}; the ScatterElements plugin supports only INT64 indices"


@_check("TopK")
def _topk(ctx):
    if int(ctx.attr("sorted", 1)) != 1:
        yield ERROR, ("sorted=0 is rejected; export TopK with sorted=1 (for MoE routing the selected experts and "
                      "their sum do not depend on the order)")
    k = ctx.attr("k") if ctx.opset < 10 else ctx.const_value(ctx.input(1))
    if k is not None:
        k_value = int(k if isinstance(k, int) else k.reshape(-1)[0])
        if k_value >= 3840:
            yield ERROR, f"K={k_value} is not less than 3840"


@_check("LayerNormalization")
def _layer_norm(ctx):
    extra = [name for name in ctx.node.output[1:] if name]
    if extra:
        yield ERROR, f"outputs Mean/InvStdDev are used ({', '.join(extra)}); only Y is supported"


@_check("Attention")
def _attention(ctx):
    for index, name in ((4, "past_key"), (5, "past_value"), (6, "nonpad_kv_seqlen")):
        if ctx.input(index):
            yield ERROR, f"input {name} is given; it is unsupported"
    for index, name in ((1, "present_key"), (2, "present_value"), (3, "qk_matmul_output")):
        if ctx.output(index):
            yield ERROR, f"output {name} is used; it is unsupported"
    for attr in ("qk_matmul_output_mode", "softcap"):
        if ctx.attr(attr, 0):
            yield ERROR, f"attribute {attr}={ctx.attr(attr)} is unsupported"
    for index, name in ((0, "Q"), (1, "K"), (2, "V"), (3, "attn_mask")):
        rank = ctx.rank(ctx.input(index))
        if rank is not None and rank != 4:
            yield ERROR, f"{name} is {rank}-D; it must be 4-D"


@_check("If")
def _if(ctx):
    then_g, else_g = ctx.attr("then_branch"), ctx.attr("else_branch")
    if then_g is None or else_g is None:
        return
    for t_out, e_out in zip(then_g.output, else_g.output):
        if t_out.name == e_out.name:
            yield ERROR, f"both branches output a tensor named '{t_out.name}'; the names must differ"
        t_rank, e_rank = _shape_of(t_out.type)[1], _shape_of(e_out.type)[1]
        if t_rank is not None and e_rank is not None and len(t_rank) != len(e_rank):
            yield ERROR, f"branch outputs '{t_out.name}' and '{e_out.name}' differ in rank"


@_check("Loop")
def _loop(ctx):
    body = ctx.attr("body")
    carried = max(len(ctx.node.input) - 2, 0)
    scan_outputs = len(ctx.node.output) - carried
    if body is not None and scan_outputs > 0 and not (ctx.input(0) and ctx.is_const(ctx.input(0))):
        yield WARNING, (f"{scan_outputs} scan output(s) with a trip count that is not a constant; "
                        "scan output length cannot be dynamic")


@_check("Constant")
def _constant(ctx):
    for attr in ("sparse_value", "value_string", "value_strings"):
        if ctx.has_attr(attr):
            yield ERROR, f"attribute {attr} is unsupported"


def _must_be_initializer(index: int, what: str, severity: str = ERROR) -> _Check:
    def check(ctx):
        name = ctx.input(index)
        if name and not ctx.is_const(name):
            yield severity, f"`{what}` ('{name}') is computed in the graph, not an initializer/Constant"
    return check


for _op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
            "ReduceProd", "ReduceSum", "ReduceSumSquare"):
    _CHECKS[_op] = _must_be_initializer(1, "axes")
# "build-time constant" / "resolvable to a constant": the builder may still fold a shape computation, so these
# are warnings rather than errors when the input is not literally constant.
_CHECKS["CumSum"] = _must_be_initializer(1, "axis", WARNING)
_CHECKS["OneHot"] = _must_be_initializer(1, "depth", WARNING)
_CHECKS["Squeeze"] = _must_be_initializer(1, "axes", WARNING)
_CHECKS["Unsqueeze"] = _must_be_initializer(1, "axes", WARNING)


@_check("STFT")
def _stft(ctx):
    for index, what in ((1, "frame_step"), (2, "window")):
        name = ctx.input(index)
        if name and not ctx.is_const(name):
            yield ERROR, f"`{what}` ('{name}') is not an initializer"


@_check("Dropout")
def _dropout(ctx):
    name = ctx.input(2)
    if not name:
        return
    if not ctx.is_const(name):
        yield ERROR, f"is_training ('{name}') is not an initializer"
    else:
        value = ctx.const_value(name)
        if value is not None and bool(value.reshape(-1)[0]):
            yield ERROR, "is_training evaluates to True"


def _zero_point_check(index: int, what: str) -> _Check:
    def check(ctx):
        value = ctx.const_value(ctx.input(index))
        if value is not None and value.any():
            yield ERROR, f"`{what}` is not zero"
    return check


_CHECKS["DequantizeLinear"] = _zero_point_check(2, "x_zero_point")
_CHECKS["QuantizeLinear"] = _zero_point_check(2, "y_zero_point")


def _pool_check(*, spatial: bool, indices: bool) -> _Check:
    def check(ctx):
        kernel = ctx.attr("kernel_shape")
        if spatial and kernel is not None and len(kernel) not in (2, 3):
            yield ERROR, f"{len(kernel)}-D pooling; only 2D or 3D is supported"
        dilations = ctx.attr("dilations")
        if dilations and any(int(d) != 1 for d in dilations):
            yield ERROR, f"dilations={list(dilations)}; must be empty or all ones"
        if indices and ctx.output(1):
            yield ERROR, "the Indices output is used; it is unsupported"
    return check


_CHECKS["AveragePool"] = _pool_check(spatial=True, indices=False)
_CHECKS["MaxPool"] = _pool_check(spatial=True, indices=True)
_CHECKS["LpPool"] = _pool_check(spatial=False, indices=False)


@_check("LSTM")
def _lstm(ctx):
    for attr in ("input_forget", "layout"):
        if int(ctx.attr(attr, 0)) != 0:
            yield ERROR, f"{attr}={ctx.attr(attr)}; must be 0"


_RESIZE_ALLOWED = {
    "coordinate_transformation_mode": ("half_pixel", {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                                                      "asymmetric", "align_corners"}),
    "mode": ("nearest", {"nearest", "linear"}),
    "nearest_mode": ("round_prefer_floor", {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}),
    "keep_aspect_ratio_policy": ("stretch", {"stretch"}),
}


@_check("Resize")
def _resize(ctx):
    for attr, (default, allowed) in _RESIZE_ALLOWED.items():
        value = ctx.attr(attr, default)
        if value not in allowed:
            yield ERROR, f"{attr}='{value}' is unsupported"
    if int(ctx.attr("antialias", 0)):
        yield ERROR, "antialias=1 is unsupported"


@_check("GridSample")
def _grid_sample(ctx):
    rank = ctx.rank(ctx.input(0))
    if rank is not None and rank != 4:
        yield ERROR, f"input is {rank}-D; it must be 4-D"


@_check("RotaryEmbedding")
def _rotary(ctx):
    elem = ctx.elem_type(ctx.input(3))
    if elem is not None and elem != TensorProto.INT64:
        yield ERROR, f"position_ids is {_type_name(elem)}; it must be INT64"


@_check("TensorScatter")
def _tensor_scatter(ctx):
    if int(ctx.attr("axis", -2)) != -2:
        yield ERROR, f"axis={ctx.attr('axis')}; it must be -2"
    for index, name in ((0, "past_cache"), (1, "update")):
        rank = ctx.rank(ctx.input(index))
        if rank is not None and rank != 4:
            yield ERROR, f"{name} is {rank}-D; it must be 4-D"


# Which tensor carries the op's data type (the table's "Supported Types" column): input 0 unless listed here.
_TYPED_INPUT = {"Where": 1}
_TYPED_BY_OUTPUT = {"Constant", "ConstantOfShape", "RandomNormal", "RandomUniform", "EyeLike", "Range"}
_ALSO_OUTPUT_TYPED = {"Cast", "CastLike"}

# Ops whose output shape depends on input values; TensorRT builds them but with data-dependent shapes.
_DDS_SOURCES = {"NonZero", "NonMaxSuppression"}


# --------------------------------------------------------------------------------------------------------------
# The walk


def _func_key(domain: str, name: str, overload: str = "") -> tuple[str, str, str]:
    return (domain, name, overload)


def _op_label(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"


class _Linter:
    """One lint run over one model: walks the graph, its subgraphs and the functions it calls."""

    def __init__(self, model: onnx.ModelProto, table: OpTable, plugins: Sequence[PluginSpec], label: str):
        self.model = model
        self.table = table
        self.plugins = {p.op_type: p for p in plugins}
        self.functions = {_func_key(f.domain, f.name, getattr(f, "overload", "")): f for f in model.functions}
        self.opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 0)
        self.report = LintReport(model=label, tensorrt_version=table.tensorrt_version, source=table.source)
        self._counts: Counter = Counter()
        self._shadow_counts: Counter = Counter()
        self._function_counts: dict[tuple[str, str, str], Counter] = {}
        self._called_functions: set[tuple[str, str, str]] = set()
        self._type_reported: set[tuple[str, str]] = set()
        self._unchecked_noted: set[str] = set()

    # -- entry ---------------------------------------------------------------------------------------------
    def run(self) -> LintReport:
        lo, hi = self.table.opset_range
        if self.opset and not lo <= self.opset <= hi:
            self._add(WARNING, "(model)", "(model)", "graph",
                      f"default-domain opset {self.opset} is outside the range the table documents "
                      f"(opset {lo} to {hi} for TensorRT {self.table.tensorrt_version})", self.report.findings)
        scope = _Scope()
        _fill_scope(scope, self.model.graph)
        self._check_io_types(scope, self.model.graph, "graph", self.report.findings)
        self._lint_graph(self.model.graph, scope, "graph", self.report.findings, self._counts, {}, set())
        for key, func in self.functions.items():
            if key not in self._called_functions:
                self._add(INFO, func.name, func.name, f"function {func.domain}::{func.name}",
                          "model-local function is never called; the parser ignores it", self.report.findings)
        self.report.op_counts = dict(self._counts)
        self.report.shadowed_op_counts = dict(self._shadow_counts)
        return self.report

    def _add(self, severity, op_type, node, where, message, sink) -> None:
        sink.append(Finding(severity, op_type, node, message, where))

    # -- graphs --------------------------------------------------------------------------------------------
    def _lint_graph(self, graph, scope: _Scope, where: str, sink: list, counts: Counter,
                    dds: dict[str, str], dds_direct: set[str]) -> None:
        """Lint every node of `graph` into `sink`, recursing into If/Loop/Scan bodies (which share the
        data-dependent-shape bookkeeping, since a body may consume an outer NonZero's output)."""
        for index, node in enumerate(graph.node):
            label = node.name or f"{node.op_type}#{index}"
            ctx = _NodeCtx(node, label, where, scope, self.opset)
            counts[_op_label(node)] += 1
            self._lint_node(ctx, sink, counts)
            self._track_dds(ctx, dds, dds_direct, sink)
            for attr in node.attribute:
                subgraphs = [attr.g] if attr.type == AttributeProto.GRAPH else (
                    list(attr.graphs) if attr.type == AttributeProto.GRAPHS else [])
                for sub_index, sub in enumerate(subgraphs):
                    sub_scope = _Scope(parent=scope)
                    _fill_scope(sub_scope, sub)
                    sub_where = f"{where}/{label}.{attr.name}" + (f"[{sub_index}]" if len(subgraphs) > 1 else "")
                    self._check_io_types(sub_scope, sub, sub_where, sink)
                    self._lint_graph(sub, sub_scope, sub_where, sink, counts, dds, dds_direct)

    def _check_io_types(self, scope: _Scope, graph, where: str, sink: list) -> None:
        """DOUBLE and non-TensorRT types on graph inputs and initializers (node outputs are checked per node)."""
        for vi in graph.input:
            self._check_tensor_type(vi.name, scope.lookup(vi.name)[0], "(graph input)", vi.name, where, sink)
        for init in graph.initializer:
            self._check_tensor_type(init.name, init.data_type, "(initializer)", init.name, where, sink)

    def _check_tensor_type(self, tensor: str, elem: int | None, op_type: str, node: str, where: str, sink) -> None:
        if not elem:
            return
        key = (where, tensor)
        if key in self._type_reported:
            return
        if elem == TensorProto.DOUBLE:
            self._type_reported.add(key)
            self._add(ERROR, op_type, node, where,
                      f"tensor '{tensor}' is DOUBLE (float64): TensorRT has no fp64 (the parser casts DOUBLE down "
                      "to FLOAT, clamping to +-FLT_MAX); export in float32 or lower", sink)
        elif _type_name(elem) not in self.table.supported_types:
            self._type_reported.add(key)
            self._add(ERROR, op_type, node, where,
                      f"tensor '{tensor}' is {_type_name(elem)}, which is not a TensorRT data type", sink)

    # -- nodes ---------------------------------------------------------------------------------------------
    def _lint_node(self, ctx: _NodeCtx, sink: list, counts: Counter) -> None:
        """Follow the parser's dispatch: a default-domain op it has an importer for; else a registered plugin
        (preferred over a same-named local function since TensorRT 10.7, and our build removes that function);
        else one of TensorRT's own custom ops; else a model-local function, which it inlines; else nothing
        can import the node."""
        node = ctx.node
        for out in node.output:
            if out:
                self._check_tensor_type(out, ctx.elem_type(out), node.op_type, ctx.label, ctx.where, sink)
        if node.op_type == "Cast" and node.domain in _DEFAULT_DOMAINS and ctx.attr("to") == TensorProto.DOUBLE:
            self._check_tensor_type(ctx.output(0), TensorProto.DOUBLE, node.op_type, ctx.label, ctx.where, sink)

        if node.domain in _DEFAULT_DOMAINS and node.op_type in self.table.ops:
            self._lint_builtin(ctx, self.table.ops[node.op_type], sink)
            return
        plugin = self.plugins.get(node.op_type)
        func_key = _func_key(node.domain, node.op_type, getattr(node, "overload", ""))
        func = self.functions.get(func_key)
        if func is not None:
            self._called_functions.add(func_key)
        if plugin is not None:
            self._lint_plugin_node(ctx, plugin, sink)
            if func is not None:
                self._add(INFO, node.op_type, ctx.label, ctx.where,
                          f"model-local function {node.domain}::{node.op_type} is shadowed by plugin "
                          f"{plugin.plugin_id}: the TensorRT build removes it (TensorRT >= 10.7 also prefers a "
                          "registered plugin over a local function); its body is linted separately", sink)
                self._lint_function(func, ctx, sink=self.report.shadowed, counts=self._shadow_counts)
            return
        if node.op_type in self.table.custom_ops:
            self._add(INFO, node.op_type, ctx.label, ctx.where,
                      f"TensorRT custom op {node.op_type} (onnx-tensorrt docs/TRT_custom_ops.md); not in the "
                      f"TensorRT {self.table.tensorrt_version} operator table, needs a TensorRT that documents it"
                      + ("; TRT_MoE (IMoELayer) needs an SM 10.x/11.x GPU" if node.op_type == "TRT_MoE" else ""),
                      sink)
            return
        if func is not None:
            self._add(INFO, node.op_type, ctx.label, ctx.where,
                      f"no plugin registered for {node.op_type}: the parser inlines model-local function "
                      f"{node.domain}::{node.op_type}, whose body is linted as part of the graph", sink)
            self._lint_function(func, ctx, sink=sink, counts=counts)
            return
        if node.domain in _DEFAULT_DOMAINS:
            self._add(ERROR, node.op_type, ctx.label, ctx.where,
                      f"{node.op_type} is not in the TensorRT {self.table.tensorrt_version} ONNX operator table, "
                      "and no plugin or model-local function provides it", sink)
            return
        known = ", ".join(sorted(p.plugin_id for p in self.plugins.values())) or "none"
        self._add(ERROR, _op_label(node), ctx.label, ctx.where,
                  f"unknown custom-domain op {node.domain}::{node.op_type}: no TensorRT importer, no registered "
                  f"plugin (known plugins: {known}), no model-local function", sink)

    def _lint_builtin(self, ctx: _NodeCtx, entry: OpEntry, sink: list) -> None:
        """A table op: unsupported is an error; else its type list, then its restriction check if it has one
        (or a one-time note quoting the restriction text when the lint cannot check it)."""
        node = ctx.node
        version = self.table.tensorrt_version
        if not entry.supported:
            extra = f" ({entry.restrictions})" if entry.restrictions else ""
            self._add(ERROR, node.op_type, ctx.label, ctx.where,
                      f"{node.op_type} is not supported by the TensorRT {version} ONNX parser{extra}", sink)
            return
        self._check_op_types(ctx, entry, sink)
        check = _CHECKS.get(node.op_type)
        if check is not None:
            for severity, message in check(ctx):
                if entry.restrictions:
                    message += f" (table: {_flat(entry.restrictions)})"
                self._add(severity, node.op_type, ctx.label, ctx.where, message, sink)
        elif entry.restrictions and node.op_type not in self._unchecked_noted:
            self._unchecked_noted.add(node.op_type)
            self._add(INFO, node.op_type, ctx.label, ctx.where,
                      f"restriction not checked by this lint, verify by hand: {_flat(entry.restrictions)}", sink)

    def _check_op_types(self, ctx: _NodeCtx, entry: OpEntry, sink: list) -> None:
        """The table's per-op type list: a TensorRT type the op does not list is a warning (the column is
        documentation, coarser than the importers); DOUBLE and non-TensorRT types are reported per tensor."""
        node = ctx.node
        names = []
        if node.op_type in _TYPED_BY_OUTPUT or not any(node.input):
            names.append(ctx.output(0))
        else:
            names.append(ctx.input(_TYPED_INPUT.get(node.op_type, 0)))
        if node.op_type in _ALSO_OUTPUT_TYPED:
            names.append(ctx.output(0))
        for name in names:
            elem = ctx.elem_type(name)
            if elem is None:
                continue
            type_name = _type_name(elem)
            if elem == TensorProto.DOUBLE or type_name not in self.table.supported_types:
                self._check_tensor_type(name, elem, node.op_type, ctx.label, ctx.where, sink)
            elif type_name not in entry.types:
                self._add(WARNING, node.op_type, ctx.label, ctx.where,
                          f"'{name}' is {type_name}, not among the types the table lists for {node.op_type} "
                          f"({', '.join(entry.types)})", sink)
            if elem == TensorProto.UINT8 and not ctx.scope.is_graph_io(name):
                self._add(WARNING, node.op_type, ctx.label, ctx.where,
                          f"'{name}' is UINT8 inside the network; UINT8 is only supported for network inputs "
                          "and outputs", sink)

    def _lint_plugin_node(self, ctx: _NodeCtx, plugin: PluginSpec, sink: list) -> None:
        """Say which plugin the node needs, then check what the fallback importer looks it up by (op_type,
        plugin_namespace, plugin_version) and what the plugin's schema expects (attributes, I/O, validate)."""
        node = ctx.node
        problems: list[tuple[str, str]] = []
        for name, attr_type in plugin.attributes.items():
            attr = next((a for a in node.attribute if a.name == name), None)
            if attr is None:
                problems.append((ERROR, f"attribute {name} is missing"))
            elif attr.type != attr_type:
                problems.append((ERROR, f"attribute {name} is {AttributeProto.AttributeType.Name(attr.type)}, "
                                        f"expected {AttributeProto.AttributeType.Name(attr_type)}"))
        if plugin.attributes:
            extra = sorted(a.name for a in node.attribute if a.name not in plugin.attributes)
            if extra:
                problems.append((WARNING, f"attributes {extra} are not in the plugin schema; the parser passes "
                                          "them on as plugin fields"))
        namespace = ctx.attr("plugin_namespace", "")
        version = ctx.attr("plugin_version", "1")
        if ctx.has_attr("plugin_namespace"):
            if namespace != plugin.namespace:
                problems.append((ERROR, f"plugin_namespace='{namespace}', but the plugin is registered in "
                                        f"'{plugin.namespace}' (the parser would not find it)"))
        elif plugin.namespace and "plugin_namespace" not in plugin.attributes:
            if node.domain == plugin.namespace:
                problems.append((WARNING, "no plugin_namespace attribute: relies on TensorRT >= 10.10 reading the "
                                          "namespace from the node domain"))
            else:
                problems.append((ERROR, f"no plugin_namespace attribute: the parser looks in namespace '' (or, "
                                        f"from TensorRT 10.10, '{node.domain}'), not '{plugin.namespace}'"))
        if ctx.has_attr("plugin_version") and version != plugin.version:
            problems.append((ERROR, f"plugin_version='{version}', but the registered plugin is version "
                                    f"'{plugin.version}' (the parser would not find it)"))
        if plugin.domain is not None and node.domain != plugin.domain:
            problems.append((WARNING, f"node domain '{node.domain}' differs from '{plugin.domain}' (TensorRT >= "
                                      "10.10 reads the plugin namespace from the node domain)"))
        if plugin.num_inputs is not None and len(node.input) != plugin.num_inputs:
            problems.append((ERROR, f"{len(node.input)} inputs, the plugin takes {plugin.num_inputs}"))
        if plugin.num_outputs is not None and len(node.output) != plugin.num_outputs:
            problems.append((ERROR, f"{len(node.output)} outputs, the plugin produces {plugin.num_outputs}"))
        if plugin.validate is not None:
            problems += list(plugin.validate(ctx))
        self._add(INFO, node.op_type, ctx.label, ctx.where,
                  f"expects plugin {plugin.plugin_id} version {plugin.version}: register it before parsing "
                  "and before deserializing the engine", sink)
        for severity, message in problems:
            self._add(severity, node.op_type, ctx.label, ctx.where, f"plugin {plugin.plugin_id}: {message}", sink)

    # -- functions -----------------------------------------------------------------------------------------
    def _lint_function(self, func: onnx.FunctionProto, call: _NodeCtx, *, sink: list, counts: Counter) -> None:
        """Lint a function body once (tensor types bound from its first call site) into `sink`; add its op
        counts to `counts` at every call, since the parser inlines it at every call."""
        key = _func_key(func.domain, func.name, getattr(func, "overload", ""))
        if key not in self._function_counts:
            body_counts: Counter = Counter()
            self._function_counts[key] = body_counts  # set first: guards against a (malformed) recursive call
            scope = _Scope()  # a function sees only its formal parameters and its own constants
            for formal, actual in list(zip(func.input, call.node.input)) + list(zip(func.output, call.node.output)):
                if actual:
                    scope.types[formal] = call.scope.lookup(actual)
            for vi in getattr(func, "value_info", []):
                scope.add_value_info(vi)
            body = helper.make_graph(list(func.node), func.name, [], [])
            _fill_scope(scope, body)
            self._lint_graph(body, scope, f"function {func.domain}::{func.name}", sink, body_counts, {}, set())
        counts.update(self._function_counts[key])

    # -- data-dependent shapes -----------------------------------------------------------------------------
    def _track_dds(self, ctx: _NodeCtx, dds: dict[str, str], direct: set[str], sink: list) -> None:
        """NonZero (and NMS) make shapes depend on data. Warn at the source, at each direct consumer of its
        outputs, and at every Shape/Size taken of a tensor downstream of it (that turns the data dependence into
        shape arithmetic). `dds` maps each affected tensor to its source; `direct` holds the sources' outputs."""
        node = ctx.node
        if node.domain in _DEFAULT_DOMAINS and node.op_type in _DDS_SOURCES:
            self._add(WARNING, node.op_type, ctx.label, ctx.where,
                      "output shape depends on input values (data-dependent shape): TensorRT builds it but "
                      "warns, restricts fusion around it and needs an output allocator; prefer a static-shape "
                      "lowering", sink)
            for out in node.output:
                if out:
                    dds[out] = f"{node.op_type} '{ctx.label}'"
                    direct.add(out)
            return
        consumed = [name for name in node.input if name in dds]
        if not consumed:
            return
        for out in node.output:
            if out:
                dds.setdefault(out, dds[consumed[0]])
        first_direct = next((name for name in consumed if name in direct), None)
        is_shape_op = node.domain in _DEFAULT_DOMAINS and node.op_type in ("Shape", "Size")
        if first_direct is None and not is_shape_op:
            return
        name = first_direct or consumed[0]
        what = "takes the shape of" if is_shape_op else "consumes"
        hint = (" (Gather/Scatter on data-dependent shapes are a known cause of Myelin build failures)"
                if node.op_type.startswith(("Gather", "Scatter")) else "")
        self._add(WARNING, node.op_type, ctx.label, ctx.where,
                  f"{what} '{name}', whose shape is data-dependent (from {dds[name]}){hint}", sink)


# --------------------------------------------------------------------------------------------------------------
# Public API


def _load(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise LintInputError(f"cannot read ONNX model '{path}': {reason}") from exc
    except Exception as exc:  # noqa: BLE001 - protobuf DecodeError and friends
        raise LintInputError(f"cannot read ONNX model '{path}': not an ONNX protobuf ({exc})") from exc
    if not model.HasField("graph") or not model.opset_import:
        raise LintInputError(f"cannot read ONNX model '{path}': no graph or opset_import, not an ONNX model")
    return model


def _with_inferred_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference fills value_info so dtype checks see intermediate tensors. It reads only the proto
    (never external data); any failure just leaves the declared types."""
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=False)
    except Exception:  # noqa: BLE001 - custom ops or odd graphs: lint with what is declared
        return model


def _normalize_plugins(plugins) -> tuple[PluginSpec, ...]:
    if plugins is None:
        return DEFAULT_PLUGINS
    return tuple(p if isinstance(p, PluginSpec) else PluginSpec.parse(str(p)) for p in plugins)


def lint_onnx(model_or_path: onnx.ModelProto | str | Path, *,
              plugins: Iterable[PluginSpec | str] | None = None,
              table: OpTable | None = None, infer_types: bool = True) -> LintReport:
    """Lint an ONNX model (a path, or a ModelProto) against TensorRT's ONNX parser support matrix.

    `plugins`: the plugins the TensorRT build will register; None means ours (`hidream::HiDreamMoE`), an empty
    iterable means none. Entries are `PluginSpec`s or 'namespace::OpType[:version]' strings.
    `table`: another transcription of the support matrix (default: the packaged one).
    Raises LintInputError when the file cannot be read as an ONNX model. External data is never read."""
    if isinstance(model_or_path, onnx.ModelProto):
        model, label = model_or_path, "<in-memory model>"
    else:
        path = Path(model_or_path)
        model, label = _load(path), str(path)
    if infer_types:
        model = _with_inferred_types(model)
    return _Linter(model, table or load_op_table(), _normalize_plugins(plugins), label).run()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `hidream-export lint`, for wiring into the CLI's subparser."""
    parser.add_argument("model", help="ONNX file to check (external weight files are not read)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    parser.add_argument("--no-info", action="store_true", help="hide info lines in the text report")
    parser.add_argument("--no-plugins", action="store_true",
                        help="assume no plugin is registered (HiDreamMoE nodes then need their local function)")
    parser.add_argument("--plugin", action="append", default=[], metavar="NS::OP[:VERSION]",
                        help="an additional plugin the build registers (repeatable)")


def run(args: argparse.Namespace) -> int:
    """Run the lint for parsed arguments; exit code 0 clean, 1 errors found, 2 file unreadable."""
    plugins = [] if args.no_plugins else list(DEFAULT_PLUGINS)
    plugins += [PluginSpec.parse(p) for p in args.plugin]
    try:
        report = lint_onnx(args.model, plugins=plugins)
    except LintInputError as exc:
        print(f"hidream-export lint: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format(show_info=not args.no_info))
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`hidream-export lint MODEL.onnx [--json]` as a function: returns the exit code instead of exiting."""
    parser = argparse.ArgumentParser(prog="hidream-export lint",
                                     description="Check an ONNX graph against TensorRT's ONNX operator support table.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

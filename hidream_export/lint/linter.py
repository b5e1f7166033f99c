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
  see `hidream_export.moe.schema`) is listed as a plugin expectation (info) and its attributes are checked
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

from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import onnx
from onnx import AttributeProto, TensorProto, helper

from hidream_export.errors import LintInputError, NotATensorRTGraph
from hidream_export.lint.checks import ALSO_OUTPUT_TYPED, CHECKS, DDS_SOURCES, TYPED_BY_OUTPUT, TYPED_INPUT
from hidream_export.lint.graph import NodeCtx, Scope, fill_scope
from hidream_export.lint.plugins import DEFAULT_PLUGINS, PluginSpec
from hidream_export.lint.report import ERROR, INFO, WARNING, Finding, LintReport
from hidream_export.lint.table import DEFAULT_DOMAINS, OpEntry, OpTable, flat, load_op_table, type_name

__all__ = ["lint_onnx"]

# --------------------------------------------------------------------------------------------------------------
# The walk


def _func_key(domain: str, name: str, overload: str = "") -> tuple[str, str, str]:
    return (domain, name, overload)


def _op_label(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"


class _Linter:
    """One lint run over one model: walks the graph, its subgraphs and the functions it calls."""

    def __init__(self, model: onnx.ModelProto, table: OpTable, plugins: Sequence[PluginSpec], label: str):
        self.model = model
        self.table = table
        self.plugins = {p.op_type: p for p in plugins}
        self.functions = {_func_key(f.domain, f.name, getattr(f, "overload", "")): f for f in model.functions}
        self.opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0)
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
        scope = Scope()
        fill_scope(scope, self.model.graph)
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
    def _lint_graph(self, graph, scope: Scope, where: str, sink: list, counts: Counter,
                    dds: dict[str, str], dds_direct: set[str]) -> None:
        """Lint every node of `graph` into `sink`, recursing into If/Loop/Scan bodies (which share the
        data-dependent-shape bookkeeping, since a body may consume an outer NonZero's output)."""
        for index, node in enumerate(graph.node):
            label = node.name or f"{node.op_type}#{index}"
            ctx = NodeCtx(node, label, where, scope, self.opset)
            counts[_op_label(node)] += 1
            self._lint_node(ctx, sink, counts)
            self._track_dds(ctx, dds, dds_direct, sink)
            for attr in node.attribute:
                subgraphs = [attr.g] if attr.type == AttributeProto.GRAPH else (
                    list(attr.graphs) if attr.type == AttributeProto.GRAPHS else [])
                for sub_index, sub in enumerate(subgraphs):
                    sub_scope = Scope(parent=scope)
                    fill_scope(sub_scope, sub)
                    sub_where = f"{where}/{label}.{attr.name}" + (f"[{sub_index}]" if len(subgraphs) > 1 else "")
                    self._check_io_types(sub_scope, sub, sub_where, sink)
                    self._lint_graph(sub, sub_scope, sub_where, sink, counts, dds, dds_direct)

    def _check_io_types(self, scope: Scope, graph, where: str, sink: list) -> None:
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
        elif type_name(elem) not in self.table.supported_types:
            self._type_reported.add(key)
            self._add(ERROR, op_type, node, where,
                      f"tensor '{tensor}' is {type_name(elem)}, which is not a TensorRT data type", sink)

    # -- nodes ---------------------------------------------------------------------------------------------
    def _lint_node(self, ctx: NodeCtx, sink: list, counts: Counter) -> None:
        """Follow the parser's dispatch: a default-domain op it has an importer for; else a registered plugin
        (preferred over a same-named local function since TensorRT 10.7, and our build removes that function);
        else one of TensorRT's own custom ops; else a model-local function, which it inlines; else nothing
        can import the node."""
        node = ctx.node
        for out in node.output:
            if out:
                self._check_tensor_type(out, ctx.elem_type(out), node.op_type, ctx.label, ctx.where, sink)
        if node.op_type == "Cast" and node.domain in DEFAULT_DOMAINS and ctx.attr("to") == TensorProto.DOUBLE:
            self._check_tensor_type(ctx.output(0), TensorProto.DOUBLE, node.op_type, ctx.label, ctx.where, sink)

        if node.domain in DEFAULT_DOMAINS and node.op_type in self.table.ops:
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
        if node.domain in DEFAULT_DOMAINS:
            self._add(ERROR, node.op_type, ctx.label, ctx.where,
                      f"{node.op_type} is not in the TensorRT {self.table.tensorrt_version} ONNX operator table, "
                      "and no plugin or model-local function provides it", sink)
            return
        known = ", ".join(sorted(p.plugin_id for p in self.plugins.values())) or "none"
        self._add(ERROR, _op_label(node), ctx.label, ctx.where,
                  f"unknown custom-domain op {node.domain}::{node.op_type}: no TensorRT importer, no registered "
                  f"plugin (known plugins: {known}), no model-local function", sink)

    def _lint_builtin(self, ctx: NodeCtx, entry: OpEntry, sink: list) -> None:
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
        check = CHECKS.get(node.op_type)
        if check is not None:
            for severity, message in check(ctx):
                if entry.restrictions:
                    message += f" (table: {flat(entry.restrictions)})"
                self._add(severity, node.op_type, ctx.label, ctx.where, message, sink)
        elif entry.restrictions and node.op_type not in self._unchecked_noted:
            self._unchecked_noted.add(node.op_type)
            self._add(INFO, node.op_type, ctx.label, ctx.where,
                      f"restriction not checked by this lint, verify by hand: {flat(entry.restrictions)}", sink)

    def _check_op_types(self, ctx: NodeCtx, entry: OpEntry, sink: list) -> None:
        """The table's per-op type list: a TensorRT type the op does not list is a warning (the column is
        documentation, coarser than the importers); DOUBLE and non-TensorRT types are reported per tensor."""
        node = ctx.node
        names = []
        if node.op_type in TYPED_BY_OUTPUT or not any(node.input):
            names.append(ctx.output(0))
        else:
            names.append(ctx.input(TYPED_INPUT.get(node.op_type, 0)))
        if node.op_type in ALSO_OUTPUT_TYPED:
            names.append(ctx.output(0))
        for name in names:
            elem = ctx.elem_type(name)
            if elem is None:
                continue
            elem_name = type_name(elem)
            if elem == TensorProto.DOUBLE or elem_name not in self.table.supported_types:
                self._check_tensor_type(name, elem, node.op_type, ctx.label, ctx.where, sink)
            elif elem_name not in entry.types:
                self._add(WARNING, node.op_type, ctx.label, ctx.where,
                          f"'{name}' is {elem_name}, not among the types the table lists for {node.op_type} "
                          f"({', '.join(entry.types)})", sink)
            if elem == TensorProto.UINT8 and not ctx.scope.is_graph_io(name):
                self._add(WARNING, node.op_type, ctx.label, ctx.where,
                          f"'{name}' is UINT8 inside the network; UINT8 is only supported for network inputs "
                          "and outputs", sink)

    def _lint_plugin_node(self, ctx: NodeCtx, plugin: PluginSpec, sink: list) -> None:
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
    def _lint_function(self, func: onnx.FunctionProto, call: NodeCtx, *, sink: list, counts: Counter) -> None:
        """Lint a function body once (tensor types bound from its first call site) into `sink`; add its op
        counts to `counts` at every call, since the parser inlines it at every call."""
        key = _func_key(func.domain, func.name, getattr(func, "overload", ""))
        if key not in self._function_counts:
            body_counts: Counter = Counter()
            self._function_counts[key] = body_counts  # set first: guards against a (malformed) recursive call
            scope = Scope()  # a function sees only its formal parameters and its own constants
            for formal, actual in list(zip(func.input, call.node.input)) + list(zip(func.output, call.node.output)):
                if actual:
                    scope.types[formal] = call.scope.lookup(actual)
            for vi in getattr(func, "value_info", []):
                scope.add_value_info(vi)
            body = helper.make_graph(list(func.node), func.name, [], [])
            fill_scope(scope, body)
            self._lint_graph(body, scope, f"function {func.domain}::{func.name}", sink, body_counts, {}, set())
        counts.update(self._function_counts[key])

    # -- data-dependent shapes -----------------------------------------------------------------------------
    def _track_dds(self, ctx: NodeCtx, dds: dict[str, str], direct: set[str], sink: list) -> None:
        """NonZero (and NMS) make shapes depend on data. Warn at the source, at each direct consumer of its
        outputs, and at every Shape/Size taken of a tensor downstream of it (that turns the data dependence into
        shape arithmetic). `dds` maps each affected tensor to its source; `direct` holds the sources' outputs."""
        node = ctx.node
        if node.domain in DEFAULT_DOMAINS and node.op_type in DDS_SOURCES:
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
        is_shape_op = node.domain in DEFAULT_DOMAINS and node.op_type in ("Shape", "Size")
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


ONNXRUNTIME_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops; TensorRT's parser reads none of them


def _refuse_onnxruntime_graph(model: onnx.ModelProto, label: str) -> None:
    """A graph with ONNX Runtime contrib nodes is an ONNX Runtime graph: linting it op by op would only list
    errors, so say what it is in one line."""
    nodes = [n for n in model.graph.node if n.domain == ONNXRUNTIME_DOMAIN]
    nodes += [n for f in model.functions for n in f.node if n.domain == ONNXRUNTIME_DOMAIN]
    if nodes:
        ops = ", ".join(sorted({n.op_type for n in nodes}))
        raise NotATensorRTGraph(f"{label} is an ONNX Runtime graph, not a TensorRT graph: {len(nodes)} "
                                f"{ONNXRUNTIME_DOMAIN} node(s) ({ops}, e.g. from --moe ort) that TensorRT's parser "
                                f"does not read; export with --target tensorrt (--moe gather, dense or plugin) "
                                f"to build engines")


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
    Raises LintInputError when the file cannot be read as an ONNX model, NotATensorRTGraph when it holds ONNX
    Runtime contrib ops (an `--moe ort` export). External data is never read."""
    if isinstance(model_or_path, onnx.ModelProto):
        model, label = model_or_path, "<in-memory model>"
    else:
        path = Path(model_or_path)
        model, label = _load(path), str(path)
    _refuse_onnxruntime_graph(model, label)
    if infer_types:
        model = _with_inferred_types(model)
    return _Linter(model, table or load_op_table(), _normalize_plugins(plugins), label).run()

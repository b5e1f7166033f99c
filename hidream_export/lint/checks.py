"""The table's "Restrictions" column, as code where it is mechanically checkable: one function per op."""

from __future__ import annotations

from typing import Callable, Iterable

from onnx import TensorProto

from hidream_export.lint.graph import NodeCtx, shape_of
from hidream_export.lint.report import ERROR, WARNING
from hidream_export.lint.table import type_name

# --------------------------------------------------------------------------------------------------------------
# Restriction checks: one function per op whose "Restrictions" text is mechanically checkable. Each yields
# (severity, message); the table's own restriction text is appended to every message by the caller.

_Check = Callable[[NodeCtx], Iterable[tuple[str, str]]]
CHECKS: dict[str, _Check] = {}


def _check(*ops: str):
    def register(fn: _Check) -> _Check:
        for op in ops:
            CHECKS[op] = fn
        return fn
    return register


def _reduction(ctx: NodeCtx) -> str:
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
        yield ERROR, f"the ScatterElements plugin does not support {type_name(data_t)} data (plugin README)"
    index_t = ctx.elem_type(ctx.input(1))
    if index_t is not None and index_t != TensorProto.INT64:
        yield WARNING, f"indices are {type_name(index_t)}; the ScatterElements plugin supports only INT64 indices"


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
        t_rank, e_rank = shape_of(t_out.type)[1], shape_of(e_out.type)[1]
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
    CHECKS[_op] = _must_be_initializer(1, "axes")
# "build-time constant" / "resolvable to a constant": the builder may still fold a shape computation, so these
# are warnings rather than errors when the input is not literally constant.
CHECKS["CumSum"] = _must_be_initializer(1, "axis", WARNING)
CHECKS["OneHot"] = _must_be_initializer(1, "depth", WARNING)
CHECKS["Squeeze"] = _must_be_initializer(1, "axes", WARNING)
CHECKS["Unsqueeze"] = _must_be_initializer(1, "axes", WARNING)


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


CHECKS["DequantizeLinear"] = _zero_point_check(2, "x_zero_point")
CHECKS["QuantizeLinear"] = _zero_point_check(2, "y_zero_point")


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


CHECKS["AveragePool"] = _pool_check(spatial=True, indices=False)
CHECKS["MaxPool"] = _pool_check(spatial=True, indices=True)
CHECKS["LpPool"] = _pool_check(spatial=False, indices=False)


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
        yield ERROR, f"position_ids is {type_name(elem)}; it must be INT64"


@_check("TensorScatter")
def _tensor_scatter(ctx):
    if int(ctx.attr("axis", -2)) != -2:
        yield ERROR, f"axis={ctx.attr('axis')}; it must be -2"
    for index, name in ((0, "past_cache"), (1, "update")):
        rank = ctx.rank(ctx.input(index))
        if rank is not None and rank != 4:
            yield ERROR, f"{name} is {rank}-D; it must be 4-D"


# Which tensor carries the op's data type (the table's "Supported Types" column): input 0 unless listed here.
TYPED_INPUT = {"Where": 1}
TYPED_BY_OUTPUT = {"Constant", "ConstantOfShape", "RandomNormal", "RandomUniform", "EyeLike", "Range"}
ALSO_OUTPUT_TYPED = {"Cast", "CastLike"}

# Ops whose output shape depends on input values; TensorRT builds them but with data-dependent shapes.
DDS_SOURCES = {"NonZero", "NonMaxSuppression"}

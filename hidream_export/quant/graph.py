"""The ONNX side of a quantized export: rewrite a weightless graph so its linear weights are read quantized.

Runs on the onnx_ir model right after the weightless optimisation (export/streaming.py), before the
weights get their slots, so the quantized tensors are laid out and streamed like any other weight. The
exporter writes a linear layer as `MatMul(x, Transpose(W))` (3-D inputs) or `Gemm(x, W, transB=1)` (2-D);
both become a DequantizeLinear of the transposed codes feeding the same product:

    MatMul(x, Transpose(W))    ->  MatMul(x, DequantizeLinear(W.qweight, W.weight_scale))
    Gemm(x, W, b, transB=1)    ->  Gemm(x, DequantizeLinear(W.qweight, W.weight_scale), b, transB=0)

int8/int4: DequantizeLinear(axis=0, block_size=B) over INT8/INT4 [in, out], the standard weight-only form
(TensorRT's weight-only path; ONNX Runtime's CPU optimizer turns it into MatMulNBits, see the README).
fp8 (ModelOpt's placement for a quantized Linear): the weight is FLOAT8E4M3FN [in, out] dequantized per
output channel (axis=1), and the layer's input goes through QuantizeLinear/DequantizeLinear with its
calibrated per-tensor scale (saturating), so TensorRT runs the product as an FP8 GEMM.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from hidream_export.errors import ExportError
from hidream_export.quant.scheme import INPUT_SCALE, QWEIGHT, WEIGHT_SCALE, QuantScheme, quant_name
from hidream_export.quant.weights import check_block

CODE_TYPES = {"int8": ir.DataType.INT8, "int4": ir.DataType.INT4, "fp8": ir.DataType.FLOAT8E4M3FN}
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
FP8_ZERO_POINT = "quant.fp8_zero_point"


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _linear_uses(weight: ir.Value) -> list[tuple[str, ir.Node]] | None:
    """("transpose", Transpose node) / ("gemm", Gemm node) for every use of `weight`, or None if any use is
    not a linear layer's (e.g. a stacked expert weight, an embedding lookup)."""
    found = []
    for node, index in weight.uses():
        if node.op_type == "Transpose" and not node.domain and index == 0 and \
                list(_attr(node, "perm", [1, 0])) == [1, 0] and node.outputs[0].uses() and \
                all(n.op_type == "MatMul" and not n.domain and i == 1 for n, i in node.outputs[0].uses()):
            found.append(("transpose", node))
        elif node.op_type == "Gemm" and not node.domain and index == 1 and _attr(node, "transB", 0) == 1 and \
                _attr(node, "transA", 0) == 0 and _attr(node, "alpha", 1.0) == 1.0:
            found.append(("gemm", node))
        else:
            return None
    return found or None


def quantize_graph(model: ir.Model, weights: list[str], scheme: QuantScheme, quantize: Callable[[str], bool],
                   strict: bool = True, flag: str = "--quant") -> tuple[list[str], int]:
    """Rewrite every weight in `weights` that `quantize(name)` accepts and the graph uses as a linear layer's.

    Returns the weights to stream, in order (each quantized weight replaced by its qweight, weight_scale and,
    for fp8, input_scale, all value-less like the weight was), and how many weights were quantized. With
    `strict`, a weight `quantize` accepts but the graph does not use as a linear layer's is an error (the
    transformer's policy names linear weights only); otherwise it is left as it is (encoders: embeddings)."""
    graph = model.graph
    out: list[str] = []
    count = 0
    for name in weights:
        weight = graph.initializers[name]
        if weight.shape is None or len(weight.shape) != 2 or not quantize(name):  # biases, norms, tables
            out.append(name)
            continue
        uses = _linear_uses(weight)
        if uses is None or weight.dtype not in FLOAT_TYPES:
            if strict:
                consumers = sorted({n.op_type for n, _ in weight.uses()})
                raise ExportError(f"{flag} {scheme.scheme}: weight {name!r} is not used as a linear layer's "
                                  f"(consumers: {', '.join(consumers) or 'none'}); it cannot be quantized")
            out.append(name)
            continue
        shape = tuple(int(d) for d in weight.shape)
        check_block(name, shape, scheme, flag)
        out.extend(_rewrite(graph, weight, shape, uses, scheme, count))
        count += 1
    graph.sort()
    return out, count


def _rewrite(graph: ir.Graph, weight: ir.Value, shape: tuple[int, int], uses, scheme: QuantScheme,
             index: int) -> list[str]:
    n_out, n_in = shape
    dtype = weight.dtype
    qweight = _initializer(graph, quant_name(weight.name, QWEIGHT), CODE_TYPES[scheme.scheme], (n_in, n_out))
    if scheme.scheme == "fp8":
        scale = _initializer(graph, quant_name(weight.name, WEIGHT_SCALE), dtype, (n_out,))
        attrs = {"axis": 1}
    else:
        scale = _initializer(graph, quant_name(weight.name, WEIGHT_SCALE), dtype, (n_in // scheme.block_size, n_out))
        attrs = {"axis": 0, "block_size": scheme.block_size}
    dq = ir.node("DequantizeLinear", [qweight, scale], attrs, name=f"node_dq_weight_{index}")
    dq.outputs[0].name = f"{weight.name}/dequantized"
    dq.outputs[0].type, dq.outputs[0].shape = ir.TensorType(dtype), ir.Shape((n_in, n_out))
    first = uses[0][1]
    graph.insert_before(first, dq)
    products = []
    for kind, node in uses:
        if kind == "transpose":
            products += [n for n, _ in node.outputs[0].uses()]
            node.outputs[0].replace_all_uses_with(dq.outputs[0])
            graph.remove(node, safe=True)
        else:
            node.replace_input_with(1, dq.outputs[0])
            node.attributes["transB"] = ir.AttrInt64("transB", 0)
            products.append(node)
    del graph.initializers[weight.name]
    names = [qweight.name, scale.name]
    if scheme.scheme == "fp8":
        input_scale = _initializer(graph, quant_name(weight.name, INPUT_SCALE), dtype, ())
        zero = _fp8_zero_point(graph)
        for k, node in enumerate(products):
            q = ir.node("QuantizeLinear", [node.inputs[0], input_scale, zero], name=f"node_q_input_{index}_{k}")
            dqx = ir.node("DequantizeLinear", [q.outputs[0], input_scale, zero], name=f"node_dq_input_{index}_{k}")
            graph.insert_before(node, [q, dqx])
            node.replace_input_with(0, dqx.outputs[0])
        names.append(input_scale.name)
    return names


def _initializer(graph: ir.Graph, name: str, dtype: ir.DataType, shape: tuple[int, ...]) -> ir.Value:
    """A value-less initializer (its bytes are streamed into its slot later)."""
    if name in graph.initializers:
        raise ExportError(f"quantized tensor name {name!r} is already taken in the graph")
    value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype))
    # Registration wants a value; a reference to nowhere allocates nothing, and is dropped at once.
    value.const_value = ir.ExternalTensor("unwritten", 0, 0, dtype, shape=ir.Shape(shape), name=name)
    graph.register_initializer(value)
    value.const_value = None
    return value


def _fp8_zero_point(graph: ir.Graph) -> ir.Value:
    """The e4m3fn zero point every FP8 QuantizeLinear shares (it fixes the output type; its value is 0)."""
    import ml_dtypes

    if FP8_ZERO_POINT not in graph.initializers:
        value = ir.Value(name=FP8_ZERO_POINT, shape=ir.Shape(()), type=ir.TensorType(ir.DataType.FLOAT8E4M3FN),
                         const_value=ir.tensor(np.zeros((), dtype=ml_dtypes.float8_e4m3fn), name=FP8_ZERO_POINT))
        graph.register_initializer(value)
    return graph.initializers[FP8_ZERO_POINT]

"""The ONNX side of the `plugin` MoE lowering: one `hidream::HiDreamMoE` node per MoE layer, plus a
model-local ONNX function of the same name so ONNX Runtime runs the file with no extra library.

In the traced model the routed experts are the `torch.ops.hidream.HiDreamMoE` op (torch_op.py; the
model's `plugin` lowering calls it); the translation table below turns each call into the custom node,
with its attributes from schema.py. The function body is the `gather` decomposition: it is obtained by
exporting `experts_gather` (below) with the same dynamo exporter, so ONNX Runtime computes exactly what
the `gather` export computes. TensorRT >= 10.7 prefers a registered plugin over a model-local function of
the same name, and the engine build removes the function anyway so the parser can only reach the plugin.
"""

from __future__ import annotations

import warnings

import onnx
import onnx_ir as ir
import torch

from hidream_export.model.moe import gather_experts
from hidream_export.moe import schema, torch_op  # noqa: F401  (torch_op defines torch.ops.hidream.HiDreamMoE)


def experts_gather(hidden, selected_experts, scores, gate_weights, up_weights, down_weights, num_experts: int):
    """HiDreamMoE semantics with stacked weights: the `gather` lowering's dispatch, SwiGLU experts."""
    def expert(e: int):
        return lambda h: (torch.nn.functional.silu(h @ gate_weights[e]) * (h @ up_weights[e])) @ down_weights[e]

    return gather_experts(hidden, selected_experts, scores, [expert(e) for e in range(num_experts)])


def register_onnx_schema() -> None:
    """Declare hidream::HiDreamMoE to ONNX (once), from the shared schema, so onnxscript can emit it."""
    if onnx.defs.has(schema.OP_TYPE, schema.DOMAIN):
        return
    P = onnx.defs.OpSchema.FormalParameter
    float_types = [schema.ONNX_TYPES[t] for t in schema.ACTIVATION_TYPES]
    inputs = [P(name, schema.ONNX_TYPES[schema.INDEX_TYPE] if name == "selected_experts" else "T")
              for name in schema.INPUT_NAMES]
    attr = onnx.defs.OpSchema.Attribute
    AT = onnx.defs.OpSchema.AttrType
    kinds = {str: AT.STRING, int: AT.INT}
    attributes = [attr(name, kinds[kind], name) for name, kind in schema.ATTRIBUTE_TYPES.items()]
    onnx.defs.register_schema(onnx.defs.OpSchema(
        schema.OP_TYPE, schema.DOMAIN, schema.DOMAIN_VERSION, doc=schema.__doc__ or "",
        inputs=inputs, outputs=[P(schema.OUTPUT_NAMES[0], "T")],
        type_constraints=[("T", float_types, "activation dtype")], attributes=attributes))


def translation_table() -> dict:
    """torch.ops.hidream.HiDreamMoE -> hidream::HiDreamMoE (attributes from the shared schema)."""
    from onnxscript import values

    register_onnx_schema()
    hidream = values.Opset(schema.DOMAIN, schema.DOMAIN_VERSION)

    def hidream_moe(hidden, selected_experts, scores, gate_weights, up_weights, down_weights):
        top_k = int(selected_experts.shape[-1])
        num_experts = int(gate_weights.shape[0])
        return getattr(hidream, schema.OP_TYPE)(
            hidden, selected_experts, scores, gate_weights, up_weights, down_weights,
            **schema.node_attributes(top_k, num_experts))

    return {getattr(torch.ops.hidream, schema.OP_TYPE).default: hidream_moe}


class _GatherBody(torch.nn.Module):
    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts

    def forward(self, hidden, selected_experts, scores, gate_weights, up_weights, down_weights):
        return experts_gather(hidden, selected_experts, scores, gate_weights, up_weights, down_weights,
                              self.num_experts)


def function_proto(num_experts: int, top_k: int, hidden: int, intermediate: int, dtype: torch.dtype,
                   opset: int) -> onnx.FunctionProto:
    """The model-local `hidream::HiDreamMoE` function: the gather decomposition for `num_experts` experts."""
    g = torch.Generator().manual_seed(0)
    T = 5
    args = (torch.randn(T, hidden, generator=g).to(dtype),
            torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(T)]).to(torch.int32),
            torch.rand(T, top_k, generator=g).to(dtype),
            torch.randn(num_experts, hidden, intermediate, generator=g).to(dtype),
            torch.randn(num_experts, hidden, intermediate, generator=g).to(dtype),
            torch.randn(num_experts, intermediate, hidden, generator=g).to(dtype))
    tokens = torch.export.Dim("tokens", min=1)
    shapes = ({0: tokens}, {0: tokens}, {0: tokens}, None, None, None)
    with warnings.catch_warnings():
        # One `tokens` dim on three inputs is the point; the exporter warns that it names the axis once.
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape constraints")
        program = torch.onnx.export(_GatherBody(num_experts).eval(), args, dynamo=True, verbose=False,
                                    dynamic_shapes=shapes, input_names=list(schema.INPUT_NAMES),
                                    output_names=list(schema.OUTPUT_NAMES), opset_version=opset, optimize=True)
    graph = onnx.shape_inference.infer_shapes(program.model_proto).graph
    nodes = []
    # A function holds no initializers: turn the few small constants into Constant nodes.
    for init in graph.initializer:
        nodes.append(onnx.helper.make_node("Constant", [], [init.name], value=init))
    nodes.extend(graph.node)
    return onnx.helper.make_function(
        schema.DOMAIN, schema.OP_TYPE, [i.name for i in graph.input], [o.name for o in graph.output], nodes,
        opset_imports=[onnx.helper.make_opsetid("", opset)], attributes=list(schema.ATTRIBUTES))


def attach_function(model: ir.Model, opset: int) -> None:
    """Add the model-local HiDreamMoE function to an exported model (in place), sized from its nodes."""
    nodes = [n for n in model.graph.all_nodes() if n.domain == schema.DOMAIN and n.op_type == schema.OP_TYPE]
    if not nodes:
        raise schema.MoEContractError(f"the plugin export produced no {schema.PLUGIN_ID} node; the MoE lowering was "
                                      f"not applied")
    gate = nodes[0].inputs[3]
    num_experts, hidden, intermediate = (int(d) for d in gate.shape)
    top_k = int(nodes[0].attributes["top_k"].value)
    dtype = {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16,
             ir.DataType.BFLOAT16: torch.bfloat16}[gate.dtype]
    proto = function_proto(num_experts, top_k, hidden, intermediate, dtype, opset)
    function = ir.serde.deserialize_function(proto)
    model.functions[function.identifier()] = function
    model.opset_imports[schema.DOMAIN] = schema.DOMAIN_VERSION

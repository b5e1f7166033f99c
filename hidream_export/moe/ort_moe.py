"""The `ort` MoE lowering's op: ONNX Runtime's contrib `com.microsoft.MoE`, one node per MoE layer.

    torch.ops.ort.MoE(input (T, D), router_logits (T, E), fc1 (E, 2I, D), fc2 (E, D, I), k) -> (T, D)

is HiDream's routed experts in that op's contract: softmax over all E router logits, the top k of them
as weights (not renormalised), each picked expert's SwiGLU `w2(silu(w1 x) * w3 x)` summed with those
weights. fc1 holds every expert's w1 and w3 rows interleaved [g0, u0, g1, u1, ...] (the op's
`swiglu_fusion=1` layout, the only one its CPU kernel takes), fc2 every expert's w2; both keep
nn.Linear's (out, in) orientation, which is the op's current layout (its legacy (in, out) layout is told
apart by shape and never matches HiDream's widths). The shared expert stays outside, as ordinary MatMuls.

The model's `ort` lowering calls the torch op (hidream_export/model/moe.py); the translation table below
writes each call as the contrib node with every attribute explicit (`node_attributes`): older CUDA
kernels fell back to another model's SwiGLU constants when the attributes were absent. The torch body is
the op's maths in plain torch (the eager and oracle path); the fake lets torch.export trace it.

Streaming export: the trace stacks each layer's per-expert weights into fc1/fc2 with graph ops; on a
weightless graph those cannot fold, so `name_fused_weights` replaces each stacked value by one external
initializer named after the op input it feeds (`<layer>.experts.fc1_experts_weights`), and the export
streams its bytes from the per-expert checkpoint tensors (hidream_export/moe/ort_layout.py says which, in
which order, and where each lies in the stack).
"""

from __future__ import annotations

import onnx
import torch
from torch import Tensor
from torch.nn import functional as F

from hidream_export.errors import ExportError
from hidream_export.model.moe import gather_experts
from hidream_export.moe.ort_layout import FC1, FC2, fused_weight

DOMAIN = "com.microsoft"
DOMAIN_VERSION = 1
OP_TYPE = "MoE"
TORCH_OP = "ort::MoE"  # torch.ops.ort.MoE
# The contrib op's inputs, in its order; the `ort` lowering feeds input, router_probs, fc1 and fc2 only.
INPUT_NAMES = ("input", "router_probs", "fc1_experts_weights", "fc1_experts_bias", "fc2_experts_weights",
               "fc2_experts_bias", "fc3_experts_weights", "fc3_experts_bias")
OPTIONAL_INPUTS = frozenset({"fc1_experts_bias", "fc2_experts_bias", "fc3_experts_weights", "fc3_experts_bias"})

# The SwiGLU clamp is min(g, limit) on the gate and clip(u, -limit, limit) on the up projection. The
# largest finite float32 makes both the identity on every finite value of every export dtype (fp16 tops
# out at 65504, bf16 at 3.39e38), so HiDream's unclamped SwiGLU is never changed, while the attribute
# is still written: a kernel that misses it would otherwise pick a default clamp of its own.
SWIGLU_LIMIT = float(3.4028234663852886e38)
ATTRIBUTE_TYPES = {"k": int, "normalize_routing_weights": int, "activation_type": str, "swiglu_fusion": int,
                   "activation_alpha": float, "activation_beta": float, "swiglu_limit": float}


def node_attributes(k: int) -> dict:
    """The node's attributes, all explicit: top-k without renormalisation, SwiGLU silu(g) * u
    (G * sigmoid(alpha G) * (U + beta) with alpha 1, beta 0), fused interleaved fc1, no clamp in effect."""
    return {"k": int(k), "normalize_routing_weights": 0, "activation_type": "swiglu", "swiglu_fusion": 1,
            "activation_alpha": 1.0, "activation_beta": 0.0, "swiglu_limit": SWIGLU_LIMIT}


# ---- the torch op ------------------------------------------------------------------------------------

@torch.library.custom_op(TORCH_OP, mutates_args=())
def ort_moe(input: Tensor, router_logits: Tensor, fc1: Tensor, fc2: Tensor, k: int) -> Tensor:
    """The op's maths in torch (any device): HiDream's `gather` dispatch over the fused weights."""
    weight, idx = router_logits.softmax(dim=-1).topk(k, dim=-1)
    gate, up = fc1[:, 0::2], fc1[:, 1::2]

    def expert(e: int):
        return lambda h: (F.silu(h @ gate[e].T) * (h @ up[e].T)) @ fc2[e].T

    return gather_experts(input, idx, weight, [expert(e) for e in range(fc1.shape[0])])


@ort_moe.register_fake
def _ort_moe_fake(input: Tensor, router_logits: Tensor, fc1: Tensor, fc2: Tensor, k: int) -> Tensor:
    return input.new_empty(input.shape)


# ---- the ONNX node -------------------------------------------------------------------------------------

def register_onnx_schema() -> None:
    """Declare com.microsoft::MoE to the onnx package (once) with the inputs and attributes written here,
    so onnxscript can emit it; ONNX Runtime keeps its own, fuller schema."""
    if onnx.defs.has(OP_TYPE, DOMAIN):
        return
    schema = onnx.defs.OpSchema
    option = schema.FormalParameterOption
    inputs = [schema.FormalParameter(name, "T", name, param_option=option.Optional if name in OPTIONAL_INPUTS
                                     else option.Single) for name in INPUT_NAMES]
    kinds = {int: schema.AttrType.INT, float: schema.AttrType.FLOAT, str: schema.AttrType.STRING}
    attributes = [schema.Attribute(name, kinds[kind], name) for name, kind in ATTRIBUTE_TYPES.items()]
    onnx.defs.register_schema(schema(
        OP_TYPE, DOMAIN, DOMAIN_VERSION, doc="ONNX Runtime's contrib Mixture-of-Experts op", inputs=inputs,
        outputs=[schema.FormalParameter("output", "T", "output")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activation dtype")],
        attributes=attributes))


def translation_table() -> dict:
    """torch.ops.ort.MoE -> com.microsoft::MoE (router logits as router_probs, no biases, no fc3)."""
    from onnxscript import values

    register_onnx_schema()
    op = getattr(values.Opset(DOMAIN, DOMAIN_VERSION), OP_TYPE)

    def moe(input, router_logits, fc1, fc2, k: int):
        return op(input, router_logits, fc1, None, fc2, **node_attributes(k))

    return {torch.ops.ort.MoE.default: moe}


# ---- fused weights in the streaming export -------------------------------------------------------------

def name_fused_weights(model, num_experts: int) -> list[str]:
    """Give every MoE node's fc1/fc2 input its own value-less initializer (in place), so the streaming
    export writes it in the op's layout. The value each replaces must be computed from initializers only,
    exactly the sources `fused_weight` names; the stacking nodes are left dead for the optimizer to drop.
    Returns the new initializer names."""
    import onnx_ir as ir

    initializers = model.graph.initializers
    names = []
    for node in model.graph.all_nodes():
        if node.domain != DOMAIN or node.op_type != OP_TYPE:
            continue
        for which in (FC1, FC2):
            index = INPUT_NAMES.index(which)
            value = node.inputs[index]
            leaves = _initializer_leaves(value, initializers)
            layer = _common_layer(leaves)
            fused = fused_weight(f"{layer}.{which}", num_experts)
            want = sorted(key for keys in fused.sources for key in keys) if fused else None
            if fused is None or sorted(leaves) != want:
                raise ExportError(f"MoE node {node.name}: its {which} is computed from {sorted(leaves)[:4]}..., not "
                                  f"from the {num_experts} experts' weights of one layer; the `ort` lowering was "
                                  f"not traced as expected")
            new = ir.Value(name=fused.name, type=value.type, shape=value.shape)
            initializers.add(new)  # value-less, like every weight of a weightless graph
            node.replace_input_with(index, new)
            names.append(fused.name)
    return names


def _initializer_leaves(value, initializers) -> set[str]:
    """Names of the initializers `value` is computed from; ExportError if a graph input reaches it."""
    leaves, stack, seen = set(), [value], set()
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if v.name in initializers:
            if initializers[v.name] is v:
                leaves.add(v.name)
                continue
        producer = v.producer()
        if producer is None:
            raise ExportError(f"the `ort` lowering's expert weights depend on the graph input {v.name!r}")
        if producer.op_type != "Constant":
            stack.extend(producer.inputs)
    return leaves


def _common_layer(names: set[str]) -> str:
    """`double_stream_blocks.0.block.ff_i.experts` from that layer's expert weight names ('' if none)."""
    layers = {n.split(".experts.", 1)[0] + ".experts" for n in names if ".experts." in n}
    return layers.pop() if len(layers) == 1 else ""

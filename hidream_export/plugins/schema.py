"""The one definition of the `HiDreamMoE` op, read by the ONNX exporter, the model-local ONNX function,
the TensorRT plugin and the lint.

Inputs follow TensorRT's own `TRT_MoE` contract (onnx-tensorrt docs/TRT_custom_ops.md) so a GPU with
native MoE support can swap it in later; the shared expert stays outside the node.

    hidden_states     (T, H)     activation dtype   tokens (batch and sequence flattened)
    selected_experts  (T, k)     int32              top-k expert ids per token
    scores            (T, k)     activation dtype   their routing weights (softmax, not renormalised)
    gate_weights      (E, H, I)  activation dtype   w1 of each expert, transposed
    up_weights        (E, H, I)  activation dtype   w3 of each expert, transposed
    down_weights      (E, I, H)  activation dtype   w2 of each expert, transposed
    -> output         (T, H)     activation dtype   sum_k scores[t,k] * SwiGLU_{e=selected[t,k]}(x_t)
"""

from __future__ import annotations

from dataclasses import dataclass

OP_TYPE = "HiDreamMoE"
DOMAIN = "hidream"
PLUGIN_NAMESPACE = "hidream"
PLUGIN_VERSION = "1"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{OP_TYPE}"  # how tensorrt.plugin names it
DOMAIN_VERSION = 1

INPUT_NAMES = ("hidden_states", "selected_experts", "scores", "gate_weights", "up_weights", "down_weights")
OUTPUT_NAMES = ("output",)
ATTRIBUTES = ("plugin_namespace", "plugin_version", "top_k", "num_experts")


@dataclass(frozen=True)
class MoEShapes:
    tokens: int
    hidden: int
    intermediate: int
    num_experts: int
    top_k: int


class AnyDim:
    """An unknown (dynamic) dimension: equal to anything, so `infer_shapes` only checks known dims."""

    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return "?"


def infer_shapes(hidden_states, selected_experts, scores, gate_weights, up_weights, down_weights) -> MoEShapes:
    """Check the six input shapes against each other and the contract; raise ValueError naming the input.

    Arguments are shape tuples (ints, or any symbolic dim objects that support ==)."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(f"{OP_TYPE}: {msg}")

    need(len(hidden_states) == 2, f"hidden_states must be (T, H), got {tuple(hidden_states)}")
    T, H = hidden_states
    need(len(selected_experts) == 2 and selected_experts[0] == T,
         f"selected_experts must be (T={T}, k), got {tuple(selected_experts)}")
    k = selected_experts[1]
    need(tuple(scores) == tuple(selected_experts), f"scores must be (T={T}, k={k}), got {tuple(scores)}")
    need(len(gate_weights) == 3 and gate_weights[1] == H, f"gate_weights must be (E, H={H}, I), got {tuple(gate_weights)}")
    E, _, I = gate_weights
    need(tuple(up_weights) == tuple(gate_weights), f"up_weights must be (E={E}, H={H}, I={I}), got {tuple(up_weights)}")
    need(tuple(down_weights) == (E, I, H), f"down_weights must be (E={E}, I={I}, H={H}), got {tuple(down_weights)}")
    return MoEShapes(T, H, I, E, k)


def node_attributes(top_k: int, num_experts: int) -> dict:
    return {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION,
            "top_k": int(top_k), "num_experts": int(num_experts)}

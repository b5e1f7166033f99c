"""The one definition of the `HiDreamMoE` op and its rules, read by every consumer: the torch op, the
Triton kernels, the ONNX node and its model-local function, the TensorRT plugin and the lint. Plain
Python (no torch, onnx or TensorRT).

Inputs follow TensorRT's own `TRT_MoE` contract (onnx-tensorrt docs/TRT_custom_ops.md) so a GPU with
native MoE support can swap it in later; the shared expert stays outside the node.

    hidden_states     (T, H)     activation dtype   tokens (batch and sequence flattened)
    selected_experts  (T, k)     int32              top-k expert ids per token
    scores            (T, k)     activation dtype   their routing weights (softmax, not renormalised)
    gate_weights      (E, H, I)  activation dtype   w1 of each expert, transposed
    up_weights        (E, H, I)  activation dtype   w3 of each expert, transposed
    down_weights      (E, I, H)  activation dtype   w2 of each expert, transposed
    -> output         (T, H)     activation dtype   sum_k scores[t,k] * SwiGLU_{e=selected[t,k]}(x_t)

Attributes: `top_k` (k) and `num_experts` (E), with 1 <= k <= E, plus the TensorRT lookup keys
`plugin_namespace` and `plugin_version`. `check` is the only place these rules are written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from hidream_export.errors import MoEContractError

OP_TYPE = "HiDreamMoE"
DOMAIN = "hidream"  # ONNX domain and torch.library namespace
DOMAIN_VERSION = 1
PLUGIN_NAMESPACE = "hidream"
PLUGIN_VERSION = "1"  # tensorrt.plugin creators are always version "1"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{OP_TYPE}"  # how tensorrt.plugin names it
TORCH_OP = f"{DOMAIN}::{OP_TYPE}"  # torch.ops.hidream.HiDreamMoE

INPUT_NAMES = ("hidden_states", "selected_experts", "scores", "gate_weights", "up_weights", "down_weights")
OUTPUT_NAMES = ("output",)
ATTRIBUTES = ("plugin_namespace", "plugin_version", "top_k", "num_experts")
ATTRIBUTE_TYPES = {"plugin_namespace": str, "plugin_version": str, "top_k": int, "num_experts": int}
SELECTED_INDEX = INPUT_NAMES.index("selected_experts")

# Data types by their canonical (TensorRT AutoTuneCombination) names.
ACTIVATION_TYPES = ("FP32", "FP16", "BF16")
INDEX_TYPE = "INT32"
ONNX_TYPES = {"FP32": "tensor(float)", "FP16": "tensor(float16)", "BF16": "tensor(bfloat16)",
              "INT32": "tensor(int32)"}

_DTYPE_NAMES = {
    # canonical: accepted spellings (numpy, torch, onnx, TensorRT enum names, AutoTuneCombination)
    "FP32": ("fp32", "float32", "float", "torch.float32", "tensor(float)", "kfloat"),
    "FP16": ("fp16", "float16", "half", "torch.float16", "tensor(float16)", "khalf"),
    "BF16": ("bf16", "bfloat16", "torch.bfloat16", "tensor(bfloat16)", "kbf16"),
    "INT32": ("int32", "torch.int32", "tensor(int32)", "kint32"),
    "INT64": ("int64", "torch.int64", "tensor(int64)", "kint64"),
    "FP64": ("fp64", "float64", "double", "torch.float64", "tensor(double)"),
}
_DTYPE_LOOKUP = {alias: canon for canon, aliases in _DTYPE_NAMES.items() for alias in (canon.lower(), *aliases)}


def dtype_name(dtype: Any) -> str:
    """'FP32' | 'FP16' | 'BF16' | 'INT32' | 'INT64' from any usual spelling (a string, a numpy/torch dtype,
    a TensorRT DataType, an ONNX TensorProto type name); any other type comes back as its own upper-case
    name, for messages."""
    name = getattr(dtype, "name", None)  # TensorRT enums (DataType.HALF) and numpy dtypes
    for candidate in (name, str(dtype)):
        if isinstance(candidate, str):
            key = candidate.strip().lower().removeprefix("datatype.")
            if key in _DTYPE_LOOKUP:
                return _DTYPE_LOOKUP[key]
    return str(name or dtype).upper()


@dataclass(frozen=True)
class MoEShapes:
    tokens: Any
    hidden: Any
    intermediate: Any
    num_experts: Any
    top_k: Any


class AnyDim:
    """An unknown (dynamic) dimension: equal to anything, so `check` only compares known dims."""

    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return "?"


def _dims(shape: Sequence) -> tuple:
    """Ints stay; None, symbolic names ('batch') and symbolic objects become AnyDim."""
    return tuple(d if isinstance(d, int) and not isinstance(d, bool) else
                 (AnyDim() if d is None or isinstance(d, str) else d) for d in shape)


def _known(d: Any) -> int | None:
    return d if isinstance(d, int) and not isinstance(d, bool) else None


def check(shapes: Sequence[Sequence], dtypes: Sequence | None = None, *, top_k: int | None = None,
          num_experts: int | None = None) -> MoEShapes:
    """THE HiDreamMoE contract: six input shapes (dims as ints; None, names or symbolic objects for unknown
    dims), optionally their six dtypes (any spelling `dtype_name` reads) and the node's `top_k` /
    `num_experts` attributes. Returns the sizes; raises MoEContractError naming the input or attribute.

    Every consumer calls this: the torch op and its fake, the Triton entry point, the lint, the TensorRT
    shape/type function and autotune; so one bad input gives one message everywhere."""
    def fail(msg: str) -> None:
        raise MoEContractError(f"{OP_TYPE}: {msg}")

    if len(shapes) != len(INPUT_NAMES):
        fail(f"takes {len(INPUT_NAMES)} inputs {INPUT_NAMES}, got {len(shapes)}")
    hs, sel, sc, gate, up, down = (_dims(s) for s in shapes)
    if len(hs) != 2:
        fail(f"hidden_states must be (T, H), got {tuple(hs)}")
    T, H = hs
    if not (len(sel) == 2 and sel[0] == T):
        fail(f"selected_experts must be (T={T}, k), got {tuple(sel)}")
    k = sel[1]
    if tuple(sc) != tuple(sel):
        fail(f"scores must be (T={T}, k={k}), got {tuple(sc)}")
    if not (len(gate) == 3 and gate[1] == H):
        fail(f"gate_weights must be (E, H={H}, I), got {tuple(gate)}")
    E, _, I = gate
    if tuple(up) != tuple(gate):
        fail(f"up_weights must be (E={E}, H={H}, I={I}), got {tuple(up)}")
    if tuple(down) != (E, I, H):
        fail(f"down_weights must be (E={E}, I={I}, H={H}), got {tuple(down)}")
    k_dim, e_dim = _known(k), _known(E)
    check_attributes(top_k, num_experts)
    if top_k is not None and k_dim is not None and top_k != k_dim:
        fail(f"attribute top_k={top_k} but selected_experts has {k_dim} columns")
    if num_experts is not None and e_dim is not None and num_experts != e_dim:
        fail(f"attribute num_experts={num_experts} but gate_weights stacks {e_dim} experts")
    k_val = top_k if top_k is not None else k_dim
    e_val = num_experts if num_experts is not None else e_dim
    if k_val is not None and e_val is not None and not 1 <= k_val <= e_val:
        fail(f"top_k={k_val} must be in 1..num_experts={e_val} (each token picks distinct experts)")
    if dtypes is not None:
        check_dtypes(dtypes)
    return MoEShapes(T, H, I, E, k)


def check_attributes(top_k: Any = None, num_experts: Any = None) -> None:
    """The attribute half of `check` on its own (what is known without shapes): integers >= 1, k <= E."""
    for name, value in (("top_k", top_k), ("num_experts", num_experts)):
        if value is not None and (_known(value) is None or value < 1):
            raise MoEContractError(f"{OP_TYPE}: attribute {name}={value!r} must be an integer >= 1")
    if top_k is not None and num_experts is not None and top_k > num_experts:
        raise MoEContractError(f"{OP_TYPE}: top_k={top_k} must be in 1..num_experts={num_experts} (each token picks "
                               f"distinct experts)")


def check_dtypes(dtypes: Sequence) -> str:
    """The dtype half of `check`: selected_experts INT32, every other input one activation type.
    Returns the activation type (the output's)."""
    if len(dtypes) != len(INPUT_NAMES):
        raise MoEContractError(f"{OP_TYPE}: takes {len(INPUT_NAMES)} inputs {INPUT_NAMES}, got {len(dtypes)} dtypes")
    names = [dtype_name(d) for d in dtypes]
    if names[SELECTED_INDEX] != INDEX_TYPE:
        raise MoEContractError(f"{OP_TYPE}: selected_experts must be {INDEX_TYPE}, got {names[SELECTED_INDEX]}")
    act = names[0]
    if act not in ACTIVATION_TYPES:
        raise MoEContractError(f"{OP_TYPE}: hidden_states must be one of {ACTIVATION_TYPES}, got {act}")
    for name, dtype in zip(INPUT_NAMES, names):
        if name != "selected_experts" and dtype != act:
            raise MoEContractError(f"{OP_TYPE}: {name} is {dtype}, hidden_states is {act} (one activation type)")
    return act


def check_tensors(*tensors: Any) -> MoEShapes:
    """`check` on six tensors (anything with .shape, .dtype and .device: torch tensors, fake or real),
    plus one device for all six."""
    shapes = check([tuple(t.shape) for t in tensors], [t.dtype for t in tensors])
    devices = {str(t.device) for t in tensors}
    if len(devices) != 1:
        raise MoEContractError(f"{OP_TYPE}: inputs are on several devices: {sorted(devices)}")
    return shapes


def node_attributes(top_k: int, num_experts: int) -> dict:
    return {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION,
            "top_k": int(top_k), "num_experts": int(num_experts)}

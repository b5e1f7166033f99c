"""`hidream::moe_experts`: the `HiDreamMoE` op (schema.py) as a PyTorch custom op, and the `triton` MoE
lowering of the reference model.

Why a custom op: it gives the routed experts one opaque node with a fixed contract. Eager CUDA runs the
Triton grouped-GEMM kernels (moe_triton.py); CPU runs a plain reference loop; the fake implementation lets
torch.export / torch.compile trace through it without running anything (the node then maps 1:1 onto the
ONNX `HiDreamMoE` node and the TensorRT plugin).

    torch.ops.hidream.moe_experts(hidden (T,H), selected_experts int32 (T,k), scores (T,k),
                                  gate_w (E,H,I), up_w (E,H,I), down_w (E,I,H)) -> (T,H)

The shared expert is not part of the op. Inference only: no autograd formula is registered.

Importing this module registers the op and adds "triton" to `hidream_export.model.moe.EXTRA_LOWERINGS`.
Triton itself is imported only when a CUDA tensor reaches the op, so CPU-only installs work without it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from hidream_export.model import moe as model_moe

from . import schema

__all__ = ["moe_experts", "moe_experts_reference", "triton_lowering", "stacked_expert_weights",
           "invalidate_stacked_weights", "CACHE_STACKED_WEIGHTS"]

OP_NAME = "hidream::moe_experts"

# Keep the stacked (E, ...) copies of each MoE layer's expert weights between calls. Saves three
# torch.stack per layer and call, at the price of a second copy of the expert weights in memory
# (for the full 17B model, about 20 GB in bf16). Set to False to re-stack on every call instead.
CACHE_STACKED_WEIGHTS = True
_CACHE_ATTR = "_hidream_stacked_weights"


def _check(hidden: Tensor, selected_experts: Tensor, scores: Tensor, gate_w: Tensor, up_w: Tensor,
           down_w: Tensor) -> schema.MoEShapes:
    shapes = schema.infer_shapes(hidden.shape, selected_experts.shape, scores.shape, gate_w.shape, up_w.shape,
                                 down_w.shape)
    if selected_experts.dtype != torch.int32:
        raise TypeError(f"{schema.OP_TYPE}: selected_experts must be int32 (the op contract), "
                        f"got {selected_experts.dtype}")
    for name, t in (("scores", scores), ("gate_weights", gate_w), ("up_weights", up_w), ("down_weights", down_w)):
        if t.dtype != hidden.dtype:
            raise TypeError(f"{schema.OP_TYPE}: {name} is {t.dtype}, hidden_states is {hidden.dtype}")
    return shapes


def moe_experts_reference(hidden: Tensor, selected_experts: Tensor, scores: Tensor, gate_w: Tensor,
                          up_w: Tensor, down_w: Tensor) -> Tensor:
    """The op's maths as a plain per-expert loop in torch with fp32 accumulation (any device).

    Each expert runs only on the rows that picked it; results are weighted and summed in fp32, then cast
    to the activation dtype once. `nonzero` makes row counts data-dependent (a host sync on CUDA): this is
    the readable oracle and the CPU kernel, not the fast path."""
    _check(hidden, selected_experts, scores, gate_w, up_w, down_w)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    x = hidden.float()
    for e in range(gate_w.shape[0]):
        tokens, slots = torch.nonzero(selected_experts == e, as_tuple=True)
        if tokens.numel() == 0:
            continue
        rows = x[tokens]
        act = F.silu(rows @ gate_w[e].float()) * (rows @ up_w[e].float())
        y = (act @ down_w[e].float()) * scores[tokens, slots].float()[:, None]
        out.index_add_(0, tokens, y)
    return out.to(hidden.dtype)


@torch.library.custom_op(OP_NAME, mutates_args=(), device_types="cpu")
def moe_experts(hidden: Tensor, selected_experts: Tensor, scores: Tensor, gate_w: Tensor, up_w: Tensor,
                down_w: Tensor) -> Tensor:
    """Routed MoE experts (see the module docstring). This body is the CPU kernel: the reference loop."""
    return moe_experts_reference(hidden, selected_experts, scores, gate_w, up_w, down_w)


@moe_experts.register_kernel("cuda")
def _moe_experts_cuda(hidden: Tensor, selected_experts: Tensor, scores: Tensor, gate_w: Tensor, up_w: Tensor,
                      down_w: Tensor) -> Tensor:
    """CUDA kernel: the Triton grouped-GEMM path (no host sync)."""
    _check(hidden, selected_experts, scores, gate_w, up_w, down_w)
    try:
        from .moe_triton import moe_experts_triton
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(f"{OP_NAME} on CUDA needs Triton: pip install 'hidream-export[kernels]' ({err})") from err
    return moe_experts_triton(hidden, selected_experts, scores, gate_w, up_w, down_w)


@moe_experts.register_fake
def _moe_experts_fake(hidden: Tensor, selected_experts: Tensor, scores: Tensor, gate_w: Tensor, up_w: Tensor,
                      down_w: Tensor) -> Tensor:
    """Shape/dtype propagation for tracing: the output is (T, H) like hidden_states."""
    _check(hidden, selected_experts, scores, gate_w, up_w, down_w)
    return hidden.new_empty(hidden.shape)


# ------------------------------------------------------------------------------------------------
# The "triton" lowering of MoEFeedForward
# ------------------------------------------------------------------------------------------------
def _expert_params(moe_module) -> list[Tensor]:
    return [p for expert in moe_module.experts for p in (expert.w1.weight, expert.w3.weight, expert.w2.weight)]


def invalidate_stacked_weights(moe_module) -> None:
    """Drop a layer's cached stacked weights. Needed only after writing weights through `.data`, which
    bypasses the version counter the cache checks (in-place ops, load_state_dict and .to() are detected)."""
    moe_module.__dict__.pop(_CACHE_ATTR, None)


def stacked_expert_weights(moe_module, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """`moe_module.stacked_weights()` (gate (E,D,I), up (E,D,I), down (E,I,D)), cast to `dtype`, cached.

    The cache key is every expert parameter's (data_ptr, version, shape, dtype, device) plus `dtype`, so
    replaced tensors (load into new storage, .to(), `p.data = ...`) and in-place updates (optimizer steps,
    `copy_` under no_grad, load_state_dict) all invalidate it. While tracing (torch.export/compile, where
    parameters may be fake tensors without storage) nothing is cached and the stack is part of the graph."""
    def build() -> tuple[Tensor, Tensor, Tensor]:
        w1, w3, w2 = moe_module.stacked_weights()
        if dtype is not None:
            w1, w3, w2 = w1.to(dtype), w3.to(dtype), w2.to(dtype)
        return w1, w3, w2

    if not CACHE_STACKED_WEIGHTS or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return build()
    try:
        key = tuple((p.data_ptr(), p._version, tuple(p.shape), p.dtype, p.device) for p in _expert_params(moe_module))
    except RuntimeError:  # e.g. inference tensors have no version counter: don't cache what we can't check
        return build()
    key += (dtype,)
    cached = moe_module.__dict__.get(_CACHE_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():  # a cache must not hold an autograd graph
        weights = build()
    moe_module.__dict__[_CACHE_ATTR] = (key, weights)
    return weights


def triton_lowering(moe_module, x_flat: Tensor, topk_idx: Tensor, topk_weight: Tensor) -> Tensor:
    """`MoEFeedForward` lowering "triton": the routed output (T, D) through `hidream::moe_experts`
    (Triton kernels on CUDA, the reference loop on CPU). The shared expert is added by the caller."""
    gate_w, up_w, down_w = stacked_expert_weights(moe_module, x_flat.dtype)
    return torch.ops.hidream.moe_experts(x_flat, topk_idx.to(torch.int32), topk_weight.to(x_flat.dtype),
                                         gate_w, up_w, down_w)


model_moe.EXTRA_LOWERINGS["triton"] = triton_lowering

"""HiDream's feed-forward layers: the SwiGLU expert and the routed Mixture-of-Experts.

Routing (as in the official model, "modified from DeepSeek-V3"): softmax over the expert logits, top-k
(k=2 of 4), weights NOT renormalised, plus a shared expert that every token always goes through.

The official inference path (`moe_infer`) reads per-expert token counts on the host (`.cpu()`), which
breaks tracing and bakes one input's routing into an exported graph. Here the routed part has
interchangeable lowerings with identical maths, chosen by `MoEFeedForward.lowering`:

- "reference": official summation semantics without any host sync: a zero buffer, then for each expert
  in ascending order `+= expert(x) * weight` (weight 0 for tokens that did not pick it). Each expert runs
  on every token, so it is bit-compatible with `moe_infer` but costs E/k of the routed FLOPs.
- "dense": every expert on every token, stacked (T, E, D) and combined with a (T, E) weight matrix that
  is zero outside the top-k. Static shapes; the export fallback.
- "gather": per expert, gather the tokens that picked it, run the expert on those rows only, and scatter
  the weighted result back (one plain scatter per expert into zeros, then an add: no scatter-reduction,
  which TensorRT rejects). Exact FLOPs; data-dependent row counts.
- "plugin": the routed experts as ONE op, `torch.ops.hidream.HiDreamMoE(x, ids int32, scores, gate (E,D,I),
  up (E,D,I), down (E,I,D))`, which the ONNX export writes as one `hidream::HiDreamMoE` node and TensorRT
  runs as a plugin. The op is defined outside the model (hidream_export.moe: Triton kernels on CUDA, a
  reference loop on CPU); this lowering only calls it, so the model itself needs nothing but torch.
- "ort": the routed experts as ONE op in ONNX Runtime's `com.microsoft.MoE` layout,
  `torch.ops.ort.MoE(x, router_logits (T, E), fc1 (E, 2I, D), fc2 (E, D, I), k)`: the op takes the softmax
  and the top-k itself, fc1 holds each expert's w1 and w3 rows interleaved (`swiglu_fused_rows`), fc2 its
  w2. Defined outside the model too (hidream_export.moe.ort_moe), which writes it as the contrib node.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .choice import Choice
from .lowerings import LOWERINGS

# Keep the stacked (E, ...) copies of each MoE layer's expert weights between `plugin` calls. Saves three
# torch.stack per layer and call, at the price of a second copy of the expert weights in memory (for the
# full 17B model, about 20 GB in bf16). Set to False to re-stack on every call instead.
CACHE_STACKED_WEIGHTS = True
_CACHE_ATTR = "_hidream_stacked_weights"


class SwiGLU(nn.Module):
    """w2(SiLU(w1 x) * w3 x), bias-free."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoEGate(nn.Module):
    """Softmax router; computed in the activation dtype like the official model."""

    def __init__(self, dim: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.weight, std=dim ** -0.5)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, D) -> router logits (T, E), before the softmax."""
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (T, D) -> (topk_idx (T, k) int64, topk_weight (T, k))."""
        scores = self.logits(x).softmax(dim=-1)
        # The official code asks for sorted=False; the slot order never changes the routed sum (experts
        # are accumulated in ascending expert order), and TensorRT's parser only accepts sorted TopK.
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=True)
        return topk_idx, topk_weight


def swiglu_fused_rows(w1: torch.Tensor, w3: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(..., I, D) gate and up weights -> (..., 2I, D) with their rows interleaved [g0, u0, g1, u1, ...]:
    ONNX Runtime's fused SwiGLU layout (`swiglu_fusion=1`). Works on whole stacks and on row blocks alike,
    so the streaming export writes exactly what this returns (into `out`, (..., I, 2, D), if given)."""
    return torch.stack([w1, w3], dim=-2, out=out).flatten(-3, -2)


def routing_weight_matrix(topk_idx: torch.Tensor, topk_weight: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(T, k) routing -> (T, E) weights, zero outside the top-k (Equal/Where/ReduceSum only)."""
    experts = torch.arange(num_experts, device=topk_idx.device)
    hit = topk_idx[..., None] == experts  # (T, k, E)
    return torch.where(hit, topk_weight[..., None], torch.zeros_like(topk_weight[..., None])).sum(dim=1)


def gather_experts(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                   experts: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
    """The `gather` dispatch: per expert, run it on the rows that picked it and scatter them back weighted.

    Shared by the `gather` lowering and the body of the exported HiDreamMoE function (stacked weights)."""
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        # (T, k) mask; a token picks an expert at most once, so the token indices are unique.
        tokens, slots = torch.nonzero(topk_idx == e, as_tuple=True)
        rows = expert(x[tokens]) * topk_weight[tokens, slots][:, None]
        # Plain scatter into zeros, then add: the same ascending-expert summation as the official code,
        # without a scatter-reduction (which TensorRT rejects).
        out = out + torch.zeros_like(x).index_put((tokens,), rows)
    return out


def _reference(moe: "MoEFeedForward", x, topk_idx, topk_weight):
    out = torch.zeros_like(x)
    for e, expert in enumerate(moe.experts):
        weight = torch.where(topk_idx == e, topk_weight, torch.zeros_like(topk_weight)).sum(-1, keepdim=True)
        out = out + expert(x) * weight
    return out


def _dense(moe: "MoEFeedForward", x, topk_idx, topk_weight):
    weights = routing_weight_matrix(topk_idx, topk_weight, moe.num_experts)  # (T, E)
    outs = torch.stack([expert(x) for expert in moe.experts], dim=1)  # (T, E, D)
    return (outs * weights[..., None]).sum(dim=1)


def _gather(moe: "MoEFeedForward", x, topk_idx, topk_weight):
    return gather_experts(x, topk_idx, topk_weight, moe.experts)


def _plugin(moe: "MoEFeedForward", x, topk_idx, topk_weight):
    op = getattr(torch.ops.hidream, "HiDreamMoE", None)
    if op is None:
        raise RuntimeError("MoE lowering 'plugin' calls torch.ops.hidream.HiDreamMoE, which is not defined in this "
                           "process; `import hidream_export.moe.torch_op` defines it")
    gate_w, up_w, down_w = moe.stacked_expert_weights(x.dtype)
    return op(x, topk_idx.to(torch.int32), topk_weight.to(x.dtype), gate_w, up_w, down_w)


def _ort(moe: "MoEFeedForward", x, topk_idx, topk_weight):
    # The op routes from the logits itself (softmax, then top-k), so the gate's routing is not used here;
    # a trace drops it as dead code.
    op = getattr(getattr(torch.ops, "ort", None), "MoE", None)
    if op is None:
        raise RuntimeError("MoE lowering 'ort' calls torch.ops.ort.MoE, which is not defined in this process; "
                           "`import hidream_export.moe.ort_moe` defines it")
    fc1, fc2 = moe.fused_expert_weights()
    return op(x, moe.gate.logits(x), fc1, fc2, moe.top_k)


# The implementation of each lowering named in lowerings.py: fn(moe_module, x (T, D), topk_idx (T, k),
# topk_weight (T, k)) -> routed output (T, D).
MOE_LOWERINGS: dict[str, Callable] = {"reference": _reference, "dense": _dense, "gather": _gather, "plugin": _plugin,
                                      "ort": _ort}
assert set(MOE_LOWERINGS) == set(LOWERINGS), "every lowering in lowerings.py has an implementation here"


class MoEFeedForward(nn.Module):
    lowering = Choice(LOWERINGS, "moe_lowering")

    def __init__(self, dim: int, hidden: int, shared_hidden: int, num_experts: int, top_k: int,
                 lowering: str = "reference"):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.shared_experts = SwiGLU(dim, shared_hidden)
        self.experts = nn.ModuleList(SwiGLU(dim, hidden) for _ in range(num_experts))
        self.gate = MoEGate(dim, num_experts, top_k)
        self.lowering = lowering

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        topk_idx, topk_weight = self.gate(flat)
        routed = MOE_LOWERINGS[self.lowering](self, flat, topk_idx, topk_weight)
        return routed.reshape(shape) + self.shared_experts(x)

    # Stacked weights in TensorRT's MoE layout: gate/up (E, D, I), down (E, I, D).
    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w1 = torch.stack([e.w1.weight.t() for e in self.experts])
        w3 = torch.stack([e.w3.weight.t() for e in self.experts])
        w2 = torch.stack([e.w2.weight.t() for e in self.experts])
        return w1, w3, w2

    # ONNX Runtime's MoE layout: fc1 (E, 2I, D) with w1/w3 rows interleaved, fc2 (E, D, I) (nn.Linear's own
    # (out, in) orientation, so nothing is transposed).
    def fused_expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = torch.stack([e.w1.weight for e in self.experts])
        w3 = torch.stack([e.w3.weight for e in self.experts])
        return swiglu_fused_rows(w1, w3), torch.stack([e.w2.weight for e in self.experts])

    def invalidate_stacked_weights(self) -> None:
        """Drop the cached stacked weights. Needed only after writing weights through `.data`, which bypasses
        the version counter the cache checks (in-place ops, load_state_dict and .to() are detected)."""
        self.__dict__.pop(_CACHE_ATTR, None)

    def stacked_expert_weights(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`stacked_weights()` cast to `dtype`, cached between calls.

        The cache key is every expert parameter's (data_ptr, version, shape, dtype, device) plus `dtype`,
        so replaced tensors (load into new storage, .to(), `p.data = ...`) and in-place updates (`copy_`
        under no_grad, load_state_dict) invalidate it. While tracing (torch.export/compile, where parameters
        may be fake tensors without storage) nothing is cached and the stack is part of the graph."""
        def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            w1, w3, w2 = self.stacked_weights()
            if dtype is not None:
                w1, w3, w2 = w1.to(dtype), w3.to(dtype), w2.to(dtype)
            return w1, w3, w2

        if not CACHE_STACKED_WEIGHTS or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return build()
        params = [p for expert in self.experts for p in (expert.w1.weight, expert.w3.weight, expert.w2.weight)]
        try:
            key = tuple((p.data_ptr(), p._version, tuple(p.shape), p.dtype, p.device) for p in params)
        except RuntimeError:  # e.g. inference tensors have no version counter: don't cache what we can't check
            return build()
        key += (dtype,)
        cached = self.__dict__.get(_CACHE_ATTR)
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():  # a cache must not hold an autograd graph
            weights = build()
        self.__dict__[_CACHE_ATTR] = (key, weights)
        return weights

"""Triton kernels for the `HiDreamMoE` op (routed experts only; the shared expert stays outside).

The op contract is in `schema.py`:

    out[t] = sum_j scores[t, j] * down_e( silu(x_t @ gate_e) * (x_t @ up_e) ),   e = selected_experts[t, j]

Design (the layout used by the fastest open MoE implementations, e.g. vLLM's fused_moe and TRT-LLM's
MoE plugin): instead of running each expert on every token (E/k times the FLOPs) or looping over experts on
the host (a device->host sync plus data-dependent shapes), the T*k (token, slot) pairs are sorted by expert
and every expert's segment is padded to a multiple of BLOCK_M. Every BLOCK_M row tile then belongs to exactly
one expert, so a single launch of an ordinary tiled GEMM covers all experts ("grouped GEMM"): a program reads
its tile's expert id and indexes that expert's weights.

Four steps, none of which reads anything back to the host, so the whole op is CUDA-graph capturable and
its launch grid depends only on shapes:

1. `align_by_expert` (torch ops on the device): stable sort of the pairs by expert, per-expert counts via
   `scatter_add_` (not `bincount`, which syncs on CUDA to size its output), counts padded to BLOCK_M, and a
   static worst-case buffer of T*k + E*(BLOCK_M-1) rows whose padding rows hold the sentinel T*k. The real
   number of padded rows lives in a 1-element device tensor; tiles past it return immediately.
2. `_gate_up_swiglu_kernel`: one grouped GEMM for gate and up together (the activation tile is loaded once
   for both), SwiGLU fused in the epilogue on the fp32 accumulators, written once in the activation dtype.
   The (rows, I) intermediate is the only large temporary, and it never exists un-activated.
3. `_down_kernel`: grouped GEMM intermediate @ W_down, fp32 accumulation, each row written to its own
   (token, slot) row of a (T*k, H) buffer -- every output row has exactly one writer, so no atomics and
   the result is deterministic.
4. `_combine_kernel`: per token, the score-weighted sum over its k slot rows in fp32.

Accumulation is always fp32; fp16/bf16/fp32 inputs are supported. fp32 GEMMs use IEEE precision unless
`MoETileConfig.allow_tf32` is set (TF32 would break the 1e-5 agreement with the reference).

Tile sizes are a `MoETileConfig`; `default_config` is a starting heuristic, to be tuned on the target GPU.
Set TRITON_INTERPRET=1 before importing this module to run the kernels on CPU tensors (tests do this).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# The kernels are validated with FP fusion on (Triton 3.9's default, which 3.10 changes): pin it, so a newer
# Triton keeps their numbers, and Triton does not warn at every compile.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from . import schema  # noqa: E402

__all__ = ["MoETileConfig", "MoEAlignment", "default_config", "align_by_expert", "moe_triton", "interpreting"]


# ------------------------------------------------------------------------------------------------
# Tile configuration
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MoETileConfig:
    """Tile sizes and launch parameters of the grouped GEMMs.

    block_m:  rows per tile; also the padding granularity of each expert's segment. Small values waste
              less padding when experts get few tokens, large ones reuse each weight tile more.
    block_n:  output columns per tile (I for gate/up, H for down).
    block_k:  reduction step.
    group_m:  row tiles launched next to each other for the same column tile, so the weight tile they
              share stays in L2 (the usual "grouped ordering" swizzle).
    combine_block: H columns per program in the combine kernel.
    allow_tf32: let fp32 inputs use TF32 tensor cores (faster, ~1e-3 relative error).
    """

    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    combine_block: int = 128
    allow_tf32: bool = False

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "combine_block", "group_m"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"MoETileConfig.{name} must be a power of two, got {value}")
        for name in ("block_m", "block_n", "block_k"):
            if getattr(self, name) < 16:
                raise ValueError(f"MoETileConfig.{name} must be >= 16 (tl.dot's minimum), got {getattr(self, name)}")


def default_config(tokens: int, top_k: int, num_experts: int, dtype: torch.dtype) -> MoETileConfig:
    """A reasonable starting tile config from the average rows per expert (not tuned per GPU).

    With few rows per expert a large BLOCK_M is mostly padding, so BLOCK_M follows the expected segment
    length. The gate/up kernel streams one activation tile and TWO weight tiles per K step, so the sizes
    are kept under ~75 KB of shared memory with 3 stages (fits sm_80/86/89/90); fp32 tiles are twice as
    large per element and get a smaller K step and 2 stages."""
    rows_per_expert = tokens * top_k / max(num_experts, 1)
    if rows_per_expert <= 16:
        block_m, block_n, block_k = 16, 64, 64
    elif rows_per_expert <= 64:
        block_m, block_n, block_k = 32, 64, 64
    elif rows_per_expert <= 512:
        block_m, block_n, block_k = 64, 128, 32
    else:
        block_m, block_n, block_k = 128, 128, 32
    num_stages = 3
    if dtype == torch.float32:
        block_k, num_stages = 16, 2
    return MoETileConfig(block_m=block_m, block_n=block_n, block_k=block_k, num_stages=num_stages,
                         num_warps=8 if block_m * block_n >= 128 * 128 else 4)


# ------------------------------------------------------------------------------------------------
# 1. Align: sort (token, slot) pairs by expert, pad each expert segment to BLOCK_M
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MoEAlignment:
    """The expert-sorted, block-padded row layout shared by the two grouped GEMMs.

    sorted_pairs:  (max_rows,) int32. Row r of the padded layout holds pair index token*k + slot, or the
                   sentinel num_pairs for padding rows (and for the unused tail of the worst-case buffer).
    block_experts: (num_blocks,) int32. Expert of each BLOCK_M tile; -1 for tiles past the used rows.
    num_padded:    (1,) int32 device tensor: rows actually used (a multiple of block_m).
    num_pairs:     T*k.
    block_m:       the padding granularity.
    """

    sorted_pairs: torch.Tensor
    block_experts: torch.Tensor
    num_padded: torch.Tensor
    num_pairs: int
    block_m: int

    @property
    def max_rows(self) -> int:
        return self.sorted_pairs.numel()

    @property
    def num_blocks(self) -> int:
        return self.block_experts.numel()


def align_by_expert(selected_experts: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    """Build the padded expert-sorted layout with device-side torch ops only (no host sync).

    Buffers have the static worst-case size T*k + E*(block_m-1) (every expert's last tile padded by
    block_m-1 rows), so the launch grid is a function of shapes alone. Expert ids must lie in [0, E)."""
    flat = selected_experts.reshape(-1).to(torch.int64)
    device = flat.device
    num_pairs = flat.numel()

    # Stable sort: within one expert the rows stay in token order (deterministic, better locality).
    sorted_ids, order = torch.sort(flat, stable=True)

    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded_counts = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded_counts, 0)
    padded_start = padded_end - padded_counts
    start = torch.cumsum(counts, 0) - counts

    # Position of sorted pair j in the padded layout: its expert's padded start + its rank in the expert.
    rank = torch.arange(num_pairs, device=device) - start[sorted_ids]
    dest = padded_start[sorted_ids] + rank

    max_rows = num_pairs + num_experts * (block_m - 1)
    sorted_pairs = torch.full((max_rows,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, dest, order.to(torch.int32))

    # Expert of each tile: the first expert whose padded segment ends after the tile start. Empty experts
    # have empty segments and are skipped by right=True; tiles past the used rows get -1 (never read:
    # their programs exit before loading an expert id).
    num_blocks = triton.cdiv(max_rows, block_m)
    block_start = torch.arange(num_blocks, device=device) * block_m
    block_experts = torch.searchsorted(padded_end, block_start, right=True)
    total = padded_end[-1:]
    block_experts = torch.where(block_start < total, block_experts, torch.full_like(block_experts, -1))

    return MoEAlignment(sorted_pairs=sorted_pairs, block_experts=block_experts.to(torch.int32),
                        num_padded=total.to(torch.int32), num_pairs=num_pairs, block_m=block_m)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------
def interpreting() -> bool:
    """Whether the kernels below were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_down_kernel).__name__ == "InterpretedFunction"


@triton.jit
def _tile_coords(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Map a linear program id to (row tile, column tile) in groups of GROUP_M row tiles, so programs that
    run at the same time share column tiles (the same expert weight tiles) and hit L2."""
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    local = pid % per_group
    return first_m + local % group_rows, local // group_rows


@triton.jit
def _gate_up_swiglu_kernel(
    x_ptr, gate_ptr, up_ptr, inter_ptr,
    sorted_pairs_ptr, block_experts_ptr, num_padded_ptr,
    num_pairs, hidden, inter_size, num_blocks,
    stride_xt, stride_xh,
    stride_ge, stride_gh, stride_gi,
    stride_ue, stride_uh, stride_ui,
    stride_ir, stride_ii,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """inter[r, n] = silu(x[tok(r)] @ gate[e]) * (x[tok(r)] @ up[e]) for one (BLOCK_M, BLOCK_N) tile.

    Rows r are positions in the padded expert-sorted layout; the tile's rows all belong to expert e."""
    pid_m, pid_n = _tile_coords(tl.program_id(0), num_blocks, tl.cdiv(inter_size, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return  # past the rows in use (the grid is sized for the worst case)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows)
    row_ok = pairs < num_pairs  # padding rows hold the sentinel num_pairs
    tokens = (pairs // TOP_K).to(tl.int64)
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter_size
    ks = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + tokens[:, None] * stride_xt + ks[None, :] * stride_xh
    g_ptrs = gate_ptr + expert * stride_ge + ks[:, None] * stride_gh + cols[None, :] * stride_gi
    u_ptrs = up_ptr + expert * stride_ue + ks[:, None] * stride_uh + cols[None, :] * stride_ui

    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(hidden, BLOCK_K)):
        k_ok = ks < hidden - k0 * BLOCK_K
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        g = tl.load(g_ptrs, mask=w_mask, other=0.0)
        u = tl.load(u_ptrs, mask=w_mask, other=0.0)
        if UPCAST_DOT:
            a, g, u = a.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
        acc_gate = tl.dot(a, g, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(a, u, acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xh
        g_ptrs += BLOCK_K * stride_gh
        u_ptrs += BLOCK_K * stride_uh

    # SwiGLU on the fp32 accumulators; one rounding to the activation dtype.
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up
    out_ptrs = inter_ptr + rows.to(tl.int64)[:, None] * stride_ir + cols[None, :] * stride_ii
    tl.store(out_ptrs, act.to(inter_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    inter_ptr, down_ptr, rows_out_ptr,
    sorted_pairs_ptr, block_experts_ptr, num_padded_ptr,
    num_pairs, inter_size, hidden, num_blocks,
    stride_ir, stride_ii,
    stride_de, stride_di, stride_dh,
    stride_or, stride_oh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """rows_out[pair(r)] = inter[r] @ down[e] for one tile; each (token, slot) row has exactly one writer."""
    pid_m, pid_n = _tile_coords(tl.program_id(0), num_blocks, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows)
    row_ok = pairs < num_pairs
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = inter_ptr + rows.to(tl.int64)[:, None] * stride_ir + ks[None, :] * stride_ii
    w_ptrs = down_ptr + expert * stride_de + ks[:, None] * stride_di + cols[None, :] * stride_dh

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(inter_size, BLOCK_K)):
        k_ok = ks < inter_size - k0 * BLOCK_K
        # Padding rows of the intermediate were never written: mask them to zero instead of reading garbage.
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST_DOT:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ii
        w_ptrs += BLOCK_K * stride_di

    out_ptrs = rows_out_ptr + pairs.to(tl.int64)[:, None] * stride_or + cols[None, :] * stride_oh
    tl.store(out_ptrs, acc.to(rows_out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(
    rows_ptr, scores_ptr, out_ptr,
    hidden,
    stride_rr, stride_rh,
    stride_st, stride_sk,
    stride_ot, stride_oh,
    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[t] = sum_j scores[t, j] * rows[t*k + j], in fp32 (the un-permute is implicit: rows are indexed
    by pair, so a token's k rows are found directly without an inverse permutation)."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < hidden
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        w = tl.load(scores_ptr + t * stride_st + j * stride_sk).to(tl.float32)
        row = tl.load(rows_ptr + (t * TOP_K + j) * stride_rr + cols * stride_rh, mask=col_ok, other=0.0)
        acc += w * row.to(tl.float32)
    tl.store(out_ptr + t * stride_ot + cols * stride_oh, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------
def moe_triton(hidden: torch.Tensor, selected_experts: torch.Tensor, scores: torch.Tensor,
                       gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor,
                       config: MoETileConfig | None = None) -> torch.Tensor:
    """The `HiDreamMoE` op with Triton kernels: (T, H) hidden, (T, k) ids/scores, stacked expert weights
    gate/up (E, H, I), down (E, I, H) -> (T, H) routed output (no shared expert), in hidden's dtype.

    Runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before triton was imported.
    No host synchronisation: only shapes decide the launch grids. Any strides are accepted."""
    s = schema.check_tensors(hidden, selected_experts, scores, gate_w, up_w, down_w)
    T, H, I, E, k = s.tokens, s.hidden, s.intermediate, s.num_experts, s.top_k
    out = torch.empty((T, H), dtype=hidden.dtype, device=hidden.device)
    if T == 0 or k == 0:
        return out.zero_()
    cfg = config or default_config(T, k, E, hidden.dtype)
    precision = "tf32" if (hidden.dtype != torch.float32 or cfg.allow_tf32) else "ieee"
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # The CPU interpreter multiplies bf16 tiles as their raw uint16 bits; upcasting the tiles to fp32 there
    # gives the same products (bf16 x bf16 is exact in fp32) and leaves the compiled GPU code untouched.
    upcast = hidden.dtype == torch.bfloat16 and interpreting()

    align = align_by_expert(selected_experts, E, cfg.block_m)

    # 2. gate/up grouped GEMM + SwiGLU into the padded-row intermediate.
    inter = torch.empty((align.max_rows, I), dtype=hidden.dtype, device=hidden.device)
    grid = (align.num_blocks * triton.cdiv(I, cfg.block_n),)
    _gate_up_swiglu_kernel[grid](
        hidden, gate_w, up_w, inter,
        align.sorted_pairs, align.block_experts, align.num_padded,
        align.num_pairs, H, I, align.num_blocks,
        hidden.stride(0), hidden.stride(1),
        gate_w.stride(0), gate_w.stride(1), gate_w.stride(2),
        up_w.stride(0), up_w.stride(1), up_w.stride(2),
        inter.stride(0), inter.stride(1),
        TOP_K=k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, DOT_PRECISION=precision, UPCAST_DOT=upcast, **launch)

    # 3. down grouped GEMM into one row per (token, slot).
    slot_rows = torch.empty((align.num_pairs, H), dtype=hidden.dtype, device=hidden.device)
    grid = (align.num_blocks * triton.cdiv(H, cfg.block_n),)
    _down_kernel[grid](
        inter, down_w, slot_rows,
        align.sorted_pairs, align.block_experts, align.num_padded,
        align.num_pairs, I, H, align.num_blocks,
        inter.stride(0), inter.stride(1),
        down_w.stride(0), down_w.stride(1), down_w.stride(2),
        slot_rows.stride(0), slot_rows.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, DOT_PRECISION=precision, UPCAST_DOT=upcast, **launch)

    # 4. weighted sum over the k slots.
    grid = (T, triton.cdiv(H, cfg.combine_block))
    _combine_kernel[grid](
        slot_rows, scores, out, H,
        slot_rows.stride(0), slot_rows.stride(1),
        scores.stride(0), scores.stride(1),
        out.stride(0), out.stride(1),
        TOP_K=k, BLOCK_H=cfg.combine_block, num_warps=4)
    return out

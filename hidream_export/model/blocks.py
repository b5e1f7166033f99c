"""Attention and the two kinds of transformer block.

Attribute names (`attn1`, `to_q_t`, `ff_i`, `ff_t`, `adaLN_modulation.1`, the `.block` wrapper) are those
of the real checkpoint, so the state dict loads as is.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .embeddings import apply_rope
from .moe import MoEFeedForward, SwiGLU


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    # LayerNorm without affine parameters, result kept in the block dtype (as the official code casts).
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6).to(x.dtype)


class AttentionContext:
    """Per-forward attention inputs shared by every block.

    cos/sin: (L, head_dim/2) rotary tables for the whole sequence (identity for non-image tokens).
    key_scale: (L,) multiplier on keys (0 for the padding token, see transformer.py).
    bias: (L,) additive logit bias (log of the padding multiplicity there, else 0).
    """

    __slots__ = ("cos", "sin", "key_scale", "bias")

    def __init__(self, cos, sin, key_scale, bias):
        self.cos, self.sin, self.key_scale, self.bias = cos, sin, key_scale, bias


def _qkv(x, to_q, to_k, to_v, q_norm, k_norm, heads):
    dtype = x.dtype
    q = q_norm(to_q(x)).to(dtype)
    k = k_norm(to_k(x)).to(dtype)
    v = to_v(x)
    return (t.unflatten(-1, (heads, -1)) for t in (q, k, v))


class Attention(nn.Module):
    """Joint attention with per-stream projections and RMSNorm over the whole inner dim."""

    def __init__(self, dim: int, heads: int, single: bool):
        super().__init__()
        self.heads = heads
        self.single = single
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(dim, dim) for _ in range(4))
        self.q_rms_norm = nn.RMSNorm(dim, eps=1e-5)
        self.k_rms_norm = nn.RMSNorm(dim, eps=1e-5)
        if not single:
            self.to_q_t, self.to_k_t, self.to_v_t, self.to_out_t = (nn.Linear(dim, dim) for _ in range(4))
            self.q_rms_norm_t = nn.RMSNorm(dim, eps=1e-5)
            self.k_rms_norm_t = nn.RMSNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor, txt: torch.Tensor | None, ctx: AttentionContext):
        q, k, v = _qkv(x, self.to_q, self.to_k, self.to_v, self.q_rms_norm, self.k_rms_norm, self.heads)
        n_img = x.shape[1]
        if not self.single:
            qt, kt, vt = _qkv(txt, self.to_q_t, self.to_k_t, self.to_v_t, self.q_rms_norm_t,
                              self.k_rms_norm_t, self.heads)
            q, k, v = torch.cat([q, qt], 1), torch.cat([k, kt], 1), torch.cat([v, vt], 1)
        q = apply_rope(q, ctx.cos, ctx.sin)
        k = apply_rope(k, ctx.cos, ctx.sin) * ctx.key_scale.to(k.dtype)[None, :, None, None]
        mask = ctx.bias.to(q.dtype)[None, None, None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask)
        out = out.transpose(1, 2).flatten(2)
        if self.single:
            return self.to_out(out)
        return self.to_out(out[:, :n_img]), self.to_out_t(out[:, n_img:])


def _moe_or_ffn(dim: int, num_experts: int, top_k: int, lowering: str, hidden: int, shared_hidden: int):
    if num_experts > 0:
        return MoEFeedForward(dim, hidden, shared_hidden, num_experts, top_k, lowering)
    return SwiGLU(dim, hidden)


class _Block(nn.Module):
    """What both block kinds have: adaLN modulation (`chunks` vectors from the conditioning), joint
    attention, and the MoE (or dense SwiGLU) feed-forward on image tokens."""

    def __init__(self, chunks, dim, heads, num_experts, top_k, hidden, shared_hidden, lowering):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, chunks * dim))
        self.attn1 = Attention(dim, heads, single=chunks == 6)
        self.ff_i = _moe_or_ffn(dim, num_experts, top_k, lowering, hidden, shared_hidden)


class DoubleStreamBlock(_Block):
    """Separate image/text weights, joint attention; MoE on image tokens, dense SwiGLU on text."""

    def __init__(self, dim, heads, num_experts, top_k, hidden, shared_hidden, lowering):
        super().__init__(12, dim, heads, num_experts, top_k, hidden, shared_hidden, lowering)
        self.ff_t = SwiGLU(dim, hidden)

    def forward(self, img, txt, temb, ctx):
        (shift_msa_i, scale_msa_i, gate_msa_i, shift_mlp_i, scale_mlp_i, gate_mlp_i,
         shift_msa_t, scale_msa_t, gate_msa_t, shift_mlp_t, scale_mlp_t, gate_mlp_t) = \
            self.adaLN_modulation(temb)[:, None].chunk(12, dim=-1)
        attn_i, attn_t = self.attn1(_layer_norm(img) * (1 + scale_msa_i) + shift_msa_i,
                                    _layer_norm(txt) * (1 + scale_msa_t) + shift_msa_t, ctx)
        img = gate_msa_i * attn_i + img
        txt = gate_msa_t * attn_t + txt
        ff_i = self.ff_i(_layer_norm(img) * (1 + scale_mlp_i) + shift_mlp_i)
        ff_t = self.ff_t(_layer_norm(txt) * (1 + scale_mlp_t) + shift_mlp_t)
        return gate_mlp_i * ff_i + img, gate_mlp_t * ff_t + txt


class SingleStreamBlock(_Block):
    """One set of weights for the concatenated image+text sequence; MoE on every token."""

    def __init__(self, dim, heads, num_experts, top_k, hidden, shared_hidden, lowering):
        super().__init__(6, dim, heads, num_experts, top_k, hidden, shared_hidden, lowering)

    def forward(self, h, temb, ctx):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(temb)[:, None].chunk(6, dim=-1)
        h = gate_msa * self.attn1(_layer_norm(h) * (1 + scale_msa) + shift_msa, None, ctx) + h
        return gate_mlp * self.ff_i(_layer_norm(h) * (1 + scale_mlp) + shift_mlp) + h


class BlockWrapper(nn.Module):
    """The real checkpoint nests every block one level down as `.block`."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args):
        return self.block(*args)

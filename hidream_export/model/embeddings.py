"""Conditioning embeddings and the rotary position tables.

Parameter names follow the real checkpoint (`t_embedder.timestep_embedder.linear_1`, ...).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .choice import Choice

ROPE_THETA = 10000
TIMESTEP_CHANNELS = 256


class MLPEmbedder(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers `TimestepEmbedding`)."""

    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(nn.functional.silu(self.linear_1(x)))


def timestep_sinusoids(timesteps: torch.Tensor, channels: int = TIMESTEP_CHANNELS) -> torch.Tensor:
    """[cos | sin] features of the raw timestep (0..1000, not rescaled), computed in float32."""
    half = channels // 2
    freqs = torch.exp(
        -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps[:, None].float() * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbed(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(TIMESTEP_CHANNELS, hidden)

    def forward(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # The official model casts the sinusoids to the latent dtype before the MLP.
        return self.timestep_embedder(timestep_sinusoids(timesteps).to(dtype))


class PooledEmbed(nn.Module):
    def __init__(self, text_emb_dim: int, hidden: int):
        super().__init__()
        self.pooled_embedder = MLPEmbedder(text_emb_dim, hidden)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.pooled_embedder(pooled)


class PatchEmbed(nn.Module):
    """A Linear over patchified tokens (not a convolution)."""

    def __init__(self, patch_features: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(patch_features, hidden)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches)


class TextProjection(nn.Module):
    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.linear = nn.Linear(in_features, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class FinalLayer(nn.Module):
    """adaLN (shift first, then scale) + Linear to patch features."""

    def __init__(self, hidden: int, patch_features: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, patch_features)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(temb).chunk(2, dim=1)
        x = nn.functional.layer_norm(x, (x.shape[-1],), eps=1e-6)
        return self.linear(x * (1 + scale[:, None]) + shift[:, None])


# ---- rotary position embedding ----------------------------------------------------------------

ROPE_DTYPES = ("float64", "float32")


def _axis_angles(positions: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """(n,) positions -> (n, dim/2) angles pos * theta^(-2k/dim), as diffusers' `rope` computes them."""
    omega = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, dtype=dtype, device=positions.device) / dim))
    return positions.to(dtype)[:, None] * omega[None, :]


class RopeTables(nn.Module):
    """cos/sin tables for image tokens on a (rows, cols) grid.

    Ids are (0, row, col), so axis 0 is always the identity rotation. Two ways to get the angles:
    - "float64": computed live in float64 and rounded to float32, exactly like diffusers;
    - "float32": looked up in tables that were computed in float64 once at construction and stored in
      float32, so the traced graph holds no float64 op (TensorRT has none) and still gives the very same
      numbers. `max_positions` bounds the grid in that mode.
    """

    rope_dtype = Choice(ROPE_DTYPES, "rope_dtype")

    def __init__(self, axes_dims: tuple[int, ...], max_positions: int, rope_dtype: str = "float64"):
        super().__init__()
        self.axes_dims = tuple(axes_dims)
        self.max_positions = max_positions
        self.rope_dtype = rope_dtype
        pos = torch.arange(max_positions, dtype=torch.float64)
        for axis in (1, 2):
            ang = _axis_angles(pos, self.axes_dims[axis], torch.float64)
            self.register_buffer(f"cos{axis}", torch.cos(ang).float(), persistent=False)
            self.register_buffer(f"sin{axis}", torch.sin(ang).float(), persistent=False)

    def _axis(self, axis: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rope_dtype == "float32":
            return getattr(self, f"cos{axis}")[:n], getattr(self, f"sin{axis}")[:n]
        ang = _axis_angles(torch.arange(n, device=device), self.axes_dims[axis], torch.float64)
        return torch.cos(ang).float(), torch.sin(ang).float()

    def forward(self, rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows*cols, head_dim/2) cos and sin, tokens in row-major order."""
        c1, s1 = self._axis(1, rows, device)
        c2, s2 = self._axis(2, cols, device)
        n0 = self.axes_dims[0] // 2
        ones = torch.ones(rows, cols, n0, dtype=torch.float32, device=device)
        cos = torch.cat([ones, c1[:, None, :].expand(rows, cols, -1), c2[None, :, :].expand(rows, cols, -1)], -1)
        sin = torch.cat([ones * 0, s1[:, None, :].expand(rows, cols, -1), s2[None, :, :].expand(rows, cols, -1)], -1)
        return cos.reshape(rows * cols, -1), sin.reshape(rows * cols, -1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of the head dim, in float32.

    x: (B, L, heads, head_dim); cos/sin: (L, head_dim/2).
    """
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([c * x0 - s * x1, s * x0 + c * x1], dim=-1)
    return out.flatten(-2).to(x.dtype)

"""Building blocks of the flow decoder (official spec sections 3.3-3.6).

Every function here reproduces the official numerics, including where the computation switches
to float32 (norm statistics, cosine-sim scale, RoPE rotation), so fp32 outputs match the
official code to ~1e-6 and mixed-precision runs follow the same casts.

    rms_norm / RMSNorm / AdaRMSNorm   x * scale / sqrt(mean(x^2) + 1e-6), stats in float32
    SwiGLU                            one Linear to 2*d_ff, out = a * silu(g), gate = SECOND half
    cosine_sim_qk                     q, k scaled to norm sqrt(s_head) (eps on the sum of squares)
    make_axial_pos_2d                 cell-centre positions on the [-1, 1]^2 canvas
    AxialRoPE2D / apply_rotary        half-split axial RoPE; head_dim / 2 dims rotate
    FourierFeatures                   cos/sin of a fixed random projection of t (matmul form)
    MappingNetwork                    RMSNorm -> (RMSNorm -> SwiGLU -> Linear, residual)* -> RMSNorm
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least float32 (float64 stays float64): the dtype the official code does statistics in."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, but records no op when the dtype already matches: the ONNX exporter
    would emit a no-op Cast, which onnxruntime's graph optimiser mishandles (broken graph)."""
    return x if x.dtype == dtype else x.to(dtype)


# ----------------------------------------------------------------------------- normalisation
def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * scale / sqrt(mean(x^2, -1) + eps).

    The mean square and the combined factor ``scale * rsqrt(.)`` are computed in float32; only
    the final product is in x's dtype (what the official code does under autocast).
    ``scale`` broadcasts against x: (D,) for RMSNorm, (B, 1, D) for AdaRMSNorm.
    """
    dtype = _compute_dtype(x, scale)
    mean_sq = _cast(x, dtype).pow(2).mean(dim=-1, keepdim=True)
    factor = _cast(scale, dtype) * torch.rsqrt(mean_sq + eps)
    return x * _cast(factor, x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learnable per-channel ``scale`` (init 1), eps 1e-6."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale, self.eps)

    def extra_repr(self) -> str:
        return f"{self.scale.shape[0]}, eps={self.eps}"


class AdaRMSNorm(nn.Module):
    """Conditioned RMSNorm: x * (1 + W c) / sqrt(mean(x^2) + 1e-6).

    W is Linear(cond_dim -> dim, no bias), zero-initialised, so at init this is a plain
    (scale-free) RMSNorm. x: (B, L, dim), cond: (B, cond_dim).
    """

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(cond_dim, dim, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.linear(cond)[:, None, :] + 1, self.eps)


# ----------------------------------------------------------------------------- feed-forward
class SwiGLU(nn.Linear):
    """Linear(dim -> 2 * hidden, no bias) followed by ``a * silu(g)``, (a, g) = halves.

    The gate is the SECOND half (official ``linear_swiglu``); the weight is (2 * hidden, dim) so
    it loads the official ``up_proj.weight`` as is.
    """

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__(dim, 2 * hidden, bias=bias)
        self.hidden = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = super().forward(x).chunk(2, dim=-1)
        return a * F.silu(g)


# ----------------------------------------------------------------------------- attention helpers
def cosine_sim_qk(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise q and k per head to length sqrt(s_h): ``q * sqrt(s) / sqrt(sum(q^2) + eps)``.

    q, k: (B, H, L, E); scale: (H, 1, 1). eps is added to the SUM of squares (not the mean).
    The factors are computed in float32 and applied in q's dtype. With scale=1 in SDPA the
    attention logits are s_h * cos(q, k).
    """
    dtype = _compute_dtype(q, k, scale)
    sqrt_scale = torch.sqrt(_cast(scale, dtype))
    fq = sqrt_scale * torch.rsqrt(_cast(q, dtype).pow(2).sum(dim=-1, keepdim=True) + eps)
    fk = sqrt_scale * torch.rsqrt(_cast(k, dtype).pow(2).sum(dim=-1, keepdim=True) + eps)
    return q * _cast(fq, q.dtype), k * _cast(fk, k.dtype)


# ----------------------------------------------------------------------------- positions + RoPE
def make_axial_pos_2d(h: int, w: int, dtype=None, device=None) -> torch.Tensor:
    """Cell-centre positions of an h x w grid on the relative canvas, shape (h * w, 2).

    The canvas is [-1, 1] along the longer side (the shorter side shrinks by the aspect ratio);
    centres are midpoints of ``linspace(lo, hi, n + 1)`` (so p = -1 + (2k + 1) / n for a square
    grid, computed exactly like the official code). Column 0 is the row (h), column 1 the
    column (w), row-major (meshgrid "ij"). ``make_axial_pos_2d(1, 1)`` is (0, 0).
    """
    y_lo, y_hi, x_lo, x_hi = -1.0, 1.0, -1.0, 1.0
    if w > h:
        y_lo, y_hi = -h / w, h / w
    elif w < h:
        x_lo, x_hi = -w / h, w / h

    def centres(lo: float, hi: float, n: int) -> torch.Tensor:
        edges = torch.linspace(lo, hi, n + 1, dtype=dtype, device=device)
        return (edges[:-1] + edges[1:]) / 2

    grid = torch.stack(torch.meshgrid(centres(y_lo, y_hi, h), centres(x_lo, x_hi, w), indexing="ij"), dim=-1)
    return grid.reshape(h * w, 2)


def rope_freqs(head_dim: int, n_heads: int) -> torch.Tensor:
    """The fixed axial-RoPE frequencies, shape (2, n_heads, head_dim // 8), same for both axes.

    N = n_heads * head_dim // 8 log-spaced values f_n = exp(linspace(ln pi, ln 10 pi, N + 1))[n]
    (last point dropped), interleaved across heads: freqs[a, h, i] = f_{n_heads * i + h}.
    XL (head 72, 16 heads): head 0 gets pi, 4.0575, ..., 24.32; head 15 gets 3.993, ..., 30.92.
    """
    if head_dim % 8:
        raise ValueError(f"axial RoPE needs head_dim % 8 == 0, got {head_dim}")
    per_axis = head_dim // 8
    f = torch.linspace(math.log(math.pi), math.log(10.0 * math.pi), n_heads * per_axis + 1)[:-1].exp()
    f = f.view(per_axis, n_heads).T  # (n_heads, per_axis): column i holds f[n_heads*i : n_heads*(i+1)]
    return torch.stack([f, f]).contiguous()


def apply_rotary(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Half-split rotation of the first 2 * d dims of x by theta (d = theta.shape[-1]).

    x: (B, H, L, E), theta: (H, L, d) with 2d <= E. Pairs are (j, j + d); dims 2d.. pass through.
    Rotation in float32, result cast back to x's dtype.
    """
    d = theta.shape[-1]
    dtype = _compute_dtype(x, theta)
    x1, x2, rest = _cast(x[..., :d], dtype), _cast(x[..., d : 2 * d], dtype), x[..., 2 * d :]
    theta = _cast(theta, dtype)
    cos, sin = torch.cos(theta), torch.sin(theta)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    return torch.cat([_cast(y1, x.dtype), _cast(y2, x.dtype), rest], dim=-1)


class AxialRoPE2D(nn.Module):
    """Axial 2-D RoPE for one attention layer (official ``AxialRoPE2D``, half_embedding).

    Per head, head_dim // 4 angles: head_dim // 8 from the row coordinate, then head_dim // 8
    from the column coordinate; they rotate dims [0, head_dim/4) against [head_dim/4, head_dim/2).
    ``freqs`` is a persistent buffer (the official non-trainable Parameter ``pos_emb.freqs``).
    """

    def __init__(self, head_dim: int, n_heads: int):
        super().__init__()
        self.head_dim, self.n_heads = head_dim, n_heads
        self.register_buffer("freqs", rope_freqs(head_dim, n_heads))

    def reset_freqs(self) -> None:
        with torch.no_grad():
            self.freqs.copy_(rope_freqs(self.head_dim, self.n_heads))

    def angles(self, pos: torch.Tensor) -> torch.Tensor:
        """pos (L, 2) -> theta (n_heads, L, head_dim // 4), computed in pos's dtype; the decoder
        passes float32 positions under every autocast (the official code: the qkv dtype)."""
        freqs = _cast(self.freqs, pos.dtype)
        theta_h = pos[:, None, 0:1] * freqs[0]  # (L, H, head_dim // 8)
        theta_w = pos[:, None, 1:2] * freqs[1]
        return torch.cat([theta_h, theta_w], dim=-1).transpose(0, 1)


# ----------------------------------------------------------------------------- time embedding
class FourierFeatures(nn.Module):
    """Random Fourier features of a scalar: [cos f, sin f], f = (2 pi t) @ W^T.

    W (out_dim // 2, in_dim) ~ N(0, 1) is a persistent buffer: random, so it must be loaded with
    the weights. The matmul form (not an elementwise product) matches the official numerics under
    autocast. t: (B, in_dim) -> (B, out_dim), cos first.
    """

    def __init__(self, in_dim: int, out_dim: int, std: float = 1.0):
        super().__init__()
        if out_dim % 2:
            raise ValueError(f"FourierFeatures needs an even out_dim, got {out_dim}")
        self.std = std
        self.register_buffer("weight", torch.randn(out_dim // 2, in_dim) * std)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.normal_(0.0, self.std)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        f = (2 * math.pi * t) @ self.weight.T
        return torch.cat([f.cos(), f.sin()], dim=-1)


# ----------------------------------------------------------------------------- mapping network
class MappingBlock(nn.Module):
    """x + Linear(SwiGLU(RMSNorm(x))); the down projection is zero-initialised."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.up_proj = SwiGLU(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        nn.init.zeros_(self.down_proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down_proj(self.up_proj(self.norm(x)))


class MappingNetwork(nn.Module):
    """in_norm -> depth x MappingBlock -> out_norm, all at width ``dim``. (B, dim) -> (B, dim)."""

    def __init__(self, depth: int, dim: int, hidden: int):
        super().__init__()
        self.in_norm = RMSNorm(dim)
        self.blocks = nn.ModuleList([MappingBlock(dim, hidden) for _ in range(depth)])
        self.out_norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_norm(x)
        for block in self.blocks:
            x = block(x)
        return self.out_norm(x)


class Conditioning(NamedTuple):
    """What a generator's condition module hands the mixer: ``tokens`` (B, k, token_dim) or None
    (k = 0), and ``after_block(k, h) -> h`` run after mixer block k (0-based), or None."""

    tokens: Optional[torch.Tensor]
    after_block: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None

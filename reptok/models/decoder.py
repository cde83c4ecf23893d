"""FlowDecoder: the official RepTok decoder (spec sections 2-3), in reptok's time convention.

A rectified-flow transformer over the patches of a (VAE-latent or pixel) image, conditioned on
the single latent token twice: as an extra sequence element, and (with the time) through the
AdaRMSNorms. For the released XL decoder: 4x32x32 latent, patch 2 -> 256 image tokens plus the
latent token, width 1152, depth 28, 16 heads of 72.

    token (B, token_dim) --TokenProjection--> cond token (B, 1, D)          once per image
    t (B,) --FourierFeatures--> time_in_proj --MappingNetwork--> c (B, Dm)   once per step
    x (B, C, S, S) --patchify (dy, dx, ch)--> patch_in --> (B, N, D)
        cat [cond token, patches] --> in_proj --> depth x Block(c) --> drop first token
        --> RMSNorm --> patch_out --> un-patchify --> v (B, C, S, S)

Time: the official network runs with t = 1 as noise and predicts eps - x
(``official_velocity``). reptok uses t = 0 as noise and velocity data - noise, so
``forward(x, t, token) = -official_velocity(x, 1 - t, token)``.

State-dict names are ours; ``reptok.convert.keymaps.decoder_key_map`` maps each of them
one-to-one onto the official ``RepTokLatentRF2D`` key, with identical shapes.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F

from ..config import DecoderConfig
from .layers import (
    AdaRMSNorm,
    AxialRoPE2D,
    FourierFeatures,
    MappingNetwork,
    RMSNorm,
    SwiGLU,
    _cast,
    apply_rotary,
    cosine_sim_qk,
    make_axial_pos_2d,
)


# ----------------------------------------------------------------------------- conditioning path
class TokenProjection(nn.Module):
    """Latent token -> the decoder's extra sequence element (official ``encoder.dino``, spec 2).

    y = LayerNorm(fc(x)) + zero_pad(x), x = token + temp_pos_embed, per token; fc is zero-init,
    so at init y = LN-bias + padded token. ``new_reg`` (2 learned registers) is projected along
    with the token and then dropped, exactly as in the official code: it never affects the output
    (the projection is per token), but keeping it in the graph gives it a (zero) gradient, so DDP
    does not complain about an unused parameter and the parameter count matches.
    """

    def __init__(self, token_dim: int, width: int, n_reg: int = 2):
        super().__init__()
        self.width, self.n_reg = width, n_reg
        self.temp_pos_embed = nn.Parameter(torch.zeros(1, 1, 1, token_dim))  # official (1, T=1, 1, D)
        self.new_reg = nn.Parameter(torch.randn(1, n_reg, token_dim))
        self.fc = nn.Linear(token_dim, width)
        self.ln = nn.LayerNorm(width)  # eps 1e-5, affine
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        """token (B, token_dim) -> (B, 1, width)."""
        x = token[:, None, :] + self.temp_pos_embed[0]  # (B, 1, token_dim)
        x = torch.cat([self.new_reg.expand(x.shape[0], -1, -1), x], dim=1)  # (B, n_reg + 1, token_dim)
        # residual: the token zero-padded to width (official). A token wider than the decoder
        # (not in the official model) is cropped instead: F.pad with a negative pad crops.
        y = self.ln(self.fc(x)) + F.pad(x, (0, self.width - x.shape[-1]))
        return y[:, self.n_reg :]


# ----------------------------------------------------------------------------- transformer layer
class Attention(nn.Module):
    """Pre-norm self-attention: AdaRMSNorm -> qkv -> cosine-sim q, k -> axial RoPE -> SDPA -> out.

    Logits are s_h * cos(q_i, k_j) with a learnable per-head ``scale`` s (init 10) and no
    1/sqrt(d); out_proj is zero-init, so the block starts as the identity.
    """

    def __init__(self, width: int, head_dim: int, cond_dim: int):
        super().__init__()
        self.head_dim, self.n_heads = head_dim, width // head_dim
        self.norm = AdaRMSNorm(width, cond_dim)
        self.qkv_proj = nn.Linear(width, 3 * width, bias=False)  # rows: q, k, v; head-major inside
        self.scale = nn.Parameter(torch.full((self.n_heads,), 10.0))
        self.rope = AxialRoPE2D(head_dim, self.n_heads)
        self.out_proj = nn.Linear(width, width, bias=False)
        nn.init.zeros_(self.out_proj.weight)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), cond (B, Dm), pos (L, 2) -> (B, L, D)."""
        B, L, D = x.shape
        qkv = self.qkv_proj(self.norm(x, cond))
        # fp32 angles under any autocast (the official code computes them in the qkv dtype: bf16
        # would be off by up to 0.11 rad on the XL grid, fp16 by 0.012).
        theta = self.rope.angles(_cast(pos, torch.float32))  # (H, L, head_dim // 4)
        q, k, v = qkv.reshape(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = cosine_sim_qk(q, k, self.scale[:, None, None])  # (B, H, L, E) each
        q, k = apply_rotary(q, theta), apply_rotary(k, theta)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        return x + self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class FeedForward(nn.Module):
    """Pre-norm SwiGLU MLP: AdaRMSNorm -> Linear(D, 2 ff) -> a * silu(g) -> Linear(ff, D) (zero-init)."""

    def __init__(self, width: int, hidden: int, cond_dim: int):
        super().__init__()
        self.norm = AdaRMSNorm(width, cond_dim)
        self.up_proj = SwiGLU(width, hidden)
        self.down_proj = nn.Linear(hidden, width, bias=False)
        nn.init.zeros_(self.down_proj.weight)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return x + self.down_proj(self.up_proj(self.norm(x, cond)))


class Block(nn.Module):
    """One transformer layer (official ``GenericTransformerLayer``): attention then feed-forward."""

    def __init__(self, width: int, head_dim: int, ff_expand: int, cond_dim: int):
        super().__init__()
        self.attn = Attention(width, head_dim, cond_dim)
        self.ff = FeedForward(width, width * ff_expand, cond_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.ff(self.attn(x, cond, pos), cond)


# ----------------------------------------------------------------------------- the decoder
class FlowDecoder(nn.Module):
    """The official RepTok decoder architecture, sized by a ``DecoderConfig``.

    Call it as ``forward(x, t, token)`` (reptok convention: t = 0 noise, t = 1 data, returns
    data - noise) or ``official_velocity(x, t_noise, token)`` (official: t = 1 noise, returns
    eps - x).
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        if cfg.width % cfg.head_dim:
            raise ValueError(f"width={cfg.width} is not divisible by head_dim={cfg.head_dim}")
        if cfg.head_dim % 8:
            raise ValueError(f"head_dim={cfg.head_dim} must be a multiple of 8 (axial RoPE)")
        if cfg.input_size % cfg.patch_size:
            raise ValueError(f"input_size={cfg.input_size} is not divisible by patch_size={cfg.patch_size}")
        self.cfg = cfg
        C, p, D, Dm = cfg.in_channels, cfg.patch_size, cfg.width, cfg.mapping_width
        self.in_channels, self.input_size, self.patch_size = C, cfg.input_size, p
        self.grid = cfg.input_size // p  # image tokens per side

        # conditioning: latent token -> extra sequence element; time -> AdaRMSNorm condition
        self.token_proj = TokenProjection(cfg.token_dim, D)
        self.time_emb = FourierFeatures(1, Dm)
        self.time_in_proj = nn.Linear(Dm, Dm, bias=False)
        self.mapping = MappingNetwork(cfg.mapping_depth, Dm, Dm * cfg.mapping_ff_expand)

        # backbone
        self.patch_in = nn.Linear(p * p * C, D, bias=False)  # official mid_merge.pre_proj.proj
        self.in_proj = nn.Linear(D, D, bias=False)  # official mid_merge.proj, on ALL tokens
        self.blocks = nn.ModuleList([Block(D, cfg.head_dim, cfg.ff_expand, Dm) for _ in range(cfg.depth)])
        self.out_norm = RMSNorm(D)  # not conditioned
        self.patch_out = nn.Linear(D, p * p * C, bias=False)
        nn.init.zeros_(self.patch_out.weight)

        # Token positions (1 + N, 2), fixed: built once so forward has no Python loops over the
        # grid (ONNX export with a dynamic batch). Not persistent: derived from the config.
        self.register_buffer("pos", self._token_positions(), persistent=False)

    def _token_positions(self) -> torch.Tensor:
        """Latent token at (0, 0), then each patch at the mean of its p x p pixel centres.

        Built like the official code: per-pixel positions on the [-1, 1] canvas, grouped into
        patches in (dy, dx) order and averaged (= -1 + (2k + 1) / grid up to rounding).
        """
        S, p, g = self.input_size, self.patch_size, self.grid
        pix = make_axial_pos_2d(S, S).reshape(g, p, g, p, 2).permute(0, 2, 1, 3, 4)
        patches = pix.reshape(g * g, p * p, 2).mean(dim=-2)
        return torch.cat([make_axial_pos_2d(1, 1), patches], dim=0)

    # ------------------------------------------------------------------ weights
    def init_weights(self) -> None:
        """(Re-)initialise like the official training init (spec 3.7).

        Linears: PyTorch default; zero: AdaRMSNorm linears, out_proj, ff/mapping down_proj,
        patch_out, token_proj.fc (weight and bias), temp_pos_embed; attention scale 10; norm
        scales 1; new_reg and the Fourier matrix ~ N(0, 1); RoPE freqs recomputed.
        """
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.LayerNorm, FourierFeatures)):
                m.reset_parameters()
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.scale)
            elif isinstance(m, AxialRoPE2D):
                m.reset_freqs()
        zero = [self.patch_out.weight, self.token_proj.fc.weight, self.token_proj.fc.bias, self.token_proj.temp_pos_embed]
        for blk in self.blocks:
            nn.init.constant_(blk.attn.scale, 10.0)
            zero += [blk.attn.norm.linear.weight, blk.attn.out_proj.weight, blk.ff.norm.linear.weight, blk.ff.down_proj.weight]
        zero += [b.down_proj.weight for b in self.mapping.blocks]
        for w in zero:
            nn.init.zeros_(w)
        nn.init.normal_(self.token_proj.new_reg)

    # ------------------------------------------------------------------ conditioning
    def condition(self, token: torch.Tensor) -> torch.Tensor:
        """Latent token (B, token_dim) -> conditioning token (B, 1, width). Once per image."""
        return self.token_proj(token)

    def time_cond(self, t_noise: torch.Tensor) -> torch.Tensor:
        """Official flow time (B,) (t = 1 noise) -> AdaRMSNorm condition (B, mapping_width)."""
        t = _cast(t_noise, self.time_emb.weight.dtype)[:, None]
        return self.mapping(self.time_in_proj(self.time_emb(t)))

    # ------------------------------------------------------------------ patches
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, N, p*p*C); token (r, c) holds pixel (p r + dy, p c + dx, ch) at
        index dy*p*C + dx*C + ch (ch fastest), tokens row-major."""
        B, C, g, p = x.shape[0], self.in_channels, self.grid, self.patch_size
        x = x.permute(0, 2, 3, 1).reshape(B, g, p, g, p, C).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(B, g * g, p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, S, S); the inverse of ``patchify``."""
        B, C, g, p = x.shape[0], self.in_channels, self.grid, self.patch_size
        x = x.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, g * p, g * p)

    # ------------------------------------------------------------------ forward
    def official_velocity(self, x: torch.Tensor, t_noise: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """The raw network, official convention: x (B, C, S, S) at time t_noise (B,) with
        t = 1 noise and the latent token (B, token_dim) -> predicted eps - x, (B, C, S, S)."""
        cond = self.condition(token)  # (B, 1, D)
        c = self.time_cond(t_noise)  # (B, Dm)

        h = self.patch_in(self.patchify(x))  # (B, N, D)
        h = self.in_proj(torch.cat([cond, h], dim=1))  # latent token first: (B, 1 + N, D)
        for blk in self.blocks:
            if getattr(self, "grad_checkpoint", False) and self.training and torch.is_grad_enabled():
                # --grad-checkpoint: keep only block inputs, recompute the rest in backward
                h = torch.utils.checkpoint.checkpoint(blk, h, c, self.pos, use_reentrant=False)
            else:
                h = blk(h, c, self.pos)
        h = self.patch_out(self.out_norm(h[:, 1:]))  # drop the latent token: (B, N, p*p*C)
        return self.unpatchify(h)

    def forward(self, x: torch.Tensor, t: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """reptok convention: x_t (B, C, S, S) at t (B,) with t = 0 noise, t = 1 data and the
        latent token (B, token_dim) -> velocity data - noise, (B, C, S, S).
        Equals -official_velocity(x, 1 - t, token)."""
        return -self.official_velocity(x, 1 - t, token)

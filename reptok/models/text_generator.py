"""TextTokenGenerator: the text-to-image generator of the paper on top of TokenGenerator.

The MLP-Mixer runs over ``[noisy token(s) + pos_embed, 4 learnable tokens, time token]`` (the
learnable tokens take the place of the class token: ``num_cond_tokens = text_tokens``) and the
generator's only attention reads the text: after **every** mixer block, a pre-norm
cross-attention block lets all T sequence tokens (queries) attend to the frozen text encoder's
hidden states (keys / values), with the text padding mask::

    ctx = text_proj(LayerNorm(text))                       (B, L, text_dim) -> (B, L, dim), once
    h = mixer[0]([x + pos, q_1..q_4, t_emb])               (B, T, dim)
    for k in 1..depth:  h = cross[k-1](mixer[k](h), ctx, mask)
                        cross(h) = h + out(attn(q(LN(h)), k(ctx), v(ctx)))
    v = mixer[-1](mixer[-2](h))[:, :n]                     (final LayerNorm, zero-init Linear)

State-dict keys: TokenGenerator's (``pos_embed``, ``t_embedder.*``, ``mixer.*``, ``token_mean``,
``token_std``; no ``label_embedder``) plus ``text_queries``, ``text_norm.*``, ``text_proj.*``
and ``cross.{k}.{norm,q,kv,out}.*``.

The null condition for classifier-free guidance is the **empty prompt** ""'s hidden states
(training replaces captions by "" with probability ``caption_dropout``): the generator itself has
no null embedding. ``forward(x (B,n,D), t (B,), text (B,L,text_dim), text_mask (B,L) bool or
float) -> v (B,n,D)`` has no data-dependent Python control flow, so it traces to ONNX as is.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GeneratorConfig
from ..errors import InputError
from .generator import TokenGenerator


class CrossAttention(nn.Module):
    """Pre-norm multi-head cross-attention with a residual: ``h + out(attn(LN(h), ctx))``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h (B,T,dim), ctx (B,L,dim), mask (B,1,1,L) bool (True = attend)."""
        b, t, d = h.shape
        hd = d // self.heads
        q = self.q(self.norm(h)).reshape(b, t, self.heads, hd).transpose(1, 2)
        k, v = self.kv(ctx).reshape(b, ctx.shape[1], 2, self.heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return h + self.out(o.transpose(1, 2).reshape(b, t, d))


class TextTokenGenerator(TokenGenerator):
    """Caption-conditioned flow-matching velocity net on normalised tokens (see the module doc)."""

    text_conditioned = True

    def __init__(self, cfg: GeneratorConfig):
        if cfg.text_encoder is None:
            raise InputError("TextTokenGenerator needs generator.text_encoder")
        if cfg.text_dim <= 0:
            raise InputError("generator.text_dim is not set (the text encoder's hidden size)")
        if cfg.num_classes:
            raise InputError(f"generator.num_classes={cfg.num_classes}: a text-conditioned generator has no classes")
        if cfg.text_tokens < 0 or cfg.cross_heads < 1 or cfg.dim % cfg.cross_heads:
            raise InputError(f"generator.dim={cfg.dim} must be divisible by cross_heads={cfg.cross_heads}")
        super().__init__(cfg)  # builds the mixer over n + text_tokens + 1 tokens
        self.text_queries = nn.Parameter(torch.randn(1, cfg.text_tokens, cfg.token_dim) * 0.02)
        self.text_norm = nn.LayerNorm(cfg.text_dim)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.dim)
        self.cross = nn.ModuleList(CrossAttention(cfg.dim, cfg.cross_heads) for _ in range(cfg.depth))

    # ------------------------------------------------------------------ conditioning hook
    @property
    def num_cond_tokens(self) -> int:
        return self.cfg.text_tokens

    @property
    def null_class(self) -> Optional[int]:
        return None  # the null condition is the empty prompt's text states

    def null_condition(self, batch: int, device=None):
        raise InputError("a text-conditioned generator's null condition is the empty prompt \"\": "
                         "encode it with the text encoder")

    def embed_condition(self, cond=None, batch: int = 1, force_drop_ids=None) -> torch.Tensor:
        """The learnable tokens (B, text_tokens, token_dim); the text itself enters by cross-attention."""
        return self.text_queries.expand(batch, -1, -1)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                text_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Velocity (B, n, D) at normalised tokens x, times t (B,) in [0, 1], text hidden states
        (B, L, text_dim) with their mask (B, L) (bool or 0/1 float; None = all valid)."""
        b, n, d = x.shape[0], self.cfg.n_tokens, self.cfg.token_dim
        if x.dim() != 3 or x.shape[1:] != (n, d):
            raise InputError(f"generator expects x of shape (B, {n}, {d}), got {tuple(x.shape)}")
        if text.dim() != 3 or text.shape[-1] != self.cfg.text_dim:
            raise InputError(f"generator expects text of shape (B, L, {self.cfg.text_dim}), got {tuple(text.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(b)
        if text_mask is None:
            valid = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        else:
            valid = text_mask if text_mask.dtype == torch.bool else text_mask > 0.5
        # A row with no valid position attends to position 0 (never a softmax over nothing).
        first = torch.arange(valid.shape[1], device=valid.device) == 0
        valid = valid | (first[None] & ~valid.any(1, keepdim=True))
        mask = valid[:, None, None, :]

        seq = torch.cat([x + self.pos_embed.to(x.dtype),
                         self.embed_condition(None, b).to(x.dtype),
                         self.t_embedder(t).unsqueeze(1).to(x.dtype)], dim=1)
        ctx = self.text_proj(self.text_norm(text.to(x.dtype)))
        h = self.mixer[0](seq)
        for k, block in enumerate(self.mixer[1:-2]):
            h = self.cross[k](block(h), ctx, mask)
        h = self.mixer[-1](self.mixer[-2](h))
        return h[:, :n]

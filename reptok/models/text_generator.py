"""TextCondition: the text-to-image condition of the paper's generator (``TokenGenerator``).

The MLP-Mixer runs over ``[noisy token(s) + pos_embed, 4 learnable tokens, time token]`` (the
learnable tokens take the place of the class token: ``num_tokens = text_tokens``) and the
generator's only attention reads the text: after **every** mixer block, a pre-norm
cross-attention block lets all T sequence tokens (queries) attend to the frozen text encoder's
hidden states (keys / values), with the text padding mask::

    ctx = text_proj(LayerNorm(text))                       (B, L, text_dim) -> (B, L, dim), once
    h = stem([x + pos, q_1..q_4, t_emb])                   (B, T, dim)
    for k in 1..depth:  h = cross[k-1](block_k(h), ctx, mask)      (``Mixer.forward``'s after_block)
                        cross(h) = h + out(attn(q(LN(h)), k(ctx), v(ctx)))
    v = head(final_norm(h))[:, :n]                         (final LayerNorm, zero-init Linear)

State-dict keys (the generator's, see ``generator.py``): ``pos_embed``, ``t_embedder.*``,
``mixer.*``, ``token_mean``, ``token_std`` plus this module's ``text_queries``, ``text_norm.*``,
``text_proj.*`` and ``cross.{k}.{norm,q,kv,out}.*`` at the top level (``state_prefix = ""``).

The null condition for classifier-free guidance is the **empty prompt** ""'s hidden states
(training replaces captions by "" with probability ``caption_dropout``): ``null(batch)`` gives
the prompts [""] * batch, the generator has no null embedding. ``generator(x (B,n,D), t (B,),
text (B,L,text_dim), text_mask (B,L) bool or float) -> v (B,n,D)`` has no data-dependent Python
control flow, so it traces to ONNX as is.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GeneratorConfig
from ..errors import InputError
from .layers import Conditioning


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


class TextCondition(nn.Module):
    """Caption condition of a ``TokenGenerator`` (see the module doc)."""

    text_conditioned = True
    state_prefix = ""  # its tensors sit at the generator's top level (text_queries, cross.*, ...)
    null_class = None  # the null condition is the empty prompt's text states
    NULL_PROMPT = ""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        if cfg.text_encoder is None:
            raise InputError("TextCondition needs generator.text_encoder")
        if cfg.text_dim <= 0:
            raise InputError("generator.text_dim is not set (the text encoder's hidden size)")
        if cfg.num_classes:
            raise InputError(f"generator.num_classes={cfg.num_classes}: a text-conditioned generator has no classes")
        if cfg.text_tokens < 0 or cfg.cross_heads < 1 or cfg.dim % cfg.cross_heads:
            raise InputError(f"generator.dim={cfg.dim} must be divisible by cross_heads={cfg.cross_heads}")
        self.text_dim = cfg.text_dim
        # Drawn for real by init_weights(), which the generator calls after building its mixer:
        # the global RNG then advances in the order it always did (seeded runs repeat).
        with torch.random.fork_rng(devices=[]):
            self.text_queries = nn.Parameter(torch.empty(1, cfg.text_tokens, cfg.token_dim))
            self.text_norm = nn.LayerNorm(cfg.text_dim)
            self.text_proj = nn.Linear(cfg.text_dim, cfg.dim)
            self.cross = nn.ModuleList(CrossAttention(cfg.dim, cfg.cross_heads) for _ in range(cfg.depth))

    @property
    def num_tokens(self) -> int:
        return self.text_queries.shape[1]

    def init_weights(self) -> None:
        """Random init in construction order: queries N(0, 0.02^2), then every layer's default."""
        with torch.no_grad():
            self.text_queries.copy_(torch.randn(self.text_queries.shape) * 0.02)
        for m in [self.text_norm, self.text_proj, *self.cross.modules()]:
            if isinstance(m, (nn.Linear, nn.LayerNorm)):
                m.reset_parameters()

    def null(self, batch: int, device=None) -> list:
        """The CFG null condition: the empty prompt for each row (encode it with the text encoder)."""
        return [self.NULL_PROMPT] * batch

    def forward(self, x: torch.Tensor, text: Optional[torch.Tensor] = None,
                text_mask: Optional[torch.Tensor] = None) -> Conditioning:
        """Noisy tokens x (B, n, D) (for batch and dtype), text hidden states (B, L, text_dim) with
        their mask (B, L) (bool or 0/1 float; None = all valid) -> the learnable tokens and the
        cross-attention step after every mixer block."""
        if text is None or text.dim() != 3 or text.shape[-1] != self.text_dim:
            got = None if text is None else tuple(text.shape)
            raise InputError(f"generator expects text of shape (B, L, {self.text_dim}), got {got}")
        if text_mask is None:
            valid = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        else:
            valid = text_mask if text_mask.dtype == torch.bool else text_mask > 0.5
        # A row with no valid position attends to position 0 (never a softmax over nothing).
        first = torch.arange(valid.shape[1], device=valid.device) == 0
        valid = valid | (first[None] & ~valid.any(1, keepdim=True))
        mask = valid[:, None, None, :]
        ctx = self.text_proj(self.text_norm(text.to(x.dtype)))

        def after_block(k: int, h: torch.Tensor) -> torch.Tensor:
            return self.cross[k](h, ctx, mask)

        return Conditioning(self.text_queries.expand(x.shape[0], -1, -1), after_block)

"""TokenGenerator: the official MLPMixer1D velocity network over [noisy token(s), class, time].

Structure and state-dict keys follow official-checkpoint-spec.md section 6.1 exactly (the
official keys minus ``_orig_mod.``, which ``torch.compile`` inserted):

    pos_embed                                  (1, n_tokens, token_dim)
    t_embedder.mlp.{0,2}.{weight,bias}         DiT timestep MLP (256 -> token_dim -> token_dim)
    label_embedder.embedding_table.weight      (num_classes + 1, token_dim); row num_classes = null
    mixer.0.*                                  Linear(token_dim -> dim)
    mixer.{k}.0.norm.* / mixer.{k}.0.fn.{0,3}.*  token mixing (Conv1d over the token axis), k = 1..depth
    mixer.{k}.1.norm.* / mixer.{k}.1.fn.{0,3}.*  channel mixing (MLP)
    mixer.{depth+1}.*                          final LayerNorm(dim)
    mixer.{depth+2}.*                          Linear(dim -> token_dim), zero-init
    token_mean, token_std                      buffers (reptok): the generator-space normalisation

Time convention: t = 0 noise, t = 1 data (reptok's and the official generator's); t enters the
sinusoid *unscaled* (t in [0, 1], max_period 10000: spec section 8, quirk 2 — kept for parity).
Sampling lives in ``reptok.flow`` (``solve`` + ``guided_velocity``); ``forward(x, t, y)`` is
the ``model_fn(x, t, cond)`` it expects, with ``null_cond = full(null_class)``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from ..config import GeneratorConfig
from ..errors import InputError


# ----------------------------------------------------------------------------- embedders (DiT)
class TimestepEmbedder(nn.Module):
    """DiT timestep embedder: t (B,) -> (B, hidden). Sinusoid (cos first, float32) then an MLP."""

    def __init__(self, hidden: int, frequency_embedding_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(B,) -> (B, dim): [cos(t f), sin(t f)], f_i = exp(-ln(max_period) i / (dim/2)), float32."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.timestep_embedding(t, self.frequency_embedding_size, self.max_period)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """DiT label embedder with a null class (index ``num_classes``) when ``dropout_prob > 0``.

    Labels are replaced by the null class with probability ``dropout_prob`` in train mode only
    (classifier-free guidance training); ``force_drop_ids`` (B,) of 0/1 overrides the draw.
    """

    def __init__(self, num_classes: int, hidden: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden)

    def token_drop(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids.to(labels.device) == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


# ----------------------------------------------------------------------------- mixer blocks
class PreNormResidual(nn.Module):
    """``fn(LayerNorm(x)) + x``; attribute names ``norm`` / ``fn`` give the official keys."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim)  # eps 1e-5, affine (official)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x)) + x


def token_mixing(n: int, expand: float, dropout: float) -> nn.Sequential:
    """Per-feature linear map across the n tokens: Conv1d over (B, n, dim) with channels = tokens."""
    hidden = int(n * expand)
    return nn.Sequential(
        nn.Conv1d(n, hidden, kernel_size=1), nn.GELU(), nn.Dropout(dropout),
        nn.Conv1d(hidden, n, kernel_size=1), nn.Dropout(dropout),
    )


def channel_mixing(dim: int, expand: float, dropout: float) -> nn.Sequential:
    hidden = int(dim * expand)
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout),
    )


def mixer_block(n: int, dim: int, token_expand: float, channel_expand: float, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        PreNormResidual(dim, token_mixing(n, token_expand, dropout)),
        PreNormResidual(dim, channel_mixing(dim, channel_expand, dropout)),
    )


# ----------------------------------------------------------------------------- the generator
def normalize_tokens(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Encoder tokens (B, D) or (B, n, D) -> generator space (z - mean) / std, (B, n, D)."""
    if z.dim() == 2:
        z = z.unsqueeze(1)
    return (z - mean) / std


def denormalize_tokens(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Generator space (B, n, D) -> encoder tokens: (B, D) when n_tokens == 1, else (B, n, D)."""
    z = x * std + mean
    return z.squeeze(1) if n_tokens == 1 and z.dim() == 3 else z


class TokenGenerator(nn.Module):
    """Class-conditional (or unconditional) flow-matching velocity net on normalised tokens.

    ``forward(x (B, n, D), t (B,), y (B,) long) -> v (B, n, D)``; the mixer runs over
    T = n + (number of condition tokens) + 1 tokens: [x + pos_embed, cond tokens..., t token].
    ``num_classes == 0``: unconditional (no label embedder, T = n + 1, ``y`` ignored).

    Hook for a text-conditioned variant: a subclass overrides the ``num_cond_tokens`` property
    (read when the mixer is built) and ``embed_condition(cond, batch, ...)`` returning
    (B, num_cond_tokens, token_dim); the mixer and everything else is shared. (No label range
    check here: a data-dependent check would sync the GPU every step and break ONNX tracing.)
    """

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        if cfg.text_encoder is not None and not self.text_conditioned:
            raise InputError("a text-conditioned generator config: build it with "
                             "reptok.models.build_generator(cfg) (TextTokenGenerator)")
        self.cfg = cfg
        d, n = cfg.token_dim, cfg.n_tokens
        self.pos_embed = nn.Parameter(torch.randn(1, n, d))
        self.t_embedder = TimestepEmbedder(d)
        if cfg.num_classes > 0:
            self.label_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout)
        else:
            self.label_embedder = None
        self.seq_len = n + self.num_cond_tokens + 1
        self.mixer = nn.Sequential(
            nn.Linear(d, cfg.dim),
            *[mixer_block(self.seq_len, cfg.dim, cfg.token_expand, cfg.channel_expand, cfg.dropout)
              for _ in range(cfg.depth)],
            nn.LayerNorm(cfg.dim),
            nn.Linear(cfg.dim, d),
        )
        # Zero-init the output layer: the net starts as v = 0 (official zero_init_last).
        nn.init.zeros_(self.mixer[-1].weight)
        nn.init.zeros_(self.mixer[-1].bias)
        # Generator-space normalisation z_n = (z - mean) / std. Persistent so a run carries its
        # training tokens' statistics (official checkpoint: mean 0, std = scale_factor).
        self.register_buffer("token_mean", torch.zeros(d), persistent=True)
        self.register_buffer("token_std", torch.ones(d), persistent=True)

    # ------------------------------------------------------------------ conditioning hook
    text_conditioned = False  # True in TextTokenGenerator (models/text_generator.py)

    @property
    def num_cond_tokens(self) -> int:
        return 1 if self.cfg.num_classes > 0 else 0

    @property
    def null_class(self) -> Optional[int]:
        """Label index of the unconditional (CFG) class, or None when there is no null row."""
        le = self.label_embedder
        return le.num_classes if le is not None and le.dropout_prob > 0 else None

    def null_condition(self, batch: int, device=None) -> torch.Tensor:
        """(B,) labels all equal to the null class (``null_cond`` for ``flow.guided_velocity``)."""
        if self.null_class is None:
            raise InputError(
                "this generator has no null class (unconditional or class_dropout == 0): CFG is unavailable"
            )
        return torch.full((batch,), self.null_class, dtype=torch.long, device=device)

    def embed_condition(
        self, y: Optional[torch.Tensor], batch: int, force_drop_ids: Optional[torch.Tensor] = None
    ) -> Optional[torch.Tensor]:
        """Condition -> (B, num_cond_tokens, token_dim), or None when unconditional."""
        if self.label_embedder is None:
            return None
        if y is None:
            raise InputError("class-conditional generator called without labels y")
        y = y.reshape(-1).long()
        if y.shape[0] != batch:
            raise InputError(f"labels have batch {y.shape[0]}, tokens have batch {batch}")
        return self.label_embedder(y, self.training, force_drop_ids).unsqueeze(1)

    # ------------------------------------------------------------------ normalisation
    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder tokens (B, D) or (B, n, D) -> generator space (B, n, D)."""
        return normalize_tokens(z, self.token_mean, self.token_std)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Generator space (B, n, D) -> encoder tokens: (B, D) when n_tokens == 1, else (B, n, D)."""
        return denormalize_tokens(x, self.token_mean, self.token_std, self.cfg.n_tokens)

    def set_token_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store the training tokens' per-dimension mean / std (D,) (std must be > 0)."""
        with torch.no_grad():
            self.token_mean.copy_(torch.as_tensor(mean, dtype=self.token_mean.dtype).reshape(-1))
            self.token_std.copy_(torch.as_tensor(std, dtype=self.token_std.dtype).reshape(-1))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        force_drop_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Velocity (B, n, D) at normalised tokens x (B, n, D), times t (B,) in [0, 1], labels y (B,).

        ``force_drop_ids`` (B,) of 0/1 replaces the given labels by the null class
        deterministically (the random drop happens only in train mode).
        """
        b, n, d = x.shape[0], self.cfg.n_tokens, self.cfg.token_dim
        if x.dim() != 3 or x.shape[1:] != (n, d):
            raise InputError(f"generator expects x of shape (B, {n}, {d}), got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(b)
        seq = [x + self.pos_embed.to(x.dtype)]
        cond = self.embed_condition(y, b, force_drop_ids)
        if cond is not None:
            seq.append(cond.to(x.dtype))
        seq.append(self.t_embedder(t).unsqueeze(1).to(x.dtype))
        h = self.mixer(torch.cat(seq, dim=1))
        return h[:, :n]


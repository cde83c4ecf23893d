"""TokenGenerator: the official MLPMixer1D velocity network over [noisy token(s), condition, time].

One class for every condition: the condition is a module (``generator.condition``) that gives
the condition tokens of the mixer's sequence, optionally a step after every mixer block, and the
CFG null condition ``null(batch)``:

- ``LabelCondition`` (here): the DiT label table with a null class; ``forward(x, t, y)``;
- ``TextCondition`` (``text_generator.py``): 4 learnable tokens + cross-attention to frozen text
  states after every block; ``forward(x, t, text, text_mask)``; the null condition is "".

``build_condition(cfg)`` picks it (``cfg.text_encoder`` set: text).

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
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..config import GeneratorConfig
from ..errors import InputError
from .layers import Conditioning
from .text_generator import TextCondition


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


class LabelCondition(nn.Module):
    """DiT label embedder with a null class (index ``num_classes``) when ``class_dropout > 0``;
    no table at all (and no condition token) when ``num_classes == 0`` (unconditional).

    Labels are replaced by the null class with probability ``dropout_prob`` in train mode only
    (classifier-free guidance training); ``force_drop_ids`` (B,) of 0/1 overrides the draw.
    (No label range check: a data-dependent check would sync the GPU every step and break ONNX
    tracing.)"""

    state_prefix = "label_embedder."  # the official checkpoint's name for this module (spec 6.1)
    text_conditioned = False

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.num_classes = cfg.num_classes
        self.dropout_prob = cfg.class_dropout if cfg.num_classes > 0 else 0.0
        self.embedding_table = (nn.Embedding(cfg.num_classes + int(self.dropout_prob > 0), cfg.token_dim)
                                if cfg.num_classes > 0 else None)

    @property
    def num_tokens(self) -> int:
        return 1 if self.embedding_table is not None else 0

    @property
    def null_class(self) -> Optional[int]:
        """Label index of the unconditional (CFG) class, or None when there is no null row."""
        return self.num_classes if self.embedding_table is not None and self.dropout_prob > 0 else None

    def null(self, batch: int, device=None) -> torch.Tensor:
        """(B,) labels all equal to the null class (``null_cond`` for ``flow.guided_velocity``)."""
        if self.null_class is None:
            raise InputError(
                "this generator has no null class (unconditional or class_dropout == 0): CFG is unavailable"
            )
        return torch.full((batch,), self.null_class, dtype=torch.long, device=device)

    def token_drop(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids.to(labels.device) == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None,
                force_drop_ids: Optional[torch.Tensor] = None) -> Conditioning:
        """Noisy tokens x (B, n, D) (for the batch), labels y (B,) -> the class token
        (B, 1, token_dim); nothing when unconditional."""
        if self.embedding_table is None:
            return Conditioning(None)
        batch = x.shape[0]
        if y is None:
            raise InputError("class-conditional generator called without labels y")
        y = y.reshape(-1).long()
        if y.shape[0] != batch:
            raise InputError(f"labels have batch {y.shape[0]}, tokens have batch {batch}")
        if (self.training and self.dropout_prob > 0) or force_drop_ids is not None:
            y = self.token_drop(y, force_drop_ids)
        return Conditioning(self.embedding_table(y).unsqueeze(1))

    def init_weights(self) -> None:
        """Nothing to draw after the mixer: the table is drawn before it (the official order)."""


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


class Mixer(nn.Sequential):
    """The official ``mixer`` Sequential: ``[Linear(token_dim -> dim), block_1 .. block_depth,
    LayerNorm(dim), Linear(dim -> token_dim)]`` (its indices are the state-dict keys, spec 6.1).

    ``forward(seq, after_block)`` runs exactly the Sequential's ops; ``after_block(k, h)``, when
    given, runs after block k (0-based): the text condition's cross-attention. This class is the
    only code that knows where the blocks sit."""

    @classmethod
    def build(cls, seq_len: int, token_dim: int, cfg: GeneratorConfig) -> "Mixer":
        m = cls(
            nn.Linear(token_dim, cfg.dim),
            *[mixer_block(seq_len, cfg.dim, cfg.token_expand, cfg.channel_expand, cfg.dropout)
              for _ in range(cfg.depth)],
            nn.LayerNorm(cfg.dim),
            nn.Linear(cfg.dim, token_dim),
        )
        # Zero-init the output layer: the net starts as v = 0 (official zero_init_last).
        nn.init.zeros_(m.head.weight)
        nn.init.zeros_(m.head.bias)
        return m

    @property
    def stem(self) -> nn.Linear:
        return self[0]

    @property
    def blocks(self) -> list:
        return list(self)[1:-2]

    @property
    def final_norm(self) -> nn.LayerNorm:
        return self[-2]

    @property
    def head(self) -> nn.Linear:
        return self[-1]

    def forward(self, seq: torch.Tensor,
                after_block: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        h = self.stem(seq)
        for k, block in enumerate(self.blocks):
            h = block(h)
            if after_block is not None:
                h = after_block(k, h)
        return self.head(self.final_norm(h))


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


def build_condition(cfg: GeneratorConfig) -> nn.Module:
    """The condition module a config asks for: text (``cfg.text_encoder`` set) or labels."""
    if cfg.text_encoder is not None:
        return TextCondition(cfg)
    return LabelCondition(cfg)


# The condition's tensors live under its own official / historical names in the state dict
# (``label_embedder.embedding_table.weight``; the text condition's ``text_queries``, ``cross.*``,
# ...), not under ``condition.``: this pair of hooks is the one place that maps them.
def _condition_keys_out(module, state_dict, prefix, local_metadata):
    inner, outer = prefix + "condition.", prefix + module.condition.state_prefix
    for k in [k for k in state_dict if k.startswith(inner)]:
        state_dict[outer + k[len(inner):]] = state_dict.pop(k)
    return state_dict


def _condition_keys_in(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    outer, inner = prefix + module.condition.state_prefix, prefix + "condition."
    names = {k.split(".")[0] for k in module.condition.state_dict(keep_vars=True)}
    for k in list(state_dict):
        rest = k[len(outer):] if k.startswith(outer) else None
        if rest is not None and rest.split(".")[0] in names:
            state_dict[inner + rest] = state_dict.pop(k)


class TokenGenerator(nn.Module):
    """Conditional (or unconditional) flow-matching velocity net on normalised tokens.

    ``forward(x (B, n, D), t (B,), *cond) -> v (B, n, D)``; ``cond`` is what the condition module
    takes: labels ``y (B,)`` (and ``force_drop_ids=``), or text states ``(B, L, E)`` and their mask
    ``(B, L)``. The mixer runs over T = n + k + 1 tokens: [x + pos_embed, k condition tokens,
    t token] (k = 1 for labels, 0 unconditional, ``text_tokens`` for text).
    """

    # The block lists (regional torch.compile compiles each repeated block once): the mixer blocks
    # and, for text, the cross-attention blocks of the condition.
    block_lists = ("mixer", "condition.cross")

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.token_dim, cfg.n_tokens
        self.pos_embed = nn.Parameter(torch.randn(1, n, d))
        self.t_embedder = TimestepEmbedder(d)
        self.condition = build_condition(cfg)
        self.seq_len = n + self.condition.num_tokens + 1
        self.mixer = Mixer.build(self.seq_len, d, cfg)
        # Random draws after the mixer's, as before the condition was a module: seeded runs repeat.
        self.condition.init_weights()
        # Generator-space normalisation z_n = (z - mean) / std. Persistent so a run carries its
        # training tokens' statistics (official checkpoint: mean 0, std = scale_factor).
        self.register_buffer("token_mean", torch.zeros(d), persistent=True)
        self.register_buffer("token_std", torch.ones(d), persistent=True)
        self._register_state_dict_hook(_condition_keys_out)
        self._register_load_state_dict_pre_hook(_condition_keys_in, with_module=True)

    # ------------------------------------------------------------------ the condition
    @property
    def text_conditioned(self) -> bool:
        return self.condition.text_conditioned

    @property
    def null_class(self) -> Optional[int]:
        """Label index of the unconditional (CFG) class; None without one (and for text)."""
        return self.condition.null_class

    def null(self, batch: int, device=None):
        """The CFG null condition of ``batch`` rows, in the condition's input space: labels (B,)
        of the null class, or (text) the null prompts [""] * B to encode."""
        return self.condition.null(batch, device)

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
    def forward(self, x: torch.Tensor, t: torch.Tensor, *cond, **cond_kw) -> torch.Tensor:
        """Velocity (B, n, D) at normalised tokens x (B, n, D), times t (B,) in [0, 1], condition
        ``cond`` (labels y (B,) with optional ``force_drop_ids`` (B,) of 0/1 that replace labels
        by the null class deterministically; or text (B, L, E), text_mask (B, L))."""
        b, n, d = x.shape[0], self.cfg.n_tokens, self.cfg.token_dim
        if x.dim() != 3 or x.shape[1:] != (n, d):
            raise InputError(f"generator expects x of shape (B, {n}, {d}), got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(b)
        c = self.condition(x, *cond, **cond_kw)
        seq = [x + self.pos_embed.to(x.dtype)]
        if c.tokens is not None:
            seq.append(c.tokens.to(x.dtype))
        seq.append(self.t_embedder(t).unsqueeze(1).to(x.dtype))
        h = self.mixer(torch.cat(seq, dim=1), c.after_block)
        return h[:, :n]

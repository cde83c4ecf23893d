"""``builtin:shapes-ssl``: a small ViT pre-trained self-supervised on builtin:shapes, offline.

The method needs a *pre-trained SSL* encoder: the paper's random-init ablation reconstructs but
does not generate (gFID 128.5), because a random ViT's [cls] output carries little of the
image's meaning. Offline there is no DINOv2, so the CPU presets get the next best thing: the same
timm ViT, trained here self-supervised on two views of each object, rendered by the renderer
itself (its exact version of SimCLR's crops and rotations) with their own place, size, angle and
background, then colour-jittered. Two losses on the final-norm [cls] output z:

- InfoNCE (SimCLR) on a projection of z: the views of one object are positives, every other
  view in the batch a negative. Invariance to pose, background and tint leaves the object.
- Equivariance (AugSelf): a head predicts, from (z1, z2), the transform that took view 1 to view
  2 (shift, log scale, rotation). Invariance alone throws away where things are, which the
  decoder needs; predicting the transform keeps pose in z, outside the projection.

The pos_embed starts as MAE's 2D sine-cosine code (timm's 0.02-std init is drowned by the patch
embeddings: without it the token learns no position in a CPU budget). No class labels are used.
Measured on held-out shapes (``benchmarks/token_probe.py``, linear probes): class 0.85 with the
logistic probe of ``reptok eval probe`` (random ViT 0.39), centre R^2 0.96 / 0.97 (v2, SimCLR
with the background swap only: 0.14), radius R^2 0.72; a small MLP on the token gets the class
right 88% of the time.

Trained on demand (about 70 s on 2 CPU cores for the small preset's ViT) and cached as
safetensors in timm naming under ``$REPTOK_CACHE``; ``EncoderConfig.weights = "builtin:shapes-ssl"``
loads it. A tokenizer run stores the full encoder state, so runs do not depend on the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..cache import cache_dir
from ..io import save_tensors
from ..config import EncoderConfig
from .render import NUM_CLASSES, SHAPES_VERSION, render_shape
from ..errors import InputError
from ..models.encoder import SSLEncoder
from ..models.encoder import build_encoder as _build_encoder

BUILTIN_WEIGHTS = ("builtin:shapes-ssl",)
SSL_VERSION = 3
DEFAULT_STEPS = 500
DEFAULT_BATCH = 256
DEFAULT_IMAGES = 8_000
TRAIN_SEED = 2_000_003  # never the default prep seed (0): the encoder does not see the data it encodes
TEMPERATURE = 0.5  # soft: many negatives share the positive's class (12 classes, batch 256)
TINT = 0.3  # per-channel colour gain jitter, +-30%
N_TARGETS = 7  # transform_targets' width
EQUIVARIANCE = 1.0  # weight of the transform-prediction loss next to InfoNCE


# ----------------------------------------------------------------------------- augmentations
def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random photometric view of each image of x (B, 3, R, R) in [-1, 1]: brightness,
    contrast and per-channel colour jitter (+-30%, SimCLR's colour augmentation, so that the
    exact tint of an object does not identify it) and a little noise. Geometry comes from the
    renderer (``render_views``), not from warping pixels."""
    b = x.shape[0]
    gain = (0.8 + 0.4 * torch.rand(b, 1, 1, 1, generator=gen)) * (1 - TINT + 2 * TINT * torch.rand(b, 3, 1, 1, generator=gen))
    bias = 0.15 * (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1)
    out = x * gain + bias + 0.03 * torch.randn(x.shape, generator=gen)
    return out.clamp(-1, 1)


def render_views(n: int, resolution: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Object i (random class, colour jitter) rendered twice, each view with its own geometry
    (place, size, angle) and its own background.

    Returns uint8 views (2, n, 3, R, R) and float32 geometry (2, n, 4): centre x, centre y (in
    image sides), log circumradius and angle."""
    out = np.empty((2, n, resolution, resolution, 3), np.uint8)
    geom = np.empty((2, n, 4), np.float32)
    for i in range(n):
        label = int(np.random.default_rng([seed, i, 0]).integers(NUM_CLASSES))
        for v in range(2):
            out[v, i], _, a = render_shape(np.random.default_rng([seed, i, 10 + v]), label, resolution,
                                           bg_rng=np.random.default_rng([seed, i, 2 + v]),
                                           fg_rng=np.random.default_rng([seed, i, 1]))
            geom[v, i] = (a["cx"] / resolution, a["cy"] / resolution, math.log(a["radius"] / resolution), a["angle"])
    return out.transpose(0, 1, 4, 2, 3), geom


def transform_targets(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """What took view 1 to view 2: shift, log scale, and the rotation as (cos, sin) of 2x and 4x
    the angle (a bar looks the same after 180 degrees, a cross after 90; a circle never tells,
    and the head learns to predict 0 there). (B, 4) x 2 -> (B, 7)."""
    d = g2 - g1
    turn = d[:, 3]
    return torch.stack([d[:, 0], d[:, 1], d[:, 2], torch.cos(2 * turn), torch.sin(2 * turn),
                        torch.cos(4 * turn), torch.sin(4 * turn)], dim=1)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """SimCLR's NT-Xent: a[i] and b[i] are positives, every other view in the batch a negative."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    n = a.shape[0]
    logits = z @ z.t() / temperature
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(logits, target)


def sincos_pos_embed(dim: int, grid: Tuple[int, int]) -> torch.Tensor:
    """MAE's fixed 2D sine-cosine position embedding, (h * w, dim): half the channels encode the
    row, half the column, at geometric frequencies. The init of the (still trainable) pos_embed:
    timm's 0.02-std random init is drowned by the patch embeddings, and SimCLR then never learns
    where things are."""
    h, w = grid
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angle = coord[:, None] * freq[None]
        parts += [torch.sin(angle), torch.cos(angle)]
    out = torch.cat(parts, dim=1)
    return F.pad(out, (0, dim - out.shape[1]))


# ----------------------------------------------------------------------------- training
def pretrain(
    cfg: EncoderConfig,
    steps: Optional[int] = None,
    batch_size: Optional[int] = None,
    n_images: Optional[int] = None,
    lr: float = 2e-3,
    equivariance: float = EQUIVARIANCE,
    seed: int = TRAIN_SEED,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Train ``cfg``'s ViT (random init but the sine-cosine pos_embed, every weight trainable)
    with InfoNCE + equivariance on fresh builtin:shapes.

    Returns ``(state_dict in timm naming, metadata)``; None means the module default."""
    steps = DEFAULT_STEPS if steps is None else steps
    batch_size = DEFAULT_BATCH if batch_size is None else batch_size
    n_images = DEFAULT_IMAGES if n_images is None else n_images
    t0 = time.perf_counter()
    views_u8, geom = render_views(n_images, cfg.img_size, seed)
    views = torch.from_numpy(views_u8).float() / 127.5 - 1  # (2, N, 3, R, R)
    geom = torch.from_numpy(geom)
    target_scale = transform_targets(geom[0], geom[1]).std(0) + 1e-6  # unit-variance targets
    enc = SSLEncoder(dataclasses.replace(cfg, weights="random", train_backbone=True))
    if enc.vit.pos_embed is not None:
        with torch.no_grad():  # see sincos_pos_embed: position must be loud from the first step
            enc.vit.pos_embed.copy_(sincos_pos_embed(enc.vit.pos_embed.shape[-1], enc.vit.patch_embed.grid_size)
                                    .reshape(enc.vit.pos_embed.shape))
    enc.vit.train()
    d = enc.dim
    proj = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))
    # AugSelf-style equivariance head: predicts the transform between the views from both tokens
    equi = nn.Sequential(nn.Linear(2 * d, 2 * d), nn.ReLU(), nn.Linear(2 * d, N_TARGETS))
    params = [p for p in enc.parameters() if p.requires_grad] + list(proj.parameters()) + list(equi.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    warmup = max(steps // 10, 1)
    loss_val = eq_val = float("nan")
    for step in range(steps):
        # linear warm-up, cosine decay
        frac = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))
        for group in opt.param_groups:
            group["lr"] = lr * frac
        idx = torch.randint(0, n_images, (batch_size,), generator=gen)
        z1, z2 = enc(augment(views[0, idx], gen)), enc(augment(views[1, idx], gen))
        nce = info_nce(proj(z1), proj(z2))
        eq = F.mse_loss(equi(torch.cat([z1, z2], 1)), transform_targets(geom[0, idx], geom[1, idx]) / target_scale)
        loss = nce + equivariance * eq
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss_val, eq_val = float(nce.detach()), float(eq.detach())
        if progress is not None:
            progress(step + 1, steps)
    enc.vit.eval()
    meta = {"ssl_version": SSL_VERSION, "shapes_version": SHAPES_VERSION, "method": "simclr+equivariance", "steps": steps,
            "equivariance": equivariance, "tint": TINT,
            "batch_size": batch_size, "n_images": n_images, "seed": seed, "final_loss": round(loss_val, 4),
            "final_equivariance_loss": round(eq_val, 4),
            "train_seconds": round(time.perf_counter() - t0, 1)}
    return {k: v.detach().clone().contiguous() for k, v in enc.vit.state_dict().items()}, meta


def cache_path(cfg: EncoderConfig) -> Path:
    """``<cache>/shapes-ssl-v<V>-<hash>.safetensors``, keyed by everything that changes the weights."""
    key = json.dumps({"model": cfg.model, "img_size": cfg.img_size, "overrides": cfg.overrides, "seed": cfg.seed,
                      "mean": cfg.mean, "std": cfg.std, "steps": DEFAULT_STEPS, "batch": DEFAULT_BATCH,
                      "images": DEFAULT_IMAGES, "equivariance": EQUIVARIANCE, "tint": TINT, "ssl": SSL_VERSION, "shapes": SHAPES_VERSION}, sort_keys=True)
    return cache_dir() / f"shapes-ssl-v{SSL_VERSION}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.safetensors"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # stdout may be a --json result


def builtin_weights(cfg: EncoderConfig, log: Callable[[str], None] = _stderr) -> Path:
    """The cached weights file for ``cfg.weights == "builtin:shapes-ssl"``, trained now if missing
    (written atomically, so concurrent ranks or a Ctrl-C never leave a torn file)."""
    if cfg.weights not in BUILTIN_WEIGHTS:
        raise InputError(f"unknown builtin encoder weights {cfg.weights!r}; choose one of {', '.join(BUILTIN_WEIGHTS)}")
    path = cache_path(cfg)
    group = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    # Under torchrun one process per node trains (caches are per machine); the rest wait.
    if not path.exists() and (not group or int(os.environ.get("LOCAL_RANK", "0")) == 0):
        log(f"pre-training the {cfg.weights} encoder (SimCLR + equivariance on builtin:shapes, once; cached at {path}) ...")
        state, meta = pretrain(cfg)
        save_tensors(path, state, metadata=meta)
        log(f"encoder pre-trained in {meta['train_seconds']} s (final InfoNCE loss {meta['final_loss']})")
    if group:
        dist.barrier()
    return path


def build_encoder(cfg: EncoderConfig, load_weights: bool = True, root: Optional[Path] = None) -> SSLEncoder:
    """:func:`reptok.models.encoder.build_encoder` with the builtin names resolved here (their
    cached file, pre-trained now if missing): for the commands that train from such an encoder."""
    return _build_encoder(cfg, load_weights, root, resolve_builtin=builtin_weights)

"""``builtin:shapes-ssl``: a small ViT pre-trained self-supervised on builtin:shapes, offline.

The method needs a *pre-trained SSL* encoder: the paper's random-init ablation reconstructs but
does not generate (gFID 128.5), because a random ViT's [cls] output carries little of the
image's meaning. Offline there is no DINOv2, so the CPU presets get the next best thing: the same
timm ViT, trained here with SimCLR (two views of each object, InfoNCE on a projection of the
final-norm [cls] output). A view is the object rendered on its own random background (the
renderer's natural "second photo" of the same object), jittered in brightness and contrast.
Without the background swap the most instance-specific thing in an image is its background and
SimCLR learns backgrounds; with it, the [cls] token describes the object and, like DINOv2's, little
of the rest. Measured on held-out shapes (linear probes): class 0.61 (random ViT 0.30), size
R^2 0.3-0.6, position R^2 only 0.1-0.2 (the cls token pools), background mostly gone. Stage (a) is
meant to teach the token the rest. No class labels are used.

Trained on demand (about a minute on 2 CPU cores for the small preset's ViT) and cached as
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
from ..checkpoint import save_tensors
from ..config import EncoderConfig
from ..data.shapes import NUM_CLASSES, SHAPES_VERSION, render_shape
from ..errors import InputError
from .encoder import SSLEncoder

BUILTIN_WEIGHTS = ("builtin:shapes-ssl",)
SSL_VERSION = 2
DEFAULT_STEPS = 400
DEFAULT_BATCH = 256
DEFAULT_IMAGES = 8_000
TRAIN_SEED = 2_000_003  # never the default prep seed (0): the encoder does not see the data it encodes
TEMPERATURE = 0.2


# ----------------------------------------------------------------------------- augmentations
def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random photometric view of each image of x (B, 3, R, R) in [-1, 1]: brightness and
    contrast jitter (the same for all channels: colour is content, not nuisance) and a little
    noise. No geometric jitter: where the object is stays part of what the token knows."""
    b = x.shape[0]
    gain = 0.8 + 0.4 * torch.rand(b, 1, 1, 1, generator=gen)
    bias = 0.15 * (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1)
    out = x * gain + bias + 0.03 * torch.randn(x.shape, generator=gen)
    return out.clamp(-1, 1)


def render_pairs(n: int, resolution: int, seed: int) -> np.ndarray:
    """uint8 (2, n, 3, R, R): object i (random class, size, place, angle, colour jitter) rendered
    twice, each time on a background of its own."""
    out = np.empty((2, n, resolution, resolution, 3), np.uint8)
    for i in range(n):
        label = int(np.random.default_rng([seed, i, 0]).integers(NUM_CLASSES))
        for v in range(2):
            out[v, i] = render_shape(np.random.default_rng([seed, i, 1]), label, resolution,
                                     bg_rng=np.random.default_rng([seed, i, 2 + v]))[0]
    return out.transpose(0, 1, 4, 2, 3)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """SimCLR's NT-Xent: a[i] and b[i] are positives, every other view in the batch a negative."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    n = a.shape[0]
    logits = z @ z.t() / temperature
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(logits, target)


# ----------------------------------------------------------------------------- training
def pretrain(
    cfg: EncoderConfig,
    steps: Optional[int] = None,
    batch_size: Optional[int] = None,
    n_images: Optional[int] = None,
    lr: float = 2e-3,
    seed: int = TRAIN_SEED,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Tuple[Dict[str, torch.Tensor], dict]:
    """SimCLR-train ``cfg``'s ViT (random init, every weight trainable) on fresh builtin:shapes.

    Returns ``(state_dict in timm naming, metadata)``; None means the module default."""
    steps = DEFAULT_STEPS if steps is None else steps
    batch_size = DEFAULT_BATCH if batch_size is None else batch_size
    n_images = DEFAULT_IMAGES if n_images is None else n_images
    t0 = time.perf_counter()
    views = torch.from_numpy(render_pairs(n_images, cfg.img_size, seed)).float() / 127.5 - 1  # (2, N, 3, R, R)
    enc = SSLEncoder(dataclasses.replace(cfg, weights="random", train_backbone=True))
    enc.vit.train()
    head = nn.Sequential(nn.Linear(enc.dim, 2 * enc.dim), nn.ReLU(), nn.Linear(2 * enc.dim, enc.dim))
    params = [p for p in enc.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    warmup = max(steps // 10, 1)
    loss_val = float("nan")
    for step in range(steps):
        # linear warm-up, cosine decay
        frac = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))
        for group in opt.param_groups:
            group["lr"] = lr * frac
        idx = torch.randint(0, n_images, (batch_size,), generator=gen)
        loss = info_nce(head(enc(augment(views[0, idx], gen))), head(enc(augment(views[1, idx], gen))))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss_val = float(loss.detach())
        if progress is not None:
            progress(step + 1, steps)
    enc.vit.eval()
    meta = {"ssl_version": SSL_VERSION, "shapes_version": SHAPES_VERSION, "method": "simclr", "steps": steps,
            "batch_size": batch_size, "n_images": n_images, "seed": seed, "final_loss": round(loss_val, 4),
            "train_seconds": round(time.perf_counter() - t0, 1)}
    return {k: v.detach().clone().contiguous() for k, v in enc.vit.state_dict().items()}, meta


def cache_path(cfg: EncoderConfig) -> Path:
    """``<cache>/shapes-ssl-v<V>-<hash>.safetensors``, keyed by everything that changes the weights."""
    key = json.dumps({"model": cfg.model, "img_size": cfg.img_size, "overrides": cfg.overrides, "seed": cfg.seed,
                      "mean": cfg.mean, "std": cfg.std, "steps": DEFAULT_STEPS, "batch": DEFAULT_BATCH,
                      "images": DEFAULT_IMAGES, "ssl": SSL_VERSION, "shapes": SHAPES_VERSION}, sort_keys=True)
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
        log(f"pre-training the {cfg.weights} encoder (SimCLR on builtin:shapes, once; cached at {path}) ...")
        state, meta = pretrain(cfg)
        save_tensors(path, state, metadata=meta)
        log(f"encoder pre-trained in {meta['train_seconds']} s (final InfoNCE loss {meta['final_loss']})")
    if group:
        dist.barrier()
    return path

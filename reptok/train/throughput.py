"""``reptok bench --train``: training throughput of a preset, the model alone vs loader-fed.

Two rows per stage (``recon`` = stage a, ``gen`` = stage b), each ``fit`` (AdamW, EMA, clipping,
autocast) on a temporary run with random weights (throughput does not depend on them):

- ``model``: one synthetic batch (the task's first) fed again and again: no reads, no decoding,
  what the step itself costs;
- ``loader``: the task's own data loader (``workers`` processes for stage a; tokens in memory for
  stage b) over builtin:shapes at the preset's resolution.

images/s is steady state: from the first to the last step (``fit``'s ``steady_images_per_s``),
so start-up and the first step (compilation, allocation) are left out. TFLOP/s and MFU use the
training FLOPs of ``reptok.flops``. Latent presets get a random SD-VAE-shaped VAE; their stage a
rows include the VAE encoder pass (run ``benchmarks/train_throughput.py --cache`` for the
latent-cache case).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .. import flops
from ..config import PipelineConfig, with_encoder
from ..errors import InputError

TRAIN_STAGES = ("recon", "gen")


class Synthetic:
    """The task's first batch, returned for every step (the model alone: no reads)."""

    def __init__(self, source, batch: int):
        self.batch = source(torch.arange(batch))

    def __call__(self, indices):
        return self.batch


def bench_config(preset: str, batch_size: Optional[int], steps: int) -> PipelineConfig:
    from ..presets import get_preset

    try:
        cfg = with_encoder(get_preset(preset), None, "random")
    except KeyError as e:
        raise InputError(str(e.args[0])) from None
    if batch_size:
        cfg.train.batch_size = batch_size
    cfg.train.steps = steps
    cfg.train.log_every = cfg.train.ckpt_every = 10 ** 9  # host syncs only at the first and last step
    cfg.train.sample_every = cfg.train.val_every = 0
    return cfg


def recon_task(cfg: PipelineConfig, root: Path, images: int):
    from ..bench import random_autoencoder
    from ..data.dataset import PreparedDataset
    from ..data.prep import prepare
    from ..pipeline import Pipeline
    from ..shapes.ssl import builtin_weights
    from .recon import ReconTask

    prepare(f"builtin:shapes:{images}", root / "data", resolution=cfg.image_size)
    if not cfg.vae.is_pixel:
        random_autoencoder(cfg.vae, 0).save_pretrained(root / "vae")
        cfg.vae.source, cfg.vae.subfolder = str(root / "vae"), None
    torch.manual_seed(0)
    pipe = Pipeline.build(cfg, components=("encoder", "decoder", "vae"), resolve_builtin=builtin_weights)
    return ReconTask(pipe, PreparedDataset(root / "data"), cfg.train.cos_weight, False, cfg.train.token_lr_scale,
                     hflip=cfg.train.hflip)


def gen_task(cfg: PipelineConfig, n: int):
    from ..models import build_generator
    from .gen import GenTask

    g = cfg.generator
    g.token_dim, g.num_classes = cfg.encoder.dim, max(g.num_classes, 1)
    torch.manual_seed(0)
    gen = build_generator(g)
    gen.set_token_stats(torch.zeros(g.token_dim), torch.ones(g.token_dim))
    tokens = np.random.default_rng(0).standard_normal((n, g.token_dim)).astype(np.float32)
    return GenTask(gen, tokens, np.arange(n) % g.num_classes, g.class_dropout)


def _rate(task, cfg: PipelineConfig, mode: str, device, precision: str, workers: Optional[int]) -> float:
    from .loop import fit

    if mode == "model":
        source = task.example_source() if hasattr(task, "example_source") else task.load_examples
        fixed = Synthetic(source, cfg.train.batch_size // cfg.train.grad_accum)
        task.example_source = lambda: fixed  # instance attribute: this benchmark's task only
        workers = 0
    try:
        with tempfile.TemporaryDirectory() as run:
            s = fit(task, Path(run), cfg.train, device=device, precision=precision, progress=False,
                    workers=workers, tensorboard=False)
    finally:
        if mode == "model":
            del task.example_source
    return s.get("steady_images_per_s", s["images_per_s"])


def train_throughput(preset: str, stages: Sequence[str] = TRAIN_STAGES, steps: int = 10,
                     batch_size: Optional[int] = None, images: int = 512, workers: Optional[int] = None,
                     device: str = "cpu", precision: str = "auto",
                     log: Optional[Callable[[str], None]] = None) -> dict:
    """{"rows": [{stage, mode, batch, images_per_s, tflops, mfu}], "peak": ..., "notes": [...]}."""
    from .loop import amp_dtype_for

    log = log or (lambda m: None)
    bad = [s for s in stages if s not in TRAIN_STAGES]
    if bad:
        raise InputError(f"--train {bad[0]!r}: choose from {', '.join(TRAIN_STAGES)}")
    if steps < 2:
        raise InputError(f"--iters {steps}: training throughput needs at least 2 steps")
    name, peak = flops.device_peak(device, amp_dtype_for(precision, device))
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in stages:
            cfg = bench_config(preset, batch_size, steps)
            task = recon_task(cfg, Path(tmp) / stage, images) if stage == "recon" else gen_task(cfg, images)
            gflops = flops.train_gflops(cfg, stage)
            for mode in ("model", "loader"):
                log(f"  train {stage} ({mode}) ...")
                rate = _rate(task, cfg, mode, device, precision, workers)
                rows.append({"stage": stage, "mode": mode, "batch": cfg.train.batch_size, "images_per_s": round(rate, 2),
                             **flops.utilisation(rate, gflops, peak)})
    if peak is None:
        notes.append(f"no MFU: {name} is not in the peak table (unknown device: no MFU, see reptok/flops.py)")
    return {"preset": preset, "device": str(device), "precision": precision, "steps": steps,
            "peak": {"device": name, "peak_tflops": peak[1] if peak else None}, "rows": rows, "notes": notes}

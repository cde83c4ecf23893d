"""The one training loop, used by both stages (tokenizer and generator).

A *task* (``ReconTask``, ``GenTask``) is an ``nn.Module`` whose ``forward(batch, noise)`` returns
``(loss, metrics)``; the loop owns everything else: AdamW, warm-up, gradient clipping, EMA,
mixed precision, DDP under torchrun, JSONL metrics, atomic checkpoints and exact resume.

Determinism (what makes ``--resume`` and multi-rank runs reproduce a single uninterrupted run):
- the global batch of step s is a pure function of (seed, s): an epoch-wise permutation;
- all randomness of step s (times, noise, label dropout) is drawn for the *global* batch from a
  generator seeded with (seed, s), then each rank takes its slice;
- checkpoints hold raw weights, EMA weights and optimizer state.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from .. import checkpoint as ckpt
from ..config import TrainConfig
from ..errors import InputError, TrainingDiverged
from .dist import DistInfo

METRICS = "metrics.jsonl"


# ----------------------------------------------------------------------------- determinism
def step_generator(seed: int, step: int) -> torch.Generator:
    s = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), 7]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(s >> np.uint64(1)))


def rank_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the global torch RNG for (step, rank): only randomness *inside* the modules
    (e.g. ``generator.dropout`` > 0) uses it; it is reproducible on resume at the same world size."""
    s = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), 11, int(rank)]).generate_state(1, np.uint64)[0]
    return int(s >> np.uint64(1))


class BatchOrder:
    """Global batch indices for step s: consecutive slices of per-epoch random permutations."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n <= 0:
            raise InputError("the training set is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: Dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        pos = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        out = torch.empty(self.batch_size, dtype=torch.long)
        for epoch in pos.div(self.n, rounding_mode="floor").unique().tolist():
            m = pos.div(self.n, rounding_mode="floor") == epoch
            out[m] = self._perm(epoch)[pos[m] % self.n]
        return out


# ----------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of the saved modules (only trainable tensors move)."""

    def __init__(self, modules: Dict[str, nn.Module], decay: float):
        self.decay = decay
        self.modules = {k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in modules.items()}
        self.pairs = []
        for k, m in modules.items():
            ema_params = dict(self.modules[k].named_parameters())
            for n, p in m.named_parameters():
                if p.requires_grad:
                    self.pairs.append((ema_params[n], p))

    @torch.no_grad()
    def update(self) -> None:
        for e, p in self.pairs:
            e.lerp_(p.detach().to(e.dtype), 1 - self.decay)


# ----------------------------------------------------------------------------- the loop
def _local_slice(batch_size: int, info: DistInfo, accum: int, micro: int) -> slice:
    per_rank = batch_size // info.world_size
    start = info.rank * per_rank + micro * (per_rank // accum)
    return slice(start, start + per_rank // accum)


def _check_batch(cfg: TrainConfig, info: DistInfo) -> None:
    if cfg.batch_size % (info.world_size * cfg.grad_accum):
        raise InputError(
            f"--batch-size {cfg.batch_size} is not divisible by world size x grad-accum "
            f"({info.world_size} x {cfg.grad_accum}); pick a multiple"
        )


def _lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, constant, then a linear cool-down to 0 over the
    last ``cfg.cooldown`` fraction of ``cfg.steps``."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else cfg.lr
    if cfg.cooldown > 0:
        start = cfg.steps * (1 - cfg.cooldown)
        if step >= start:
            lr *= max(0.0, (cfg.steps - step) / (cfg.steps - start))
    return lr


def _param_groups(task, params: list, weight_decay: float = 0.0) -> list:
    """AdamW groups: the parameters ``task.lr_scales()`` (optional) names, one group each, with
    their lr multiplier, and one group for the rest. The grouping does not depend on the values,
    so a resumed run may change a multiplier (``load_checkpoint`` re-applies the config's).

    With ``weight_decay`` > 0 the rest splits in two: decay only on the weight matrices of linear
    and convolution layers; norms, scales (attention scale, LayerScale), biases, embeddings
    (positional, label table, registers) and the cls token get none. (With 0 there is one group,
    as in runs saved before the split, so they still resume.)"""
    scales = task.lr_scales() if hasattr(task, "lr_scales") else {}
    named = [p for p in params if p in scales]
    rest = [p for p in params if p not in scales]
    named_groups = [{"params": [p], "lr_scale": float(scales[p]), "weight_decay": 0.0} for p in named]
    if weight_decay <= 0:
        return [{"params": rest, "lr_scale": 1.0}] * bool(rest) + named_groups
    matrices = {id(m.weight) for m in task.modules()
                if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and getattr(m, "weight", None) is not None}
    decay = [p for p in rest if id(p) in matrices]
    no_decay = [p for p in rest if id(p) not in matrices]
    return ([{"params": decay, "lr_scale": 1.0}] * bool(decay)
            + [{"params": no_decay, "lr_scale": 1.0, "weight_decay": 0.0}] * bool(no_decay) + named_groups)


def save_checkpoint(run: Path, task, ema: EMA, opt, step: int, extra: Optional[dict] = None) -> None:
    meta = {"step": step}
    ckpt.save_tensors(run / ckpt.MODEL, ckpt.state_dict_of(task.saved_modules()), meta)
    ckpt.save_tensors(run / ckpt.EMA, ckpt.state_dict_of(ema.modules), meta)
    state = {"step": step, "optimizer": opt.state_dict(), **(extra or {})}
    ckpt.atomic_save(run / ckpt.TRAIN_STATE, lambda tmp: torch.save(state, tmp))


def load_checkpoint(run: Path, task, ema: EMA, opt) -> int:
    from safetensors import safe_open

    path = run / ckpt.TRAIN_STATE
    if not path.exists():
        raise InputError(f"{run}: nothing to resume (no {ckpt.TRAIN_STATE}); drop --resume to start fresh")
    state = torch.load(path, map_location="cpu", weights_only=True)
    step = int(state["step"])
    for name in (ckpt.MODEL, ckpt.EMA):
        with safe_open(str(run / name), "pt") as f:
            if int((f.metadata() or {}).get("step", -1)) != step:
                raise InputError(f"{run}: {name} is not from step {step} (interrupted while saving?); "
                                 f"restart without --resume")
    raw = ckpt.read_weights(run, use_ema=False)
    ema_w = ckpt.load_tensors(run / ckpt.EMA)
    for name, mod in task.saved_modules().items():
        ckpt.load_into(mod, ckpt.split_prefix(raw, name), str(run / ckpt.MODEL))
        ckpt.load_into(ema.modules[name], ckpt.split_prefix(ema_w, name), str(run / ckpt.EMA))
    scales = [g.get("lr_scale", 1.0) for g in opt.param_groups]  # from this run's config
    try:
        opt.load_state_dict(state["optimizer"])
    except ValueError as e:  # a run saved by a version that grouped the parameters differently
        raise InputError(f"{run}: the optimizer state does not fit this version's parameter groups ({e}); "
                         f"restart the run without --resume") from None
    for g, s in zip(opt.param_groups, scales):
        g["lr_scale"] = s
    return step


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    ckpt.atomic_write_text(path, "".join(line + "\n" for line in keep))


def fit(
    task: nn.Module,
    run: Path,
    cfg: TrainConfig,
    *,
    device: str = "cpu",
    info: DistInfo = DistInfo(),
    resume: bool = False,
    precision: str = "auto",
    progress: bool = True,
    on_sample: Optional[Callable[[Dict[str, nn.Module], int], None]] = None,
    extra_state: Optional[dict] = None,
) -> dict:
    """Train ``task`` for ``cfg.steps`` optimizer steps; returns a summary dict.

    ``task`` provides: ``saved_modules()``, ``num_examples()``, ``load_examples(indices)``,
    ``draw_noise(batch_size, generator)`` and ``forward(batch, noise) -> (loss, metrics)``.
    """
    run = Path(run)
    _check_batch(cfg, info)
    task.to(device)
    params = [p for p in task.parameters() if p.requires_grad]
    if not params:
        raise InputError("nothing to train: every parameter is frozen")
    opt = torch.optim.AdamW(_param_groups(task, params, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                            weight_decay=cfg.weight_decay)
    ema = EMA(task.saved_modules(), cfg.ema)
    start = load_checkpoint(run, task, ema, opt) if resume else 0
    if info.is_main:
        _truncate_metrics(run / METRICS, start)
    model = task
    if info.enabled:
        model = nn.parallel.DistributedDataParallel(
            task, device_ids=[info.local_rank] if str(device).startswith("cuda") else None)
    amp_dtype = None
    if precision in ("auto", "bf16") and str(device).startswith("cuda"):
        amp_dtype = torch.bfloat16
    elif precision == "fp16":
        amp_dtype = torch.float16
    order = BatchOrder(task.num_examples(), cfg.batch_size, cfg.seed)
    summary = {"start_step": start, "steps": cfg.steps, "last_loss": None}

    bar = None
    if progress and info.is_main:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.console import Console

        bar = Progress(TextColumn("[bold]train[/]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                       TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                       console=Console(stderr=True), transient=False)
        bar_task = bar.add_task("train", total=cfg.steps, completed=start, info="")
        bar.start()
    t_start, seen = time.perf_counter(), 0
    last_saved = start
    try:
        model.train()
        for step in range(start, cfg.steps):
            g = step_generator(cfg.seed, step)
            torch.manual_seed(rank_seed(cfg.seed, step, info.rank))
            idx = order.indices(step)
            noise = task.draw_noise(cfg.batch_size, g)
            for group in opt.param_groups:
                group["lr"] = _lr_at(cfg, step) * group.get("lr_scale", 1.0)
            opt.zero_grad(set_to_none=True)
            totals: Dict[str, float] = {}
            for a in range(cfg.grad_accum):
                sl = _local_slice(cfg.batch_size, info, cfg.grad_accum, a)
                batch = {k: v.to(device, non_blocking=True) for k, v in task.load_examples(idx[sl]).items()}
                nz = {k: v[sl].to(device) for k, v in noise.items()}
                sync = contextlib.nullcontext()
                if info.enabled and a < cfg.grad_accum - 1:
                    sync = model.no_sync()
                amp = torch.autocast(torch.device(device).type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
                with sync, amp:
                    loss, metrics = model(batch, nz)
                (loss.float() / cfg.grad_accum).backward()
                for k, v in {"loss": loss, **metrics}.items():
                    totals[k] = totals.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            stats = torch.tensor([totals[k] for k in sorted(totals)], dtype=torch.float64)
            if info.enabled:
                tdist.all_reduce(stats)
                stats /= info.world_size
            totals = dict(zip(sorted(totals), stats.tolist()))
            if not math.isfinite(totals["loss"]):
                raise TrainingDiverged(
                    f"loss became {totals['loss']} at step {step + 1}; the last good checkpoint "
                    f"(step {last_saved}) is kept in {run}. Lower --lr or raise --grad-clip, then --resume")
            gnorm = nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
            opt.step()
            ema.update()
            seen += cfg.batch_size
            done = step + 1
            summary["last_loss"] = totals["loss"]
            if info.is_main and (done % cfg.log_every == 0 or done == 1 or done == cfg.steps):
                rate = seen / max(time.perf_counter() - t_start, 1e-9)
                rec = {"step": done, **{k: round(v, 6) for k, v in totals.items()},
                       "grad_norm": round(float(gnorm), 6), "lr": _lr_at(cfg, step), "images_per_s": round(rate, 2)}
                with open(run / METRICS, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if bar is not None:
                    shown = " ".join(f"{k} {v:.4f}" for k, v in totals.items())
                    bar.update(bar_task, info=f"{shown}  {rate:.1f} img/s")
            if bar is not None:
                bar.update(bar_task, completed=done)
            if done % cfg.ckpt_every == 0 or done == cfg.steps:
                if info.is_main:
                    save_checkpoint(run, task, ema, opt, done, extra_state)
                last_saved = done
            if on_sample is not None and info.is_main and cfg.sample_every and (
                    done % cfg.sample_every == 0 or done == cfg.steps):
                on_sample(ema.modules, done)
                model.train()
    finally:
        if bar is not None:
            bar.stop()
    elapsed = time.perf_counter() - t_start
    summary.update(seconds=round(elapsed, 2), images_per_s=round(seen / max(elapsed, 1e-9), 2))
    return summary

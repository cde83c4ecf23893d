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
import signal
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from .. import io
from .. import run as rundir
from ..choices import TRAIN_PRECISIONS as PRECISIONS
from ..config import TrainConfig
from ..errors import InputError, TrainingDiverged
from ..dist import DistInfo
from .feed import default_workers, local_slice, step_loader
from .logs import METRICS, TrainLogger

PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1")  # a scheduler's stop / SLURM's warning before the time limit


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

        self._ema = [e for e, _ in self.pairs]
        self._raw = [p for _, p in self.pairs]

    @torch.no_grad()
    def update(self) -> None:
        # One multi-tensor kernel per dtype group on CUDA instead of a launch per parameter
        # (hundreds at XL); the same arithmetic as a per-tensor lerp_.
        if self._ema:
            torch._foreach_lerp_(self._ema, self._raw, 1 - self.decay)


# ----------------------------------------------------------------------------- the loop
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


def make_optimizer(task, params: list, cfg: TrainConfig, dev_type: str) -> torch.optim.AdamW:
    """AdamW over ``_param_groups``; fused on CUDA (one kernel for every parameter instead of a
    foreach chain per group). Elsewhere torch's default implementation."""
    return torch.optim.AdamW(_param_groups(task, params, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             weight_decay=cfg.weight_decay, fused=True if dev_type == "cuda" else None)


def save_checkpoint(run: Path, task, ema: EMA, opt, step: int, extra: Optional[dict] = None) -> None:
    meta = {"step": step}
    io.save_tensors(run / rundir.MODEL, rundir.state_dict_of(task.saved_modules()), meta)
    io.save_tensors(run / rundir.EMA, rundir.state_dict_of(ema.modules), meta)
    state = {"step": step, "optimizer": opt.state_dict(), **(extra or {})}
    io.atomic_save(run / rundir.TRAIN_STATE, lambda tmp: torch.save(state, tmp))


def load_checkpoint(run: Path, task, ema: EMA, opt, scaler=None) -> int:
    from safetensors import safe_open

    path = run / rundir.TRAIN_STATE
    if not path.exists():
        raise InputError(f"{run}: nothing to resume (no {rundir.TRAIN_STATE}); drop --resume to start fresh")
    state = torch.load(path, map_location="cpu", weights_only=True)
    step = int(state["step"])
    for name in (rundir.MODEL, rundir.EMA):
        with safe_open(str(run / name), "pt") as f:
            if int((f.metadata() or {}).get("step", -1)) != step:
                raise InputError(f"{run}: {name} is not from step {step} (interrupted while saving?); "
                                 f"restart without --resume")
    raw = rundir.read_weights(run, use_ema=False)
    ema_w = io.load_tensors(run / rundir.EMA)
    for name, mod in task.saved_modules().items():
        rundir.load_into(mod, rundir.split_prefix(raw, name), str(run / rundir.MODEL))
        rundir.load_into(ema.modules[name], rundir.split_prefix(ema_w, name), str(run / rundir.EMA))
    scales = [g.get("lr_scale", 1.0) for g in opt.param_groups]  # from this run's config
    try:
        opt.load_state_dict(state["optimizer"])
    except ValueError as e:  # a run saved by a version that grouped the parameters differently
        raise InputError(f"{run}: the optimizer state does not fit this version's parameter groups ({e}); "
                         f"restart the run without --resume") from None
    for g, s in zip(opt.param_groups, scales):
        g["lr_scale"] = s
    if scaler is not None and scaler.is_enabled():
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        elif step > 0:
            raise InputError(f"{run}: saved without fp16 loss scaling; resume it with the precision it was "
                             f"trained with (or restart without --resume)")
    return step


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    io.atomic_write_text(path, "".join(line + "\n" for line in keep))


# ----------------------------------------------------------------------------- precision
def amp_dtype_for(precision: str, device: str) -> Optional[torch.dtype]:
    """The autocast dtype of ``--precision`` on ``device`` (None = fp32); InputError if unknown.

    auto: bf16 on CUDA, fp32 elsewhere. bf16 / fp16 autocast on CPU too (torch's CPU autocast);
    fp16 always trains with a GradScaler (its state is part of the checkpoint).
    """
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def ddp_options(info: DistInfo, dev_type: str) -> dict:
    """DistributedDataParallel keywords. The tasks' buffers are constants (RoPE frequencies, token
    statistics, frozen norms) identical on every rank, so broadcasting them every step is wasted
    traffic; gradients as views of the all-reduce buckets save a copy and their memory."""
    return {"device_ids": [info.local_rank] if dev_type == "cuda" else None,
            "broadcast_buffers": False, "gradient_as_bucket_view": True}


# ----------------------------------------------------------------------------- preemption
class _StopRequest:
    """SIGTERM / SIGUSR1 set a flag; the loop finishes its step, checkpoints and returns."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for name in PREEMPT_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


@contextlib.contextmanager
def _workers_ignore_preemption():
    """Loader workers started in here inherit a signal mask that blocks SIGTERM / SIGUSR1. SLURM's
    preemption and ``scancel`` signal the whole process group: a worker killed by SIGTERM makes the
    next batch raise ("DataLoader worker ... is killed by signal") before the main process can
    checkpoint. The main process alone handles the signal; the workers end when the loader does."""
    import threading

    sigs = {getattr(signal, n) for n in PREEMPT_SIGNALS if hasattr(signal, n)}
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:  # a signal that came meanwhile is delivered to the main process now
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _wait_for_the_save(info: DistInfo) -> None:
    """After a stop request every rank waits until rank 0's checkpoint is complete: a rank that
    exits first makes torchrun SIGTERM, then SIGKILL rank 0 in the middle of the write."""
    if info.enabled:
        tdist.barrier()


def _agree_to_stop(stop: _StopRequest, info: DistInfo, device: str) -> Optional[int]:
    """The signal number if any rank was asked to stop (every rank gets the same answer)."""
    if not info.enabled:
        return stop.signum
    flag = torch.tensor([stop.signum or 0], dtype=torch.int64, device=device)
    tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
    return int(flag.item()) or None


# ----------------------------------------------------------------------------- the loop
class _Fit:
    """One ``fit`` call split into its phases: set-up (here), one optimizer step (``step``), the
    bookkeeping at its end (``end_step``) and the closing summary (``finish``). The attributes are
    what the phases share: the model and optimizer state, the device-side loss window, the clocks."""

    def __init__(self, task: nn.Module, run: Path, cfg: TrainConfig, device: str, info: DistInfo,
                 resume: bool, precision: str, compile: bool, hooks: dict):
        self.task, self.run, self.cfg, self.device, self.info, self.hooks = task, run, cfg, device, info, hooks
        _check_batch(cfg, info)
        self.amp_dtype = amp_dtype_for(precision, device)
        self.dev_type = dev_type = torch.device(device).type
        task.to(device)
        self.params = params = [p for p in task.parameters() if p.requires_grad]
        if not params:
            raise InputError("nothing to train: every parameter is frozen")
        self.opt = opt = make_optimizer(task, params, cfg, dev_type)
        self.scaler = scaler = torch.amp.GradScaler(dev_type, enabled=self.amp_dtype is torch.float16)
        self.ema = ema = EMA(task.saved_modules(), cfg.ema)
        self.start = start = load_checkpoint(run, task, ema, opt, scaler) if resume else 0
        if info.is_main:
            _truncate_metrics(run / METRICS, start)
        if compile:
            for region in (task.compile_regions() if hasattr(task, "compile_regions") else [task]):
                region.compile()  # in place: parameter names (and so checkpoints) do not change
        self.model = task
        if info.enabled:
            self.model = nn.parallel.DistributedDataParallel(task, **ddp_options(info, dev_type))
        self.pin = dev_type == "cuda"
        self.last_saved = start
        self.sync_every = max(1, min(cfg.log_every, 10))  # ranks agree on a stop request this often

    def start_clock(self) -> None:
        self.window_loss = None  # summed over the steps since the last host read, on the device
        self.t_start, self.seen = time.perf_counter(), 0
        # steady-state rate: after the first synced step
        self.t_first = self.seen_first = self.t_synced = self.seen_synced = None

    def step(self, step: int, loader) -> tuple:
        """One optimizer step over ``cfg.grad_accum`` micro-batches; returns ``(keys, stats, gnorm)``:
        the metric names, their rank-averaged values (on the device) and the gradient norm."""
        task, cfg, info, opt, scaler, params = self.task, self.cfg, self.info, self.opt, self.scaler, self.params
        g = step_generator(cfg.seed, step)
        torch.manual_seed(rank_seed(cfg.seed, step, info.rank))
        noise = task.draw_noise(cfg.batch_size, g)
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step) * group.get("lr_scale", 1.0)
        opt.zero_grad(set_to_none=True)
        totals = self._accumulate(loader, noise)
        keys = sorted(totals)
        stats = torch.stack([totals[k].to(torch.float64) for k in keys])  # on the training device
        if info.enabled:
            tdist.all_reduce(stats)
            stats /= info.world_size
        self.window_loss = stats[keys.index("loss")] + (0 if self.window_loss is None else self.window_loss)
        scaler.unscale_(opt)  # clip the true gradients (no-op without fp16)
        gnorm = nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else None
        scaler.step(opt)
        scaler.update()
        self.ema.update()
        self.seen += cfg.batch_size
        return keys, stats, gnorm

    def _accumulate(self, loader, noise: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Forward and backward of each micro-batch; the metrics averaged over them (on the device)."""
        cfg, info, device, amp_dtype = self.cfg, self.info, self.device, self.amp_dtype
        totals: Dict[str, torch.Tensor] = {}
        for a in range(cfg.grad_accum):
            sl = local_slice(cfg.batch_size, info, cfg.grad_accum, a)
            batch = {k: v.to(device, non_blocking=True) for k, v in next(loader).items()}
            # Pinned, so the copy does not wait for the device (no per-step host sync).
            nz = {k: (v[sl].pin_memory() if self.pin else v[sl]).to(device, non_blocking=True) for k, v in noise.items()}
            sync = contextlib.nullcontext()
            if info.enabled and a < cfg.grad_accum - 1:
                sync = self.model.no_sync()
            amp = torch.autocast(self.dev_type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
            with sync, amp:
                loss, metrics = self.model(batch, nz)
            self.scaler.scale(loss.float() / cfg.grad_accum).backward()
            for k, v in {"loss": loss, **metrics}.items():
                v = v.detach().float() / cfg.grad_accum
                totals[k] = totals[k] + v if k in totals else v
        return totals

    def _host_check(self, keys: list, stats: torch.Tensor, step: int) -> Dict[str, float]:
        values = dict(zip(keys, stats.tolist()))
        if not math.isfinite(values["loss"]) or not math.isfinite(float(self.window_loss)):
            if self.last_saved > 0:
                kept = f"the last good checkpoint (step {self.last_saved}) is kept in {self.run}"
                hint = "then --resume"
            else:  # nothing was saved yet: there is nothing to resume from
                kept = "no checkpoint had been written yet"
                hint = "then start again"
            raise TrainingDiverged(f"loss became {values['loss']} by step {step + 1}; {kept}. "
                                   f"Lower --lr or raise --grad-clip, {hint}")
        return values

    def _log_record(self, step: int, values: Dict[str, float], gnorm) -> dict:
        rate = self.seen / max(time.perf_counter() - self.t_start, 1e-9)
        rec = {"step": step + 1, **{k: round(v, 6) for k, v in values.items()},
               "grad_norm": round(float(gnorm), 6) if gnorm is not None else 0.0,
               "lr": _lr_at(self.cfg, step), "images_per_s": round(rate, 2)}
        if self.scaler.is_enabled():
            rec["loss_scale"] = float(self.scaler.get_scale())
        if self.dev_type == "cuda":
            rec["gpu_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2 ** 30, 3)
        return rec

    def end_step(self, step: int, keys: list, stats: torch.Tensor, gnorm, stop: _StopRequest,
                 log: TrainLogger, summary: dict) -> bool:
        """Log, checkpoint, stop on a signal, sample and validate as due after ``step``; True: stop."""
        cfg, info, hooks = self.cfg, self.info, self.hooks
        done = step + 1
        is_log = done % cfg.log_every == 0 or done == 1 or done == cfg.steps
        is_ckpt = done % cfg.ckpt_every == 0 or done == cfg.steps
        signum = _agree_to_stop(stop, info, self.device) if (done % self.sync_every == 0 or is_log or is_ckpt
                                                             or not info.enabled) else None
        if is_log or is_ckpt or signum:
            values = self._host_check(keys, stats, step)  # never checkpoint weights a NaN went through
            self.window_loss = None
            summary["last_loss"] = values["loss"]
            self.t_synced, self.seen_synced = time.perf_counter(), self.seen  # the device is idle here
            if self.t_first is None:
                self.t_first, self.seen_first = self.t_synced, self.seen
        if is_log:
            log.record(self._log_record(step, values, gnorm))
        log.advance(done)
        if is_ckpt or signum:
            if info.is_main:
                scaler = self.scaler
                state = {**(hooks["extra_state"] or {}), **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {})}
                save_checkpoint(self.run, self.task, self.ema, self.opt, done, state)
            self.last_saved = done
        if signum:
            _wait_for_the_save(info)
            name = signal.Signals(signum).name
            log.message(f"{name}: stopped after step {done}, checkpoint written to {self.run}; "
                        f"continue with --resume")
            summary.update(preempted=name, exit_code=128 + signum, stopped_at=done)
            return True
        on_sample, validate = hooks["on_sample"], hooks["validate"]
        if on_sample is not None and info.is_main and cfg.sample_every and (
                done % cfg.sample_every == 0 or done == cfg.steps):
            log.image("samples", on_sample(self.ema.modules, done), done)
            self.model.train()
        if validate is not None and validate.due(done, cfg.steps):
            validate.run(self.ema.modules, done, log)
        return False

    def finish(self, summary: dict) -> dict:
        """Add the run's wall time and throughput to ``summary``."""
        elapsed = time.perf_counter() - self.t_start
        summary.update(seconds=round(elapsed, 2), images_per_s=round(self.seen / max(elapsed, 1e-9), 2))
        if self.t_first is not None and self.t_synced > self.t_first:  # without start-up, compilation and the first step
            summary["steady_images_per_s"] = round((self.seen_synced - self.seen_first) / (self.t_synced - self.t_first), 2)
        return summary


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
    on_sample: Optional[Callable[[Dict[str, nn.Module], int], Optional[np.ndarray]]] = None,
    extra_state: Optional[dict] = None,
    workers: Optional[int] = None,
    compile: bool = False,
    tensorboard: bool = True,
    wandb: Optional[str] = None,
    config: Optional[dict] = None,
    validate=None,
    gflops: Optional[float] = None,
) -> dict:
    """Train ``task`` for ``cfg.steps`` optimizer steps; returns a summary dict.

    ``task`` provides: ``saved_modules()``, ``num_examples()``, ``load_examples(indices)`` (or
    ``example_source()``, a picklable callable for DataLoader workers), ``draw_noise(batch_size,
    generator)`` and ``forward(batch, noise) -> (loss, metrics)``; optionally ``compile_regions()``
    (the modules ``--compile`` compiles, e.g. one per transformer block) and ``reads_files``
    (True: the loader uses worker processes by default).

    Host synchronisation happens only at logging / checkpoint steps (losses are summed on the
    device); ``on_sample`` may return a uint8 grid, logged as an image. ``validate``: a
    ``reptok.train.validate.Validation`` (every rank runs it on the EMA weights when it is due);
    ``gflops``: training GFLOPs per example, for the TFLOP/s and MFU of the log.
    """
    run = Path(run)
    f = _Fit(task, run, cfg, device, info, resume, precision, compile,
             hooks={"on_sample": on_sample, "validate": validate, "extra_state": extra_state})
    order = BatchOrder(task.num_examples(), cfg.batch_size, cfg.seed)
    if workers is None:
        workers = default_workers() if getattr(task, "reads_files", False) else 0
    source = task.example_source() if hasattr(task, "example_source") else task.load_examples
    with _workers_ignore_preemption():
        loader = iter(step_loader(source, order, cfg, info, f.start, workers, pin=f.pin))
    summary = {"start_step": f.start, "steps": cfg.steps, "last_loss": None, "workers": workers}
    log = TrainLogger(run, enabled=info.is_main, start=f.start, total=cfg.steps, progress=progress,
                      tensorboard=tensorboard, wandb=wandb, config=config, gflops=gflops, device=device,
                      amp_dtype=f.amp_dtype)
    if validate is not None and progress:
        log.message(validate.describe)
    f.start_clock()
    try:
        with _StopRequest() as stop:
            f.model.train()
            for step in range(f.start, cfg.steps):
                keys, stats, gnorm = f.step(step, loader)
                if f.end_step(step, keys, stats, gnorm, stop, log, summary):
                    break
    finally:
        log.close()
        del loader  # shuts the workers down
    return f.finish(summary)

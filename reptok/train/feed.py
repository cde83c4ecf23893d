"""The training input pipeline: a DataLoader whose item is one rank's micro-batch of step s.

The determinism contract of the loop (the global batch of step s is a pure function of
(seed, s)) lives in ``BatchOrder``; the loader only decides *where* a micro-batch is read:
``StepBatches[(s, a)]`` gathers this rank's slice ``a`` of ``BatchOrder.indices(s)``, and the
sampler walks (s, a) from the resume step on. Worker processes, pinned memory, prefetch and
persistent workers therefore change the speed, never the batches, at any world size.

Sources return raw storage dtypes (uint8 pixels, float16 cached moments); the task converts them
on the training device, so the host only copies bytes.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from ..config import TrainConfig
from ..dist import DistInfo


def default_workers() -> int:
    """min(8, CPUs available to this process // processes on this node)."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus // local))


def local_slice(batch_size: int, info: DistInfo, accum: int, micro: int) -> slice:
    """This rank's micro-batch ``micro`` inside the global batch (rank-major, then micro)."""
    per_rank = batch_size // info.world_size
    start = info.rank * per_rank + micro * (per_rank // accum)
    return slice(start, start + per_rank // accum)


class StepBatches(Dataset):
    """``ds[(step, micro)]`` -> ``source(indices)`` for this rank's slice of step ``step``."""

    def __init__(self, source: Callable[[torch.Tensor], dict], order, cfg: TrainConfig, info: DistInfo):
        self.source, self.order, self.info = source, order, info
        self.batch_size, self.accum = cfg.batch_size, cfg.grad_accum

    def __len__(self) -> int:  # only for DataLoader's bookkeeping; items are keyed by (step, micro)
        return 2 ** 62

    def __getitem__(self, key: Tuple[int, int]) -> dict:
        step, micro = key
        idx = self.order.indices(step)[local_slice(self.batch_size, self.info, self.accum, micro)]
        return self.source(idx)


class _StepKeys(torch.utils.data.Sampler):
    def __init__(self, start: int, steps: int, accum: int):
        self.start, self.steps, self.accum = start, steps, accum

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        return ((s, a) for s in range(self.start, self.steps) for a in range(self.accum))

    def __len__(self) -> int:
        return max(0, self.steps - self.start) * self.accum


def step_loader(source, order, cfg: TrainConfig, info: DistInfo, start: int, workers: int, pin: bool) -> DataLoader:
    """Micro-batches of steps ``start .. cfg.steps - 1`` in order (``grad_accum`` per step)."""
    kw = {}
    if workers > 0:
        # Enough micro-batches in flight to hide a slow read; workers live for the whole run.
        kw = dict(prefetch_factor=4, persistent_workers=True)
    return DataLoader(StepBatches(source, order, cfg, info), batch_size=None,
                      sampler=_StepKeys(start, cfg.steps, cfg.grad_accum), num_workers=workers,
                      pin_memory=pin, **kw)

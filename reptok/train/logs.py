"""Where training metrics go: metrics.jsonl, the progress bar or plain log lines, TensorBoard, W&B.

Only rank 0 logs. Every record (one per logging step) is written to ``metrics.jsonl``, as scalars
to TensorBoard (``RUN/tensorboard``, when the ``tensorboard`` extra is installed and not switched
off) and to W&B (``--wandb PROJECT``). On a terminal a rich progress bar shows it; otherwise
(a SLURM log, a pipe) one plain line per record: step, losses, img/s, ETA.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .. import flops
from ..errors import InputError

METRICS = "metrics.jsonl"
# Record keys that are not losses (left out of the log line's loss list).
NOT_LOSSES = ("lr", "grad_norm", "images_per_s", "gpu_mem_gib", "loss_scale", "tflops", "mfu", "fid_n", "fd_n",
              "fd_per_class")
TENSORBOARD_DIR = "tensorboard"


def check_wandb(project: Optional[str]) -> None:
    """InputError (before any work) when ``--wandb`` is asked for and wandb is not installed."""
    if project is None:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise InputError("--wandb needs the wandb package: pip install wandb (or drop --wandb)") from None


def tensorboard_available() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class TrainLogger:
    """One logger per run on rank 0 (``enabled=False`` on the other ranks: every call is a no-op)."""

    def __init__(self, run: Path, *, enabled: bool, start: int, total: int, progress: bool = True,
                 tensorboard: bool = True, wandb: Optional[str] = None, config: Optional[dict] = None,
                 gflops: Optional[float] = None, device="cpu", amp_dtype=None):
        self.run, self.enabled, self.start, self.total = Path(run), enabled, start, total
        # Training GFLOPs per example (reptok.flops.train_gflops): adds tflops / mfu to each row.
        self.flops = gflops
        self.device_name, self.peak = flops.device_peak(device, amp_dtype) if gflops else ("", None)
        self._said_no_mfu = False  # the reason for "no MFU" goes on the first train line only
        self.bar = self.tb = self.wandb = None
        self.plain = progress and not sys.stderr.isatty()
        self.t0 = time.perf_counter()
        if not enabled:
            return
        if progress and not self.plain:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]train[/]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=Console(stderr=True), transient=False)
            self.bar_task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()
        if tensorboard and tensorboard_available():
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events it is about to write again.
            self.tb = SummaryWriter(log_dir=str(self.run / TENSORBOARD_DIR), purge_step=start or None)
        if wandb is not None:
            import wandb as wb

            self.wandb = wb.init(project=wandb, dir=str(self.run), name=self.run.name, config=config,
                                 id=self.run.name, resume="allow")

    def record(self, rec: dict) -> None:
        """One logging step's record (``rec["step"]`` = steps done); ``rec["split"] == "val"``
        marks a validation row (TensorBoard / W&B tags ``val/*``, log line ``val step ...``)."""
        if not self.enabled:
            return
        step, split = int(rec["step"]), rec.get("split", "train")
        if split == "train" and self.flops is not None and "images_per_s" in rec:
            util = flops.utilisation(rec["images_per_s"], self.flops, self.peak)
            rec = {**rec, **{k: v for k, v in util.items() if v is not None}}  # no "mfu" without a known peak
        with open(self.run / METRICS, "a") as f:
            f.write(json.dumps(rec) + "\n")
        scalars = {k: v for k, v in rec.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{split}/{k}", v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": v for k, v in scalars.items()}, step=step)
        losses = " ".join(f"{k} {v:.4f}" for k, v in scalars.items() if k not in NOT_LOSSES)
        if split != "train":
            line = f"{split} step {step}/{self.total} {losses}"
            if self.bar is not None:
                self.bar.console.print(line, highlight=False)
            elif self.plain:
                print(line, file=sys.stderr, flush=True)
            return
        rate = rec.get("images_per_s", 0.0)
        util = "" if self.flops is None else ", " + self._utilisation(rec)
        if self.bar is not None:
            self.bar.update(self.bar_task, info=f"{losses}  {rate:.1f} img/s{util}")
        elif self.plain:
            elapsed = time.perf_counter() - self.t0
            done = step - self.start
            eta = elapsed / max(done, 1) * (self.total - step)
            print(f"train step {step}/{self.total} {losses} lr {rec.get('lr', 0):.3g} "
                  f"{rate:.1f} img/s{util} eta {_fmt_eta(eta)}", file=sys.stderr, flush=True)

    def _utilisation(self, rec: dict) -> str:
        """TFLOP/s and MFU; without a known peak the reason ("no MFU (unknown device: CPU)") is
        said on the first line only, later lines carry just the TFLOP/s."""
        if self.peak is None and self._said_no_mfu:
            return f"{rec['tflops']:.3g} TFLOP/s"
        self._said_no_mfu = True
        return flops.describe(rec, self.device_name, self.peak)

    def advance(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(self.bar_task, completed=done)

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:
        """A uint8 (H, W, 3) grid (reconstructions, samples) at a checkpoint step."""
        if not self.enabled or grid is None:
            return
        if self.tb is not None:
            self.tb.add_image(tag, np.ascontiguousarray(grid), step, dataformats="HWC")
            self.tb.flush()
        if self.wandb is not None:
            import wandb as wb

            self.wandb.log({tag: wb.Image(grid)}, step=step)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.console.print if self.bar is not None else lambda t: print(t, file=sys.stderr, flush=True))(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()

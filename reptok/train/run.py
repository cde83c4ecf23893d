"""Run-directory set-up shared by the training stages."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .. import checkpoint as ckpt
from ..config import PipelineConfig
from ..errors import InputError
from .dist import DistInfo, barrier


def prepare_run_dir(out: Path, cfg: PipelineConfig, kind: str, resume: bool, info: DistInfo,
                    extra: Optional[dict] = None) -> PipelineConfig:
    """Create (or, with ``resume``, check) the run directory and write its config.json."""
    out = Path(out)
    exists = (out / ckpt.CONFIG).exists()
    if resume and not (out / ckpt.TRAIN_STATE).exists():
        raise InputError(f"{out}: nothing to resume (no {ckpt.TRAIN_STATE}); drop --resume to start fresh")
    if not resume and exists:
        raise InputError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if resume:
        old = ckpt.read_run_config(out)
        if old["kind"] != kind:
            raise InputError(f"{out} is a {old['kind']} run, not a {kind} run")
    cfg.validate()
    # Every rank checks the directory before rank 0 writes into it (otherwise a slower rank can
    # see rank 0's fresh config.json and refuse the run as "already holds a run").
    barrier()
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.write_run_config(out, cfg, kind, **(extra or {}))
    barrier()
    return cfg


def load_run_config_for_resume(out: Path) -> Optional[PipelineConfig]:
    """The saved config of ``out`` (to resume with the same models), or None if there is none."""
    out = Path(out)
    if not (out / ckpt.CONFIG).exists():
        return None
    return ckpt.read_run_config(out)["config"]

"""Run-directory set-up shared by the training stages."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from .. import run as rundir
from ..config import PipelineConfig, with_encoder, with_vae
from ..errors import InputError
from ..outputs import check_run_output, has_checkpoint
from ..presets import DEFAULT_PRESET
from ..dist import DistInfo, barrier


def checkpoint_step(out: Path) -> Optional[int]:
    """The step of the run's last checkpoint (model.safetensors' metadata), or None."""
    from safetensors import safe_open

    path = Path(out) / rundir.MODEL
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        step = (f.metadata() or {}).get("step")
    return int(step) if step is not None else None


def last_loss(out: Path) -> Optional[float]:
    """The training loss of the last line of RUN/metrics.jsonl that has one (None without a
    log; validation rows, ``"split": "val"``, are skipped)."""
    import json

    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return None
    for line in reversed(path.read_text().splitlines()):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec and rec.get("split", "train") == "train":
            return float(rec["loss"])
    return None


def finished_summary(out: Path, cfg: PipelineConfig, kind: str) -> Optional[dict]:
    """For ``--resume``: a summary if the run already reached ``cfg.train.steps`` (nothing to
    train: the command says so and exits 0), else None. Wrong run kinds are exit 2."""
    out = Path(out)
    old = rundir.read_run_config(out)
    if old["kind"] != kind:
        raise InputError(f"{out} is a {old['kind']} run, not a {kind} run")
    step = checkpoint_step(out)
    if step is None or step < cfg.train.steps:
        return None
    return {"run": str(out), "finished": True, "step": step, "steps": cfg.train.steps,
            "last_loss": last_loss(out), "trained_steps": 0}


def schedule_change(out: Path, cfg: PipelineConfig) -> Optional[str]:
    """``--resume`` with another ``--steps`` than the run's config.json: the one-line notice of what
    changes (None when nothing does). The lr cool-down (``train.cooldown`` > 0) is a fraction of the
    step count, so the run continues on another schedule: the notice names the old and new cool-down
    and the lr at the next step. Without a cool-down the schedule does not depend on the steps."""
    from .loop import _lr_at

    old = rundir.read_run_config(Path(out))["config"].train
    new, step = cfg.train, checkpoint_step(out) or 0
    if new.steps == old.steps or (old.cooldown == 0 and new.cooldown == 0):
        return None

    def span(t) -> str:
        return f"{round(t.steps * (1 - t.cooldown))}-{t.steps}" if t.cooldown > 0 else "none"

    return (f"note: --steps {new.steps} changes the lr schedule of this {old.steps}-step run: cool-down steps "
            f"{span(new)} (was {span(old)}); lr at step {step + 1}: {_lr_at(new, step):.3g} (was {_lr_at(old, step):.3g})")


class fresh_run_guard:
    """Around a training call that starts a run in ``out``: if it fails before its first
    checkpoint, the directory it created is removed again (or, if the folder existed, the
    config.json / metrics.jsonl it wrote), so a failed start leaves nothing behind."""

    def __init__(self, out: Path, resume: bool, is_main: bool = True):
        self.out, self.active = Path(out), (not resume) and is_main
        self.existed = self.out.exists()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        import shutil

        if exc_type is None or not self.active or has_checkpoint(self.out):
            return False
        if not self.existed:
            shutil.rmtree(self.out, ignore_errors=True)
        else:
            for name in (rundir.CONFIG, "metrics.jsonl"):
                (self.out / name).unlink(missing_ok=True)
        return False


def prepare_run_dir(out: Path, cfg: PipelineConfig, kind: str, resume: bool, info: DistInfo,
                    extra: Optional[dict] = None) -> PipelineConfig:
    """Create (or, with ``resume``, check) the run directory and write its config.json. A folder
    without a checkpoint (see :func:`has_checkpoint`) is a fresh start: its config is replaced."""
    out = Path(out)
    exists = has_checkpoint(out)
    if resume and not (out / rundir.TRAIN_STATE).exists():
        raise InputError(f"{out}: nothing to resume (no {rundir.TRAIN_STATE}); drop --resume to start fresh")
    if not resume and exists:
        raise InputError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if resume:
        old = rundir.read_run_config(out)
        if old["kind"] != kind:
            raise InputError(f"{out} is a {old['kind']} run, not a {kind} run")
        # A resumed run keeps what it recorded at its start (--init, provenance) unless restated.
        kept = {k: v for k, v in old.items() if k not in ("format", "kind", "pipeline", "config")}
        extra = {**kept, **(extra or {})}
    cfg.validate()
    # Every rank checks the directory before rank 0 writes into it (otherwise a slower rank can
    # see rank 0's fresh config.json and refuse the run as "already holds a run").
    barrier()
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        rundir.write_run_config(out, cfg, kind, **(extra or {}))
    barrier()
    return cfg


# ----------------------------------------------------------------------------- --init RUN
# Which run kinds hold the weights a stage starts from, and which components it loads.
INIT_KINDS = {"recon": ("tokenizer", "pipeline"), "gen": ("generator", "pipeline")}
INIT_COMPONENTS = {"recon": ("encoder", "decoder"), "gen": ("generator",)}


def read_init(init: Path, stage: str, cfg: PipelineConfig) -> Dict[str, dict]:
    """Check ``init`` for ``train <stage> --init`` before any work: a run of a fitting kind whose
    raw weights (``model.safetensors``: the training state, for a converted official run the fp32
    encoder, the original cls token and the raw generator) fit the models of ``cfg`` key for key
    and shape for shape. Returns {component: state}; InputError (exit 2) otherwise."""
    from ..models.decoder import FlowDecoder
    from ..models.encoder import SSLEncoder
    from ..models import build_generator

    init = Path(init)
    init_run_config(init, stage)
    state = rundir.read_weights(init, use_ema=False)
    comps = INIT_COMPONENTS[stage]
    parts = {c: rundir.split_prefix(state, c) for c in comps}
    for c, part in parts.items():
        if not part:
            raise InputError(f"--init {init}: the run has no {c} weights")
    build = {"encoder": lambda: SSLEncoder(cfg.encoder, load_weights=False),
             "decoder": lambda: FlowDecoder(cfg.decoder), "generator": lambda: build_generator(cfg.generator)}
    for c, part in parts.items():
        with torch.device("meta"):  # shapes only: no memory, no weights read
            module = build[c]()
        rundir.check_state(module, part, f"--init {init / rundir.MODEL} ({c})")
    text = rundir.split_prefix(state, "text_encoder")
    if stage == "gen" and text:  # a random ``tiny`` text tower travels with its generator
        parts["text_encoder"] = text
    return parts


def init_run_config(init: Path, stage: str) -> PipelineConfig:
    """The config of the ``--init`` run, after checking that its kind fits the stage (exit 2)."""
    doc = rundir.read_run_config(Path(init))
    if doc["kind"] not in INIT_KINDS[stage]:
        raise InputError(f"--init {init}: a {doc['kind']} run; train {stage} starts from a "
                         f"{' or '.join(INIT_KINDS[stage])} run")
    return doc["config"]


def load_init(parts: Dict[str, dict], modules: Dict[str, nn.Module]) -> None:
    """Copy the states of :func:`read_init` into the freshly built modules (checked already)."""
    for name, module in modules.items():
        rundir.load_into(module, parts[name], f"--init ({name})")


def init_config(init: Path, train_from: PipelineConfig) -> PipelineConfig:
    """``train recon --init RUN``'s config: RUN's models, sampling and classes, the training
    settings of ``train_from`` (the preset or --config). A VAE directory relative to RUN (a
    converted run's ``vae/``) is recorded absolute so the new run finds it."""
    from ..models.vae import resolve_vae_source

    cfg = init_run_config(init, "recon")
    cfg = PipelineConfig.from_dict({**cfg.to_dict(), "train": train_from.to_dict()["train"]})
    if not cfg.vae.is_pixel:
        location, local = resolve_vae_source(cfg.vae.source, Path(init))
        if local:
            cfg.vae.source = str(Path(location).resolve())
    return cfg


# ----------------------------------------------------------------------------- a stage's config
def check_init(init: Optional[Path], resume: bool, **model_options) -> None:
    """--init takes the models from its run: options that would pick other models are exit 2."""
    if init is None:
        return
    if resume:
        raise InputError("--init starts a new run from another run's weights; --resume continues this one: pick one")
    given = [k for k, v in model_options.items() if v]
    if given:
        raise InputError(f"--init takes the models from {init}; drop {given[0]} (use --set for config keys)")


def recon_run_config(out: Path, overrides: dict, *, preset: str = DEFAULT_PRESET, config: Optional[Path] = None,
                     resume: bool = False, init: Optional[Path] = None, encoder: Optional[str] = None,
                     encoder_weights: Optional[str] = None, vae: Optional[str] = None) -> PipelineConfig:
    """The config ``train recon`` runs with, checked before any work: the run's own (``resume``),
    the ``init`` run's models with the training settings of ``preset`` / ``config``, or
    ``preset`` / ``config`` with ``encoder`` / ``vae`` swapped in; then the dotted ``overrides``."""
    from ..models.encoder import vit_width
    from ..run import resolve_config

    check_init(init, resume, **{"--encoder": encoder, "--encoder-weights": encoder_weights, "--vae": vae})
    check_run_output(out, resume)
    if resume and has_checkpoint(out):
        return resolve_config(ckpt=str(out), overrides=overrides)
    if init is not None:
        cfg = init_config(init, resolve_config(preset=preset, config=config))
    else:
        cfg = resolve_config(preset=preset, config=config)
        dim = vit_width(encoder) if encoder is not None and encoder != cfg.encoder.model else None
        cfg = with_vae(with_encoder(cfg, encoder, encoder_weights, dim), vae)
    return cfg.replace(**{k: v for k, v in overrides.items() if v is not None}).validate()

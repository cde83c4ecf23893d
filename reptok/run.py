"""The run-directory format: what a run folder holds and its strict, one-line-error loading.

A run directory holds::

    config.json        {"format": "reptok-run/1", "kind": ..., "pipeline": PipelineConfig,
                        "tokenizer_run": path or null, ...}
    model.safetensors  raw weights (the training state; what ``train --init`` starts from),
                       keys prefixed by component: encoder. decoder. generator.
    ema.safetensors    EMA weights, same keys (what inference uses); a text-to-image generator
                       run with a random ``tiny`` text tower also holds ``text_encoder.*``;
                       a converted official run holds only encoder. (the bf16-stored encode()
                       copy) and generator. (EMA) here, its decoder once in model.safetensors
    train_state.pt     optimizer, scheduler, step, RNG (resume only)
    vae/               a diffusers AutoencoderKL directory, when the VAE is not a hub id

``kind`` is "tokenizer" (stage a: encoder + decoder), "generator" (stage b: generator only,
``tokenizer_run`` points at the stage-a run) or "pipeline" (all components, e.g. converted
official weights). Every file is written atomically through ``reptok.io``; the pipeline
loader is ``Pipeline.from_run`` (``reptok/pipeline.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch

from . import provenance
from .config import PipelineConfig
from .errors import InputError
from .io import atomic_write_text, load_tensors, read_json, save_tensors
from .presets import get_preset

FORMAT = "reptok-run/1"
CONFIG = "config.json"
MODEL = "model.safetensors"
EMA = "ema.safetensors"
TRAIN_STATE = "train_state.pt"
COMPONENTS = ("encoder", "decoder", "generator")


# ----------------------------------------------------------------------------- run config
def write_run_config(run: Path, cfg: PipelineConfig, kind: str, **extra) -> None:
    """config.json; its ``provenance`` record is derived here from the links in ``extra``
    (``converted_from``, ``init``, ``distilled``, ``tokenizer_run``, ``attached_from``) unless
    ``extra`` carries one (a resumed run keeps the record it started with)."""
    doc = {"format": FORMAT, "kind": kind, "pipeline": cfg.to_dict(), **extra}
    if "provenance" not in extra:
        doc["provenance"] = provenance.derive(Path(run), doc)
    atomic_write_text(Path(run) / CONFIG, json.dumps(doc, indent=2, sort_keys=True) + "\n")


def read_run_config(run: Path) -> dict:
    run = Path(run)
    path = run / CONFIG if run.is_dir() else run
    if not path.exists():
        raise InputError(f"{run}: not a reptok run directory (no {CONFIG}); pass the folder written by 'reptok train' or 'reptok convert'")
    doc = read_json(path, "config")
    if doc.get("format") != FORMAT:
        raise InputError(f"{path}: unknown run format {doc.get('format')!r} (expected {FORMAT})")
    doc["config"] = PipelineConfig.from_dict(doc["pipeline"])
    return doc


def state_dict_of(modules: Dict[str, torch.nn.Module]) -> Dict[str, torch.Tensor]:
    out = {}
    for name, mod in modules.items():
        for k, v in mod.state_dict().items():
            out[f"{name}.{k}"] = v
    return out


def save_weights(run: Path, modules: Dict[str, torch.nn.Module], ema: Optional[Dict[str, torch.nn.Module]] = None) -> None:
    save_tensors(Path(run) / MODEL, state_dict_of(modules))
    if ema is not None:
        save_tensors(Path(run) / EMA, state_dict_of(ema))


# ----------------------------------------------------------------------------- strict loading
def check_state(module: torch.nn.Module, state: Dict[str, torch.Tensor], where: str) -> None:
    """InputError (one line naming the first bad key) unless ``state`` fits ``module`` exactly:
    same keys, same shapes. Works on meta-device modules (a check before any work)."""
    own = module.state_dict()
    for k, v in own.items():
        if k not in state:
            raise InputError(f"{where}: checkpoint does not match the config: missing key {k!r}")
        if tuple(state[k].shape) != tuple(v.shape):
            raise InputError(
                f"{where}: checkpoint does not match the config: {k!r} has shape {tuple(state[k].shape)}, "
                f"the model expects {tuple(v.shape)}"
            )
    extra = sorted(set(state) - set(own))
    if extra:
        raise InputError(f"{where}: checkpoint does not match the config: unexpected key {extra[0]!r}")


def load_into(module: torch.nn.Module, state: Dict[str, torch.Tensor], where: str, assign: bool = False) -> None:
    """Strict load that fails with one line naming the first bad key. ``assign``: the tensors
    become the module's (no copy; for modules built on the meta device), cast to the dtypes the
    module has, as a copy would (a bf16-stored file still gives fp32 parameters)."""
    check_state(module, state, where)
    if assign:
        own = module.state_dict(keep_vars=True)
        state = {k: v.to(own[k].dtype) for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=assign)


def read_weights(run: Path, use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """A run's weights: the EMA file (inference) when ``use_ema`` and it exists, else the raw file
    (training state). Components missing from the EMA file come from the raw one: a converted
    official run stores its decoder once (the release has no EMA decoder)."""
    run = Path(run)
    path = run / EMA if use_ema and (run / EMA).exists() else run / MODEL
    if not path.exists():
        raise InputError(f"{run}: no weights ({MODEL}) in the run directory")
    state = load_tensors(path)
    if path.name == EMA and (run / MODEL).exists():
        # A component without an EMA copy (a converted run's decoder) is stored once, in model.
        from safetensors import safe_open

        have = {k.split(".", 1)[0] for k in state}
        try:
            with safe_open(str(run / MODEL), "pt") as f:
                for k in f.keys():
                    if k.split(".", 1)[0] not in have:
                        state[k] = f.get_tensor(k)
        except Exception as e:
            raise InputError(f"{run / MODEL}: unreadable weights file ({e})") from None
    return state


def split_prefix(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}


def resolve_tokenizer_run(run: Path, doc: dict) -> Optional[Path]:
    """A generator run's tokenizer run: relative to the run (an exported folder's ``tokenizer/``),
    a path, or ``hf://OWNER/NAME`` (fetched like any Hub run)."""
    from .hub import is_hub_spec, resolve_run

    ref = doc.get("tokenizer_run")
    if not ref:
        return None
    if is_hub_spec(ref):
        return resolve_run(ref)
    for cand in (Path(run) / ref, Path(ref)):
        if (cand / CONFIG).exists():
            return cand.resolve()
    raise InputError(f"{run}: its tokenizer run {ref!r} is missing; move it back or edit tokenizer_run in {CONFIG}")


# ----------------------------------------------------------------------------- where a config comes from
def resolve_config(preset: Optional[str] = None, ckpt: Optional[str] = None, config: Optional[Path] = None,
                   overrides: Optional[dict] = None) -> PipelineConfig:
    """Start from a run's config, a --config JSON file or a preset, then apply dotted overrides."""
    if ckpt:
        cfg = read_run_config(Path(ckpt))["config"]
    elif config:
        doc = read_json(Path(config), "--config file")
        # A run's config.json ({"format": ..., "kind": ..., "pipeline": {...}}) is accepted too.
        if isinstance(doc, dict) and isinstance(doc.get("pipeline"), dict) and "format" in doc:
            doc = doc["pipeline"]
        cfg = PipelineConfig.from_dict(doc)
    else:
        try:
            cfg = get_preset(preset or "tiny")
        except KeyError as e:
            raise InputError(str(e.args[0])) from None
    if overrides:
        cfg = cfg.replace(**{k: v for k, v in overrides.items() if v is not None})
    return cfg.validate()

"""Config resolution shared by commands: preset / run config / --config file / --set overrides."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

from reptok.config import PipelineConfig
from reptok.errors import InputError


def parse_set(items: Optional[List[str]]) -> dict:
    """``--set decoder.depth=4`` -> {"decoder.depth": 4} (values parsed as JSON when possible)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise InputError(f"--set {item!r}: expected KEY=VALUE, e.g. --set decoder.depth=4")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def resolve_config(preset: Optional[str] = None, ckpt: Optional[str] = None, config: Optional[Path] = None,
                   overrides: Optional[dict] = None) -> PipelineConfig:
    """Start from a run's config, a --config JSON file or a preset, then apply dotted overrides."""
    from reptok import run as rundir
    from reptok.io import read_json
    from reptok.presets import get_preset

    if ckpt:
        cfg = rundir.read_run_config(Path(ckpt))["config"]
    elif config:
        cfg = PipelineConfig.from_dict(read_json(Path(config), "--config file"))
    else:
        try:
            cfg = get_preset(preset or "tiny")
        except KeyError as e:
            raise InputError(str(e.args[0])) from None
    if overrides:
        cfg = cfg.replace(**{k: v for k, v in overrides.items() if v is not None})
    return cfg.validate()

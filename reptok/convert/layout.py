"""The official checkpoint's layout: its state-dict prefixes (official-checkpoint-spec.md
section 7), reading the Lightning file safely, and the key tracker the component adapters take
tensors from (every source tensor must end up converted or deliberately ignored)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Union

import torch

from ..errors import InputError
from .safe_load import jsonable, safe_torch_load, to_plain

PathLike = Union[str, Path]

P_DINO = "first_stage.encoder.encoder."  # the DINO encode() runs (fine-tuned cls, bf16)
P_DEC = "first_stage.decoder.decoder."  # RepTokLatentRF2D
P_DINO_FP32 = P_DEC + "encoder.dino.model."  # the same DINO in fp32 (training copy)
P_DINO_TARGET = P_DEC + "encoder.dino.target_model."  # the original DINO (cosine target)
P_VAE = P_DEC + "ae.ae."
P_GEN_EMA = "ema_model.net."
P_GEN_RAW = "model.net."
P_METRICS = "metric_tracker."
COMPILED = "_orig_mod."


# ----------------------------------------------------------------------------- reading
@dataclass
class OfficialCheckpoint:
    path: Path
    state: Dict[str, torch.Tensor]
    hparams: dict
    meta: dict = field(default_factory=dict)


def read_official_checkpoint(path: PathLike) -> OfficialCheckpoint:
    """Load a Lightning checkpoint safely (no pickled code runs) and check its top level."""
    path = Path(path)
    ck = safe_torch_load(path)
    if not isinstance(ck, dict):
        raise InputError(f"{path}: not a Lightning checkpoint (the file holds a {type(ck).__name__}, not a dict)")
    state = ck.get("state_dict")
    if not isinstance(state, dict):
        what = "a bare state dict" if ck and all(isinstance(v, torch.Tensor) for v in ck.values()) else "no 'state_dict'"
        raise InputError(f"{path}: not a Lightning checkpoint ({what}); pass the official .ckpt file")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise InputError(f"{path}: state_dict entry {bad[0]!r} is not a tensor")
    if not any(k.startswith(P_DEC) for k in state):
        raise InputError(f"{path}: no '{P_DEC}*' tensors: not an official RepTok checkpoint")
    hp = to_plain(ck.get("hyper_parameters") or {})
    meta = {k: jsonable(to_plain(ck.get(k))) for k in ("epoch", "global_step", "pytorch-lightning_version", "hparams_name")
            if k in ck}
    return OfficialCheckpoint(path, dict(state), hp if isinstance(hp, dict) else {}, meta)


class Keys:
    """The source state dict with consumption tracking and one-line errors naming the key."""

    def __init__(self, state: Dict[str, torch.Tensor], name: str):
        self.state, self.name, self.used = state, name, set()

    def has(self, key: str) -> bool:
        return key in self.state

    def peek(self, key: str, what: str = "") -> torch.Tensor:
        if key not in self.state:
            raise InputError(f"{self.name}: missing key {key!r}{f' ({what})' if what else ''}")
        return self.state[key]

    def take(self, key: str, shape=None, what: str = "") -> torch.Tensor:
        t = self.peek(key, what)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise InputError(
                f"{self.name}: {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}"
                f"{f' ({what})' if what else ''}")
        self.used.add(key)
        return t

    def indices(self, pattern: str) -> List[int]:
        """Sorted integers captured by ``pattern`` (one group) over all keys; must be 0..n-1."""
        rx = re.compile(pattern)
        found = sorted({int(m.group(1)) for k in self.state for m in [rx.fullmatch(k)] if m})
        if found and found != list(range(len(found))):
            missing = sorted(set(range(found[-1] + 1)) - set(found))
            raise InputError(f"{self.name}: keys matching {pattern!r} skip index {missing[0]}")
        return found


def ratio(num: int, den: int, key: str, name: str, what: str) -> int:
    if den <= 0 or num % den:
        raise InputError(f"{name}: {key!r}: {num} rows is not a multiple of {den} ({what})")
    return num // den


def dig(d: dict, *path, default=None):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d

"""The generator adapter: the official token generator (compiled or not, EMA or raw) -> our
TokenGenerator, and the time sampler of its hyper-parameters."""

from __future__ import annotations

import re
from typing import Dict, List, Tuple

import torch

from ..config import GeneratorConfig
from ..errors import InputError
from .layout import COMPILED, Keys, dig

# ----------------------------------------------------------------------------- generator
def convert_generator(src: Keys, *, prefix: str, hp: dict, token_dim: int, scale_factor: float
                       ) -> Tuple[GeneratorConfig, Dict[str, torch.Tensor]]:
    from ..models.generator import TokenGenerator

    n = src.name

    def key(ours: str) -> str:  # our name -> the checkpoint's (compiled mixer or not)
        if ours.startswith("mixer."):
            compiled = prefix + "mixer." + COMPILED + ours[len("mixer."):]
            if src.has(compiled) or not src.has(prefix + ours):
                return compiled
        return prefix + ours

    pos = src.peek(prefix + "pos_embed", "generator")
    if pos.dim() != 3 or pos.shape[0] != 1:
        raise InputError(f"{n}: {prefix + 'pos_embed'!r} has shape {tuple(pos.shape)}, expected (1, n_tokens, D)")
    n_tokens, tdim = int(pos.shape[1]), int(pos.shape[2])
    if tdim != token_dim:
        raise InputError(f"{n}: generator token width {tdim} ({prefix + 'pos_embed'!r}) != encoder width {token_dim}")
    dim = int(src.peek(key("mixer.0.weight"), "generator").shape[0])
    depth = 0  # mixer.{1..depth} are the blocks
    while src.has(key(f"mixer.{depth + 1}.0.fn.0.weight")):
        depth += 1
    if depth == 0:
        raise InputError(f"{n}: missing key {key('mixer.1.0.fn.0.weight')!r} (generator)")
    k_tok, k_ch = key("mixer.1.0.fn.0.weight"), key("mixer.1.1.fn.0.weight")
    tok_rows, seq = (int(s) for s in src.peek(k_tok).shape[:2])
    ch_rows = int(src.peek(k_ch, "generator").shape[0])
    k_tab = prefix + "label_embedder.embedding_table.weight"
    net = dig(hp, "flow_cfg", "params", "net_cfg", "params", default={}) or {}
    if src.has(k_tab):
        rows = int(src.peek(k_tab).shape[0])
        num_classes = int(net.get("num_classes", rows - 1))
        drop = float(net.get("class_dropout_prob", 0.1))
        if rows != num_classes + int(drop > 0):
            raise InputError(f"{n}: {k_tab!r} has {rows} rows; hyper-parameters say num_classes={num_classes}, "
                             f"class_dropout_prob={drop}")
    else:
        num_classes, drop = 0, 0.0
    expect_seq = n_tokens + (1 if num_classes > 0 else 0) + 1
    if seq != expect_seq:
        raise InputError(f"{n}: {k_tok!r} mixes {seq} tokens, expected {expect_seq} = data + class + time "
                         "(extra concat tokens are not supported)")

    def expansion(given, rows: int, base: int, k: str) -> float:
        if given is not None and int(base * float(given)) == rows:
            return float(given)
        e = rows / base
        if int(base * e) != rows:
            raise InputError(f"{n}: {k!r}: {rows} rows is not int({base} x expansion) for any expansion")
        return e

    token_expand = expansion(net.get("expansion_factor"), tok_rows, seq, k_tok)
    channel_expand = expansion(net.get("expansion_factor_token"), ch_rows, dim, k_ch)
    cfg = GeneratorConfig(token_dim=tdim, n_tokens=n_tokens, dim=dim, depth=depth, token_expand=token_expand,
                          channel_expand=channel_expand, dropout=float(net.get("dropout", 0.0) or 0.0),
                          num_classes=num_classes, class_dropout=drop)
    with torch.device("meta"):
        gen = TokenGenerator(cfg)
    out = {}
    for k, v in gen.state_dict().items():
        if k in ("token_mean", "token_std"):
            continue
        out[k] = src.take(key(k), tuple(v.shape), "generator")
    out["token_mean"] = torch.zeros(tdim)
    out["token_std"] = torch.full((tdim,), float(scale_factor))
    return cfg, out


def time_sampler(hp: dict, notes: List[str]) -> Tuple[str, float, float]:
    """The generator's training time sampler from ``flow_cfg.params.timestep_sampler``: absent /
    None -> U(0, 1) (FlowModel's default), ``LogitNormalSampler(loc, scale)`` -> logit_normal."""
    ts = dig(hp, "flow_cfg", "params", "timestep_sampler")
    if not ts:
        return "uniform", 0.0, 1.0
    target = str(ts.get("target", "")) if isinstance(ts, dict) else str(ts)
    params = (ts.get("params") or {}) if isinstance(ts, dict) else {}
    if target.endswith("LogitNormalSampler"):
        return "logit_normal", float(params.get("loc", 0.0)), float(params.get("scale", 1.0))
    if target.endswith("UniformSampler"):
        return "uniform", 0.0, 1.0
    notes.append(f"unknown flow_cfg timestep_sampler {target!r}: generator.time_sampler = uniform "
                 "(matters only for further training)")
    return "uniform", 0.0, 1.0

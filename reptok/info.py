"""Parameter counts and forward FLOPs per component, computed on the meta device (no memory,
no downloads), for ``reptok info`` and ``benchmarks/models.py``."""

from __future__ import annotations

import copy
from typing import List

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import PipelineConfig
from .models.vae import SD_VAE_CONFIG



def _count(m: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable_only)


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


ALL = ("encoder", "decoder", "generator", "vae")


def build_meta(cfg: PipelineConfig, components=ALL):
    """The ``components`` of ``cfg`` on the meta device (random-init encoder, SD-VAE-sized VAE)."""
    from .models.decoder import FlowDecoder
    from .models.encoder import SSLEncoder
    from .models import build_generator

    ecfg = copy.deepcopy(cfg.encoder)
    ecfg.weights = "random"  # sizes only: never download for a report
    with torch.device("meta"):
        out = {}
        if "encoder" in components:
            out["encoder"] = SSLEncoder(ecfg)
        if "decoder" in components:
            out["decoder"] = FlowDecoder(cfg.decoder)
        if cfg.generator is not None and "generator" in components:
            out["generator"] = build_generator(cfg.generator)
        if not cfg.vae.is_pixel and "vae" in components:
            from diffusers import AutoencoderKL

            out["vae"] = AutoencoderKL(**SD_VAE_CONFIG)
    return out


def model_report(cfg: PipelineConfig, components=ALL) -> List[dict]:
    """Rows of {component, params, trainable, gflops (per image per network call), note}, one
    per component of ``components`` that ``cfg`` has."""
    m = build_meta(cfg, components)
    b = 1
    rows = []
    img = torch.empty(b, 3, cfg.image_size, cfg.image_size, device="meta")
    d = cfg.decoder
    if "encoder" in m:
        enc = m["encoder"]
        rows.append(dict(component="encoder", params=_count(enc), trainable=_count(enc, True),
                         gflops=_flops(lambda: enc(img)) / 1e9, note=f"{cfg.encoder.model}, once per image"))
    t = torch.empty(b, device="meta")
    if "decoder" in m:
        dec = m["decoder"]
        x = torch.empty(b, d.in_channels, d.input_size, d.input_size, device="meta")
        z = torch.empty(b, d.token_dim, device="meta")
        rows.append(dict(component="decoder", params=_count(dec), trainable=_count(dec, True),
                         gflops=_flops(lambda: dec(x, t, z)) / 1e9,
                         note=f"per step; x{cfg.sampling.decoder_steps} steps per image"))
    if "generator" in m:
        g = m["generator"]
        gc = cfg.generator
        xg = torch.empty(b, gc.n_tokens, gc.token_dim, device="meta")
        if getattr(g, "text_conditioned", False):  # text hidden states stand in for the label
            cond = (torch.empty(b, max(gc.text_len, 1), max(gc.text_dim, 1), device="meta"),)
        else:
            cond = (torch.zeros(b, dtype=torch.long, device="meta"),)
        rows.append(dict(component="generator", params=_count(g), trainable=_count(g, True),
                         gflops=_flops(lambda: g(xg, t, *cond)) / 1e9, note=f"per NFE; {cfg.sampling.steps} steps (+CFG)"))
    if "vae" in m:
        v = m["vae"]
        lat = torch.empty(b, cfg.vae.latent_channels, d.input_size, d.input_size, device="meta")
        rows.append(dict(component="vae", params=_count(v), trainable=0,
                         gflops=_flops(lambda: v.decode(lat)) / 1e9, note="decode, once per image"))
    return rows

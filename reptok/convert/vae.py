"""The VAE adapter: the official (legacy diffusers naming) AutoencoderKL tensors -> a diffusers
AutoencoderKL, its config read from a file or inferred from the tensors."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from ..errors import InputError
from ..io import read_json
from ..models.vae import SD_VAE_CONFIG
from .layout import P_VAE, Keys

PathLike = Union[str, Path]


# ----------------------------------------------------------------------------- VAE
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def vae_source_key(src: Keys, ours: str) -> str:
    """Our diffusers key -> the checkpoint key (current names, or the pre-0.14 attention names)."""
    if src.has(P_VAE + ours):
        return P_VAE + ours
    for old, new in _LEGACY_ATTN.items():
        if f".{new}." in ours:
            cand = P_VAE + ours.replace(f".{new}.", f".{old}.")
            if src.has(cand):
                return cand
    return P_VAE + ours


def read_vae_config(path: PathLike) -> dict:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise InputError(f"--vae-config {path}: no diffusers config.json there")
    return read_json(p, "--vae-config file")


def infer_vae_config(src: Keys, norm_groups: Optional[int]) -> dict:
    n = src.name
    blocks = src.indices(re.escape(P_VAE) + r"encoder\.down_blocks\.(\d+)\.resnets\.0\.conv1\.weight")
    if not blocks:
        raise InputError(f"{n}: missing key {P_VAE + 'encoder.down_blocks.0.resnets.0.conv1.weight'!r} (VAE)")
    widths = [int(src.peek(P_VAE + f"encoder.down_blocks.{i}.resnets.0.conv2.weight").shape[0]) for i in blocks]
    layers = len(src.indices(re.escape(P_VAE) + r"encoder\.down_blocks\.0\.resnets\.(\d+)\.conv1\.weight"))
    latent = int(src.peek(P_VAE + "decoder.conv_in.weight", "VAE").shape[1])
    cfg = dict(copy.deepcopy(SD_VAE_CONFIG))
    cfg.update(
        in_channels=int(src.peek(P_VAE + "encoder.conv_in.weight", "VAE").shape[1]),
        out_channels=int(src.peek(P_VAE + "decoder.conv_out.weight", "VAE").shape[0]),
        latent_channels=latent, layers_per_block=layers, block_out_channels=widths,
        down_block_types=["DownEncoderBlock2D"] * len(widths), up_block_types=["UpDecoderBlock2D"] * len(widths),
        use_quant_conv=src.has(P_VAE + "quant_conv.weight"),
        use_post_quant_conv=src.has(P_VAE + "post_quant_conv.weight"),
        mid_block_add_attention=any(k.startswith(P_VAE + "encoder.mid_block.attentions.") for k in src.state),
    )
    groups = norm_groups if norm_groups is not None else cfg["norm_num_groups"]
    if any(w % groups for w in widths):
        raise InputError(f"VAE: {groups} norm groups do not divide its widths {widths} (group counts are not stored "
                         "in the tensors); pass --vae-config DIR (a diffusers config.json) or --vae-norm-groups N")
    cfg["norm_num_groups"] = groups
    return cfg


def convert_vae(src: Keys, *, vae_config: Optional[PathLike], norm_groups: Optional[int], image_size: int
                 ) -> Tuple["torch.nn.Module", Dict[str, torch.Tensor]]:
    """-> (the AutoencoderKL on the meta device, for its config; its state dict from the checkpoint)."""
    from diffusers import AutoencoderKL

    if vae_config is not None:
        raw = read_vae_config(vae_config)
        cfg = {k: v for k, v in raw.items() if not k.startswith("_")}
        if norm_groups is not None:
            cfg["norm_num_groups"] = norm_groups
    else:
        cfg = infer_vae_config(src, norm_groups)
    cfg["sample_size"] = image_size
    try:
        init, unused = AutoencoderKL.extract_init_dict(cfg)[:2]
    except Exception as e:
        raise InputError(f"VAE config: {str(e).splitlines()[0]}") from None
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            vae = AutoencoderKL(**init)
    except Exception as e:
        raise InputError(f"VAE config cannot be built: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    out = {}
    for k, v in vae.state_dict().items():
        t = src.take(vae_source_key(src, k), None, "VAE")
        if t.dim() == 4 and v.dim() == 2 and t.shape[2:] == (1, 1):  # legacy 1x1-conv attention weights
            t = t[:, :, 0, 0]
        if tuple(t.shape) != tuple(v.shape):
            raise InputError(f"{src.name}: {vae_source_key(src, k)!r} has shape {tuple(t.shape)}, expected "
                             f"{tuple(v.shape)} (VAE config: {'--vae-config' if vae_config else 'inferred'})")
        out[k] = t
    return vae, out

"""The decoder adapter: the official RepTokLatentRF2D -> our FlowDecoder, by
``keymaps.decoder_key_map`` (a one-to-one renaming)."""

from __future__ import annotations

import math
import re
from typing import Dict, Tuple

import torch

from ..config import DecoderConfig
from ..errors import InputError
from .layout import P_DEC, Keys, ratio

# ----------------------------------------------------------------------------- decoder
def convert_decoder(src: Keys, *, latent_channels: int, input_size: int, token_dim: int
                     ) -> Tuple[DecoderConfig, Dict[str, torch.Tensor]]:
    from ..models.decoder import FlowDecoder
    from .keymaps import decoder_key_map

    n = src.name
    width = int(src.peek(P_DEC + "backbone.mid_merge.proj.weight", "decoder").shape[0])
    depth = len(src.indices(re.escape(P_DEC) + r"backbone\.mid_level\.(\d+)\.self_attn\.scale"))
    if depth == 0:
        raise InputError(f"{n}: missing key {P_DEC + 'backbone.mid_level.0.self_attn.scale'!r} (decoder)")
    k_scale = P_DEC + "backbone.mid_level.0.self_attn.scale"
    heads = int(src.peek(k_scale).shape[0])
    if heads <= 0 or width % heads:
        raise InputError(f"{n}: {k_scale!r}: {heads} heads do not divide the decoder width {width}")
    head_dim = width // heads
    if head_dim % 8:
        raise InputError(f"{n}: {k_scale!r}: head size {head_dim} is not a multiple of 8 (axial RoPE)")
    k_up = P_DEC + "backbone.mid_level.0.ff.up_proj.weight"
    ff_expand = ratio(int(src.peek(k_up).shape[0]), 2 * width, k_up, n, "2 x width x ff_expand")
    k_t = P_DEC + "time_in_proj.weight"
    mwidth = int(src.peek(k_t, "decoder").shape[0])
    mdepth = len(src.indices(re.escape(P_DEC) + r"mapping\.blocks\.(\d+)\.norm\.scale"))
    k_mup = P_DEC + "mapping.blocks.0.up_proj.weight"
    m_ff = ratio(int(src.peek(k_mup, "decoder").shape[0]), 2 * mwidth, k_mup, n, "2 x mapping width x ff_expand") \
        if mdepth else 3
    k_pin = P_DEC + "backbone.mid_merge.pre_proj.proj.weight"
    pin = int(src.peek(k_pin, "decoder").shape[1])
    patch = math.isqrt(max(pin // max(latent_channels, 1), 0))
    if patch * patch * latent_channels != pin:
        raise InputError(f"{n}: {k_pin!r} takes {pin} inputs, not p*p*{latent_channels} (latent channels)")
    if input_size % patch:
        raise InputError(f"latent size {input_size} is not divisible by the decoder patch size {patch}")
    cfg = DecoderConfig(in_channels=latent_channels, input_size=input_size, patch_size=patch, width=width, depth=depth,
                        head_dim=head_dim, ff_expand=ff_expand, mapping_width=mwidth, mapping_depth=mdepth,
                        mapping_ff_expand=m_ff, token_dim=token_dim)
    with torch.device("meta"):
        dec = FlowDecoder(cfg)
    own = {k: tuple(v.shape) for k, v in dec.state_dict().items()}
    kmap = decoder_key_map(depth, mdepth)
    if set(kmap) != set(own):
        diff = sorted(set(kmap) ^ set(own))
        raise RuntimeError(f"internal: decoder_key_map and FlowDecoder disagree on {diff[0]!r}")
    out = {k: src.take(P_DEC + kmap[k], own[k], "decoder") for k in own}
    return cfg, out

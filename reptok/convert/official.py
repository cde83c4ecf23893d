"""``reptok convert official``: the authors' Lightning checkpoint -> a reptok run directory.

This module (with ``keymaps.py``) is the only place that knows the official
key names (official-checkpoint-spec.md sections 1.5-1.6, 3.8, 5, 6, 7.3)::

    first_stage.encoder.encoder.*                      DINOv2 with the fine-tuned cls token, the
                                                       copy encode() runs (bf16 in the release)
                                                       -> ema.safetensors encoder.vit.* (timm naming)
    first_stage.decoder.decoder.encoder.dino.model.*   the same DINO in fp32, the copy training
                                                       conditions the decoder on
                                                       -> model.safetensors encoder.vit.*
    first_stage.decoder.decoder.encoder.dino.target_model.{cls_token,pos_embed}
                                                       -> encoder.cls_token_frozen (cls + pos[:, 0]),
                                                       the cosine target (both files)
    first_stage.decoder.decoder.{backbone,time_emb,time_in_proj,mapping,encoder.dino.{temp_pos_embed,
        new_reg,backbone}}.*                           -> model.safetensors decoder.* (decoder_key_map)
    first_stage.decoder.decoder.ae.ae.*                -> vae/ (a diffusers AutoencoderKL directory)
    ema_model.net.* (default) or model.net.* (--raw)   -> ema.safetensors generator.* (sampling)
    model.net.*                                        -> model.safetensors generator.* (training)

So the run reads like every reptok run: ``ema.safetensors`` is what inference (encode, extract,
sample, reconstruct, export) uses, exactly the official encode()/sampling weights;
``model.safetensors`` is the training state ``train recon|gen --init`` continues, exactly the
official training module's. The decoder exists once (the release has no EMA decoder):
``run.read_weights`` takes components missing from the EMA file from the raw one.

Deliberately ignored (counted in ``conversion.json``): ``...dino.target_model.*`` except its
cls token / pos embed (identical to the fp32 copy otherwise, which is checked and reported in
``dino_target``), the ``mask_token`` of each DINO copy (unused), ``metric_tracker.*`` (FID
Inception), and with ``--raw`` the EMA generator. Any other key is an error, as is a missing key
or a shape that does not match the inferred architecture: one-line ``InputError`` (exit code 2).

The written ``config.json`` says ``encoder.weights = "random"``: the encoder is *constructed*
with a seeded random init (no hub access) and ``Pipeline.from_run`` then overwrites every one of its
tensors from the run's weights, like every other component. The generator space is the
official ``cls / scale_factor`` (``token_norm = "scalar"``, buffers mean 0 and std
scale_factor); the generator's training time sampler comes from ``flow_cfg``.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from ..choices import DTYPES
from ..config import (
    DecoderConfig,
    EncoderConfig,
    GeneratorConfig,
    PipelineConfig,
    SamplingConfig,
    VAEConfig,
)
from ..errors import InputError
from ..io import file_sha256, atomic_dir, atomic_write_text, read_json
from ..models.vae import SD_VAE_CONFIG
from .safe_load import jsonable, safe_torch_load, to_plain

PathLike = Union[str, Path]

# ----------------------------------------------------------------------------- official names
P_DINO = "first_stage.encoder.encoder."  # the DINO encode() runs (fine-tuned cls, bf16)
P_DEC = "first_stage.decoder.decoder."  # RepTokLatentRF2D
P_DINO_FP32 = P_DEC + "encoder.dino.model."  # the same DINO in fp32 (training copy)
P_DINO_TARGET = P_DEC + "encoder.dino.target_model."  # the original DINO (cosine target)
P_VAE = P_DEC + "ae.ae."
P_GEN_EMA = "ema_model.net."
P_GEN_RAW = "model.net."
P_METRICS = "metric_tracker."
COMPILED = "_orig_mod."

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CONVERSION = "conversion.json"
VAE_DIR = "vae"


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


class _Keys:
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


def _ratio(num: int, den: int, key: str, name: str, what: str) -> int:
    if den <= 0 or num % den:
        raise InputError(f"{name}: {key!r}: {num} rows is not a multiple of {den} ({what})")
    return num // den


def _dig(d: dict, *path, default=None):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


# ----------------------------------------------------------------------------- encoder
def _convert_encoder(src: _Keys, *, heads: Optional[int], patch: Optional[int], img_size: int, model: str,
                     notes: List[str], prefix: str = P_DINO) -> Tuple[EncoderConfig, Dict[str, torch.Tensor]]:
    """DINOv2 (hub naming) -> our SSLEncoder over timm (spec 1.6): cls folded with pos[:, 0],
    register_tokens -> reg_token, pos_embed[:, 1:] resampled to the model grid (timm's bicubic,
    antialias, float32 — DINOv2's own per-forward interpolation), mask_token dropped.
    ``prefix``: the DINO copy to convert (``P_DINO``, the encode() copy, or ``P_DINO_FP32``, the
    fp32 training copy); ``cls_token_frozen`` comes from ``target_model`` for both."""
    import timm
    from timm.layers import resample_abs_pos_embed

    from ..models.encoder import SSLEncoder

    n = src.name
    cls = src.peek(prefix + "cls_token", "encoder")
    if cls.dim() != 3 or cls.shape[:2] != (1, 1):
        raise InputError(f"{n}: {prefix + 'cls_token'!r} has shape {tuple(cls.shape)}, expected (1, 1, D)")
    dim = int(cls.shape[-1])
    depth = len(src.indices(re.escape(prefix) + r"blocks\.(\d+)\.norm1\.weight"))
    if depth == 0:
        raise InputError(f"{n}: missing key {prefix + 'blocks.0.norm1.weight'!r} (encoder)")
    pw = src.peek(prefix + "patch_embed.proj.weight", "encoder")
    if pw.dim() != 4 or pw.shape[-1] != pw.shape[-2]:
        raise InputError(f"{n}: {prefix + 'patch_embed.proj.weight'!r} has shape {tuple(pw.shape)}, expected (D, 3, p, p)")
    p = int(pw.shape[-1])
    if patch is not None and patch != p:
        raise InputError(f"--encoder-patch {patch}: the checkpoint's patch embedding has patch size {p}")
    n_reg = int(src.peek(prefix + "register_tokens", "encoder").shape[1])
    hidden = int(src.peek(prefix + "blocks.0.mlp.fc1.weight", "encoder").shape[0])
    heads = heads if heads is not None else max(dim // 64, 1)
    if heads <= 0 or dim % heads:
        raise InputError(f"--encoder-heads {heads}: does not divide the encoder width {dim}")
    pos = src.peek(prefix + "pos_embed", "encoder")
    old_grid = math.isqrt(max(int(pos.shape[1]) - 1, 0))
    if pos.dim() != 3 or old_grid * old_grid + 1 != pos.shape[1] or pos.shape[2] != dim:
        raise InputError(f"{n}: {prefix + 'pos_embed'!r} has shape {tuple(pos.shape)}, expected (1, 1 + g*g, {dim})")
    if img_size % p:
        raise InputError(f"--encoder-img-size {img_size} is not a multiple of the patch size {p}")
    grid = img_size // p

    # Overrides relative to the named timm architecture (none for the released ViT-B/14-reg4).
    try:
        with torch.device("meta"):
            ref = timm.create_model(model, pretrained=False, num_classes=0, img_size=img_size)
    except Exception as e:  # timm raises RuntimeError for unknown names
        raise InputError(f"--encoder-model {model!r}: cannot build it with timm ({str(e).splitlines()[0]})") from None
    ov = {}
    if ref.embed_dim != dim:
        ov["embed_dim"] = dim
    if len(ref.blocks) != depth:
        ov["depth"] = depth
    if ref.blocks[0].attn.num_heads != heads:
        ov["num_heads"] = heads
    if tuple(ref.patch_embed.patch_size) != (p, p):
        ov["patch_size"] = p
    ratio, ref_ratio = hidden / dim, ref.blocks[0].mlp.fc1.out_features / ref.embed_dim
    if int(dim * ratio) != hidden:
        raise InputError(f"{n}: encoder MLP width {hidden} is not int({dim} x mlp_ratio) for any ratio")
    if ratio != ref_ratio:
        ov["mlp_ratio"] = ratio
    if getattr(ref, "num_reg_tokens", 0) != n_reg:
        ov["reg_tokens"] = n_reg
    if not getattr(ref, "no_embed_class", False):
        ov["no_embed_class"] = True
    if not hasattr(ref.blocks[0].ls1, "gamma"):
        ov["init_values"] = 1e-5
    cfg = EncoderConfig(model=model, weights="random", img_size=img_size, dim=dim, overrides=ov,
                        mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    try:
        with torch.device("meta"):
            enc = SSLEncoder(cfg)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot build encoder {model!r} with {ov}: {str(e).splitlines()[0]}") from None
    own = {k: tuple(v.shape) for k, v in enc.state_dict().items()}

    f32 = torch.float32
    pos32 = src.take(prefix + "pos_embed", (1, old_grid * old_grid + 1, dim)).to(f32)
    out: Dict[str, torch.Tensor] = {}
    for k, shape in own.items():
        if not k.startswith("vit."):
            continue
        name = k[len("vit."):]
        if name == "cls_token":
            t = src.take(prefix + "cls_token", (1, 1, dim)).to(f32) + pos32[:, :1]
        elif name == "reg_token":
            t = src.take(prefix + "register_tokens", shape).to(f32)
        elif name == "pos_embed":
            t = resample_abs_pos_embed(pos32[:, 1:], new_size=(grid, grid), old_size=(old_grid, old_grid),
                                       num_prefix_tokens=0, interpolation="bicubic", antialias=True)
        else:
            t = src.take(prefix + name, shape, "encoder").to(f32)
        if tuple(t.shape) != shape:
            raise InputError(f"{n}: encoder tensor {name!r} converts to shape {tuple(t.shape)}, the model expects {shape}")
        out[k] = t

    # The original (frozen) cls token, folded the same way: the cosine anchor's target.
    tc, tp = P_DINO_TARGET + "cls_token", P_DINO_TARGET + "pos_embed"
    if src.has(tc) and src.has(tp):
        out["cls_token_frozen"] = (src.take(tc, (1, 1, dim)).to(f32)
                                   + src.take(tp, tuple(pos32.shape)).to(f32)[:, :1])
    else:
        out["cls_token_frozen"] = out["vit.cls_token"].clone()
        notes.append("no target_model cls token: encoder.cls_token_frozen = the fine-tuned token "
                     "(matters only for further training)")
    missing = sorted(set(own) - set(out))
    if missing:
        raise RuntimeError(f"internal: encoder key {missing[0]!r} not produced")
    return cfg, out


def _compare_dino_copies(src: _Keys) -> dict:
    """The fp32 DINO inside the decoder vs the encode() copy: max |diff| and whether the encode
    copy is exactly the fp32 one rounded to its dtype."""
    pairs = [(k, P_DINO + k[len(P_DINO_FP32):]) for k in src.state if k.startswith(P_DINO_FP32)]
    if not pairs:
        return {"present": False}
    max_diff, exact, missing = 0.0, True, []
    for k32, kenc in pairs:
        if kenc not in src.state:
            missing.append(kenc)
            continue
        a, b = src.state[k32], src.state[kenc]
        if a.shape != b.shape:
            exact = False
            continue
        max_diff = max(max_diff, float((a.float() - b.float()).abs().max()) if a.numel() else 0.0)
        exact = exact and torch.equal(a.to(b.dtype), b)
    return {"present": True, "tensors": len(pairs), "max_abs_diff": max_diff,
            "encode_copy_dtype": str(src.state[P_DINO + "cls_token"].dtype).replace("torch.", "")
            if P_DINO + "cls_token" in src.state else None,
            "equal_up_to_rounding": exact and not missing}


def _compare_target(src: _Keys) -> dict:
    """The frozen target DINO vs the fp32 fine-tuned one: which tensors differ besides cls_token
    (the converted encoder has one backbone and keeps only the target's folded cls token)."""
    names = [k[len(P_DINO_TARGET):] for k in src.state if k.startswith(P_DINO_TARGET)]
    if not names or not all(src.has(P_DINO_FP32 + k) for k in names):
        return {"present": bool(names), "compared": False}
    differing, max_diff = [], 0.0
    for k in names:
        if k == "cls_token":
            continue
        a, b = src.state[P_DINO_TARGET + k], src.state[P_DINO_FP32 + k]
        if a.shape != b.shape or not torch.equal(a, b):
            differing.append(k)
            if a.shape == b.shape and a.numel():
                max_diff = max(max_diff, float((a.float() - b.float()).abs().max()))
    return {"present": True, "compared": True, "differs_only_in_cls_token": not differing,
            "differing": differing, "max_abs_diff_besides_cls_token": max_diff}


# ----------------------------------------------------------------------------- decoder
def _convert_decoder(src: _Keys, *, latent_channels: int, input_size: int, token_dim: int
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
    ff_expand = _ratio(int(src.peek(k_up).shape[0]), 2 * width, k_up, n, "2 x width x ff_expand")
    k_t = P_DEC + "time_in_proj.weight"
    mwidth = int(src.peek(k_t, "decoder").shape[0])
    mdepth = len(src.indices(re.escape(P_DEC) + r"mapping\.blocks\.(\d+)\.norm\.scale"))
    k_mup = P_DEC + "mapping.blocks.0.up_proj.weight"
    m_ff = _ratio(int(src.peek(k_mup, "decoder").shape[0]), 2 * mwidth, k_mup, n, "2 x mapping width x ff_expand") \
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


# ----------------------------------------------------------------------------- VAE
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _vae_source_key(src: _Keys, ours: str) -> str:
    """Our diffusers key -> the checkpoint key (current names, or the pre-0.14 attention names)."""
    if src.has(P_VAE + ours):
        return P_VAE + ours
    for old, new in _LEGACY_ATTN.items():
        if f".{new}." in ours:
            cand = P_VAE + ours.replace(f".{new}.", f".{old}.")
            if src.has(cand):
                return cand
    return P_VAE + ours


def _read_vae_config(path: PathLike) -> dict:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise InputError(f"--vae-config {path}: no diffusers config.json there")
    return read_json(p, "--vae-config file")


def _infer_vae_config(src: _Keys, norm_groups: Optional[int]) -> dict:
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


def _convert_vae(src: _Keys, *, vae_config: Optional[PathLike], norm_groups: Optional[int], image_size: int
                 ) -> Tuple["torch.nn.Module", Dict[str, torch.Tensor]]:
    """-> (the AutoencoderKL on the meta device, for its config; its state dict from the checkpoint)."""
    from diffusers import AutoencoderKL

    if vae_config is not None:
        raw = _read_vae_config(vae_config)
        cfg = {k: v for k, v in raw.items() if not k.startswith("_")}
        if norm_groups is not None:
            cfg["norm_num_groups"] = norm_groups
    else:
        cfg = _infer_vae_config(src, norm_groups)
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
        t = src.take(_vae_source_key(src, k), None, "VAE")
        if t.dim() == 4 and v.dim() == 2 and t.shape[2:] == (1, 1):  # legacy 1x1-conv attention weights
            t = t[:, :, 0, 0]
        if tuple(t.shape) != tuple(v.shape):
            raise InputError(f"{src.name}: {_vae_source_key(src, k)!r} has shape {tuple(t.shape)}, expected "
                             f"{tuple(v.shape)} (VAE config: {'--vae-config' if vae_config else 'inferred'})")
        out[k] = t
    return vae, out


# ----------------------------------------------------------------------------- generator
def _convert_generator(src: _Keys, *, prefix: str, hp: dict, token_dim: int, scale_factor: float
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
    net = _dig(hp, "flow_cfg", "params", "net_cfg", "params", default={}) or {}
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


def _time_sampler(hp: dict, notes: List[str]) -> Tuple[str, float, float]:
    """The generator's training time sampler from ``flow_cfg.params.timestep_sampler``: absent /
    None -> U(0, 1) (FlowModel's default), ``LogitNormalSampler(loc, scale)`` -> logit_normal."""
    ts = _dig(hp, "flow_cfg", "params", "timestep_sampler")
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


# ----------------------------------------------------------------------------- bookkeeping
def _ignored_group(key: str, unused_gen: Optional[str]) -> Optional[str]:
    if key.startswith(P_METRICS):
        return "metric_tracker"
    if key.startswith(P_DINO_TARGET):
        return "dino_target_model"
    if key in (P_DINO + "mask_token", P_DINO_FP32 + "mask_token"):
        return "dino_mask_token"
    if key.startswith(P_DINO_FP32):
        return "dino_fp32_copy"
    if unused_gen is not None and key.startswith(unused_gen):
        return "generator_raw" if unused_gen == P_GEN_RAW else "generator_ema"
    return None


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise InputError(f"--out {out}: exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise InputError(f"--out {out}: directory exists and is not empty; pass --overwrite to replace it")


def _materialise(tensors: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Own, contiguous copies in the output dtype (the sources may be views of the mmap'd file)."""
    return {k: v.detach().to(dtype=dtype, copy=True).contiguous() for k, v in tensors.items()}


# ----------------------------------------------------------------------------- the converter
def _scale_factor(hp: dict, name: str, notes: List[str]) -> float:
    """The VAE-latent -> token scale of the hyper-parameters (1.0, noted, when absent)."""
    scale_factor = _dig(hp, "first_stage_cfg", "params", "scale_factor")
    if scale_factor is None:
        scale_factor = 1.0
        notes.append("no first_stage_cfg.params.scale_factor in the hyper-parameters: token_std = 1.0")
    scale_factor = float(scale_factor)
    if not scale_factor > 0:
        raise InputError(f"{name}: scale_factor {scale_factor} must be positive")
    return scale_factor


def _encoders(src: "_Keys", enc_opts: dict, notes: List[str]):
    """The encode() copy (inference) and the fp32 fine-tuned copy the decoder was trained on
    (training; the encode() copy when absent), with the two comparisons the summary reports."""
    ecfg, enc = _convert_encoder(src, notes=notes, **enc_opts)
    dino_cmp = _compare_dino_copies(src)
    if dino_cmp.get("present"):
        ecfg32, enc_train = _convert_encoder(src, notes=[], prefix=P_DINO_FP32, **enc_opts)
        if ecfg32 != ecfg:
            raise InputError(f"{src.name}: the fp32 DINO copy ({P_DINO_FP32}*) has another architecture than "
                             f"the encode() copy ({P_DINO}*)")
        if not dino_cmp["equal_up_to_rounding"]:
            notes.append(f"the fp32 DINO copy ({P_DINO_FP32}*) differs from the encode() copy beyond rounding "
                         f"(max |diff| {dino_cmp['max_abs_diff']:.3g}); inference uses the encode() copy, "
                         "training (--init) the fp32 copy")
    else:
        enc_train = enc
        notes.append(f"no fp32 DINO copy ({P_DINO_FP32}*): training from this run (--init) uses the encode() copy")
    target_cmp = _compare_target(src)
    if target_cmp.get("compared") and not target_cmp["differs_only_in_cls_token"]:
        notes.append(f"the target DINO ({P_DINO_TARGET}*) differs from the fine-tuned one in "
                     f"{', '.join(target_cmp['differing'][:3])} besides cls_token (max |diff| "
                     f"{target_cmp['max_abs_diff_besides_cls_token']:.3g}); the converted encoder keeps only the "
                     "target's cls token, so its cosine target differs from the official one")
    return ecfg, enc, enc_train, dino_cmp, target_cmp


def _generators(src: "_Keys", hp: dict, token_dim: int, scale_factor: float, use_ema: bool, notes: List[str]):
    """The generator sampling uses (EMA unless ``use_ema`` is off or there is none) and the one
    training (--init) continues (the raw one where present), with their source prefixes."""
    has_ema = any(k.startswith(P_GEN_EMA) for k in src.state)
    has_raw = any(k.startswith(P_GEN_RAW) for k in src.state)
    if use_ema and not has_ema:
        if not has_raw:
            raise InputError(f"{src.name}: no generator weights ({P_GEN_EMA}* or {P_GEN_RAW}*)")
        notes.append(f"no EMA generator ({P_GEN_EMA}*): converted the raw one ({P_GEN_RAW}*)")
        gen_prefix = P_GEN_RAW
    else:
        gen_prefix = P_GEN_EMA if use_ema else P_GEN_RAW
    kw = dict(hp=hp, token_dim=token_dim, scale_factor=scale_factor)
    gcfg, gen = _convert_generator(src, prefix=gen_prefix, **kw)
    train_prefix = P_GEN_RAW if has_raw else gen_prefix
    gen_train = gen
    if train_prefix != gen_prefix:
        gcfg_raw, gen_train = _convert_generator(src, prefix=train_prefix, **kw)
        if gcfg_raw != gcfg:
            raise InputError(f"{src.name}: the raw generator ({P_GEN_RAW}*) has another architecture than the EMA one")
    gcfg.token_norm = "scalar"  # cls / scale_factor
    gcfg.time_sampler, gcfg.time_loc, gcfg.time_scale = _time_sampler(hp, notes)
    return gcfg, gen, gen_train, gen_prefix, train_prefix


def _vae_downsample(vae_cfg: dict, image_size: int) -> int:
    downsample = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    if image_size % downsample:
        raise InputError(f"image size {image_size} is not divisible by the VAE downsampling {downsample}")
    return downsample


def _weight_files(enc_train, dec, gen_train, enc, gen, dtype: torch.dtype):
    """model.safetensors: the training state (fp32 fine-tuned DINO + original cls token, decoder,
    raw generator); ema.safetensors: what inference uses (the encode() copy, the EMA generator;
    the decoder, which has one copy, is read from model.safetensors). Both in ``dtype``."""
    weights, infer = {}, {}
    for comp, part in (("encoder", enc_train), ("decoder", dec), ("generator", gen_train)):
        weights.update({f"{comp}.{k}": v for k, v in part.items()})
    for comp, part in (("encoder", enc), ("generator", gen)):
        infer.update({f"{comp}.{k}": v for k, v in part.items()})
    return _materialise(weights, dtype), _materialise(infer, dtype)


def _check_consumed(src: "_Keys", gen_prefix: str, train_prefix: str) -> Dict[str, int]:
    """Every source tensor was converted or belongs to a known ignored group (counted by group;
    the generator copy neither sampling nor training uses is one); InputError naming the first
    unknown key otherwise."""
    unused_gen = None if {gen_prefix, train_prefix} == {P_GEN_EMA, P_GEN_RAW} else (
        P_GEN_RAW if gen_prefix == P_GEN_EMA else P_GEN_EMA)
    ignored: Dict[str, int] = {}
    unknown = []
    for k in src.state:
        if k in src.used:
            continue
        g = _ignored_group(k, unused_gen)
        if g is None:
            unknown.append(k)
        else:
            ignored[g] = ignored.get(g, 0) + 1
    if unknown:
        raise InputError(f"{src.name}: unknown key {unknown[0]!r} ({len(unknown)} unrecognised; "
                         "official-checkpoint-spec.md section 7.3 lists the expected layout)")
    return ignored


def _sampling_config(hp: dict, gcfg) -> SamplingConfig:
    """The official sample_kwargs as reptok's sampling defaults (CFG only where the generator learnt it)."""
    sk = _dig(hp, "sample_kwargs", default={}) or {}
    interval = sk.get("t_interval", sk.get("cfg_interval", (0.3, 0.9)))
    return SamplingConfig(
        steps=int(sk.get("num_steps", 50)), solver="euler",
        cfg=float(sk.get("cfg_scale", 1.5)) if gcfg.num_classes > 0 and gcfg.class_dropout > 0 else 1.0,
        cfg_interval=tuple(float(v) for v in interval) if interval is not None else (0.3, 0.9),
        decoder_steps=50, decoder_solver="euler",
    )


def _source_record(ck, hash_source: bool) -> dict:
    return {"source": str(ck.path.resolve()), "source_bytes": ck.path.stat().st_size,
            "sha256": file_sha256(ck.path) if hash_source else None, "lightning": ck.meta}


def _weights_record(gen_prefix: str, train_prefix: str, dino_cmp: dict) -> dict:
    """Which source prefixes became the inference and the training weights."""
    return {
        "generator_weights": "ema" if gen_prefix == P_GEN_EMA else "raw",
        "weights": {
            "inference (ema.safetensors)": {"encoder": P_DINO + "*", "generator": gen_prefix + "*",
                                            "decoder": "model.safetensors"},
            "training (model.safetensors, train --init)": {
                "encoder": (P_DINO_FP32 if dino_cmp.get("present") else P_DINO) + "*",
                "encoder.cls_token_frozen": P_DINO_TARGET + "{cls_token, pos_embed[:, 0]}",
                "decoder": P_DEC + "*", "generator": train_prefix + "*"},
        },
    }


def _inferred(image_size: int, ecfg, dcfg, gcfg, vae_cfg: dict, scfg: SamplingConfig) -> dict:
    """What the conversion read off the tensors and hyper-parameters, for the summary."""
    return {
        "image_size": image_size,
        "encoder": {"model": ecfg.model, "dim": ecfg.dim, "overrides": ecfg.overrides, "img_size": ecfg.img_size},
        "decoder": {k: getattr(dcfg, k) for k in ("width", "depth", "head_dim", "ff_expand", "mapping_width",
                                                  "mapping_depth", "patch_size", "input_size", "in_channels")},
        "generator": {k: getattr(gcfg, k) for k in ("dim", "depth", "token_expand", "channel_expand", "n_tokens",
                                                    "token_dim", "num_classes", "class_dropout")},
        "vae": {k: vae_cfg[k] for k in ("block_out_channels", "layers_per_block", "norm_num_groups",
                                        "latent_channels")},
        "sampling": {"steps": scfg.steps, "cfg": scfg.cfg, "cfg_interval": list(scfg.cfg_interval),
                     "decoder_steps": scfg.decoder_steps},
    }


def convert_official(
    ckpt_path: PathLike,
    out_dir: PathLike,
    *,
    encoder_heads: Optional[int] = None,
    encoder_patch: Optional[int] = None,
    encoder_img_size: int = 224,
    encoder_model: str = "vit_base_patch14_reg4_dinov2",
    vae_config: Optional[PathLike] = None,
    vae_norm_groups: Optional[int] = None,
    image_size: Optional[int] = None,
    use_ema: bool = True,
    dtype: str = "fp32",
    overwrite: bool = False,
    hash_source: bool = True,
) -> dict:
    """Convert the official RepTok Lightning checkpoint ``ckpt_path`` into the reptok run
    directory ``out_dir`` (kind "pipeline") and return a JSON-safe summary.

    What the tensors cannot tell comes from options: ``encoder_heads`` (default width // 64,
    DINOv2's head size), ``encoder_img_size`` (224), ``encoder_model`` (timm architecture),
    ``vae_config`` (a diffusers config.json / directory; default inferred from the VAE tensors
    with ``vae_norm_groups`` or 32 GroupNorm groups), ``image_size`` (default the checkpoint's
    ``first_stage_cfg.params.image_size``, else 256). ``use_ema=False`` converts the raw
    generator (``model.net.``) instead of the EMA one. ``dtype``: fp32 | bf16 | fp16 for every
    written tensor (the VAE included). The directory appears atomically (written beside
    ``out_dir``, then renamed); an existing non-empty ``out_dir`` needs ``overwrite``.
    """
    if dtype not in DTYPES:
        raise InputError(f"--precision {dtype!r}: choose one of {', '.join(DTYPES)}")
    if encoder_heads is not None and encoder_heads <= 0:
        raise InputError(f"--encoder-heads {encoder_heads}: must be positive")
    out = Path(out_dir)
    _check_out(out, overwrite)
    ck = read_official_checkpoint(ckpt_path)
    src, hp, notes = _Keys(ck.state, ck.path.name), ck.hparams, []
    scale_factor = _scale_factor(hp, src.name, notes)
    if image_size is None:
        image_size = int(_dig(hp, "first_stage_cfg", "params", "image_size", default=256) or 256)

    # --- components (all validation happens before anything is written)
    enc_opts = dict(heads=encoder_heads, patch=encoder_patch, img_size=encoder_img_size, model=encoder_model)
    ecfg, enc, enc_train, dino_cmp, target_cmp = _encoders(src, enc_opts, notes)
    vae_model, vae = _convert_vae(src, vae_config=vae_config, norm_groups=vae_norm_groups, image_size=image_size)
    vae_cfg = dict(vae_model.config)
    latent, downsample = int(vae_cfg["latent_channels"]), _vae_downsample(vae_cfg, image_size)
    dcfg, dec = _convert_decoder(src, latent_channels=latent, input_size=image_size // downsample, token_dim=ecfg.dim)
    gcfg, gen, gen_train, gen_prefix, train_prefix = _generators(src, hp, ecfg.dim, scale_factor, use_ema, notes)
    ignored = _check_consumed(src, gen_prefix, train_prefix)
    scfg = _sampling_config(hp, gcfg)
    pcfg = PipelineConfig(
        image_size=image_size, encoder=ecfg,
        vae=VAEConfig(source=VAE_DIR, scale=0.18215, shift=0.0, latent_channels=latent, downsample=downsample),
        decoder=dcfg, generator=gcfg, sampling=scfg,
    ).validate()

    # --- write
    weights, infer = _weight_files(enc_train, dec, gen_train, enc, gen, DTYPES[dtype])
    vae_w = _materialise(vae, DTYPES[dtype])
    summary = {
        "format": "reptok-conversion/1",
        **_source_record(ck, hash_source),
        "kind": "pipeline",
        "out": str(out),
        "dtype": dtype,
        **_weights_record(gen_prefix, train_prefix, dino_cmp),
        "dino_target": target_cmp,
        "scale_factor": scale_factor,
        "tensors": {"source": len(src.state), "consumed": len(src.used), "ignored": sum(ignored.values()),
                    "written": len(weights) + len(infer) + len(vae_w)},
        "ignored": dict(sorted(ignored.items())),
        "dino_copies": dino_cmp,
        "inferred": _inferred(image_size, ecfg, dcfg, gcfg, vae_cfg, scfg),
        "options": {"encoder_heads": encoder_heads, "encoder_patch": encoder_patch, "encoder_img_size": encoder_img_size,
                    "encoder_model": encoder_model, "vae_config": str(vae_config) if vae_config else None,
                    "vae_norm_groups": vae_norm_groups, "use_ema": use_ema},
        "notes": notes,
    }
    _write_run(out, overwrite, pcfg, weights, infer, vae_model, vae_w, summary, jsonable(hp))
    return summary


def _write_run(out: Path, overwrite: bool, cfg: PipelineConfig, weights: Dict[str, torch.Tensor],
               infer: Dict[str, torch.Tensor], vae_model, vae_w: Dict[str, torch.Tensor], summary: dict,
               hparams: dict) -> None:
    from safetensors.torch import save_file

    from ..provenance import converter_id
    from ..run import EMA, MODEL, write_run_config

    _check_out(out, overwrite)  # again: the load may have taken minutes
    with atomic_dir(out, overwrite=overwrite) as tmp:  # the run appears whole, in one rename
        write_run_config(tmp, cfg, "pipeline",
                         converted_from={"format": "official-lightning", "source": Path(summary["source"]).name,
                                         "sha256": summary["sha256"], "details": CONVERSION,
                                         "converter": converter_id("official")})
        save_file(weights, str(tmp / MODEL), metadata={"format": "pt", "source": "reptok convert official"})
        save_file(infer, str(tmp / EMA), metadata={"format": "pt", "source": "reptok convert official"})
        vae_model.save_config(str(tmp / VAE_DIR))
        save_file(vae_w, str(tmp / VAE_DIR / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        atomic_write_text(tmp / CONVERSION, json.dumps({**summary, "hyper_parameters": hparams},
                                                       indent=2, sort_keys=True, default=str) + "\n")

"""The encoder adapter: the official DINOv2 (hub naming) -> our SSLEncoder over timm, and the
comparisons of the checkpoint's three DINO copies."""

from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Tuple

import torch

from ..config import EncoderConfig
from ..errors import InputError
from .layout import P_DINO, P_DINO_FP32, P_DINO_TARGET, Keys

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


# ----------------------------------------------------------------------------- encoder
def _timm_overrides(model: str, img_size: int, n: str, *, dim: int, depth: int, heads: int, patch: int,
                    hidden: int, n_reg: int) -> dict:
    """The timm keyword overrides that turn ``model`` into the checkpoint's ViT (none for the
    released ViT-B/14-reg4); the named architecture is built on the meta device to compare."""
    import timm

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
    if tuple(ref.patch_embed.patch_size) != (patch, patch):
        ov["patch_size"] = patch
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
    return ov


def _frozen_cls(src: Keys, fine_tuned_cls: torch.Tensor, pos32: torch.Tensor, notes: List[str]) -> torch.Tensor:
    """The original (frozen) cls token, folded with its pos embed like the fine-tuned one: the
    cosine anchor's target (the fine-tuned token, noted, where the checkpoint lacks it)."""
    tc, tp = P_DINO_TARGET + "cls_token", P_DINO_TARGET + "pos_embed"
    if src.has(tc) and src.has(tp):
        dim = fine_tuned_cls.shape[-1]
        return (src.take(tc, (1, 1, dim)).to(torch.float32)
                + src.take(tp, tuple(pos32.shape)).to(torch.float32)[:, :1])
    notes.append("no target_model cls token: encoder.cls_token_frozen = the fine-tuned token "
                 "(matters only for further training)")
    return fine_tuned_cls.clone()


def convert_encoder(src: Keys, *, heads: Optional[int], patch: Optional[int], img_size: int, model: str,
                     notes: List[str], prefix: str = P_DINO) -> Tuple[EncoderConfig, Dict[str, torch.Tensor]]:
    """DINOv2 (hub naming) -> our SSLEncoder over timm (spec 1.6): cls folded with pos[:, 0],
    register_tokens -> reg_token, pos_embed[:, 1:] resampled to the model grid (timm's bicubic,
    antialias, float32 — DINOv2's own per-forward interpolation), mask_token dropped.
    ``prefix``: the DINO copy to convert (``P_DINO``, the encode() copy, or ``P_DINO_FP32``, the
    fp32 training copy); ``cls_token_frozen`` comes from ``target_model`` for both."""
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

    ov = _timm_overrides(model, img_size, n, dim=dim, depth=depth, heads=heads, patch=p, hidden=hidden, n_reg=n_reg)
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

    out["cls_token_frozen"] = _frozen_cls(src, out["vit.cls_token"], pos32, notes)
    missing = sorted(set(own) - set(out))
    if missing:
        raise RuntimeError(f"internal: encoder key {missing[0]!r} not produced")
    return cfg, out


def compare_dino_copies(src: Keys) -> dict:
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


def compare_target(src: Keys) -> dict:
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

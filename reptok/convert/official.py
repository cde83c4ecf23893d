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

import json
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from ..choices import DTYPES
from ..config import PipelineConfig, SamplingConfig, VAEConfig
from ..errors import InputError
from ..io import file_sha256, atomic_dir, atomic_write_text
from ..outputs import check_new_output
from .decoder import convert_decoder
from .encoder import compare_dino_copies, compare_target, convert_encoder
from .generator import convert_generator, time_sampler
from .layout import P_DEC, P_DINO, P_DINO_FP32, P_DINO_TARGET, P_GEN_EMA, P_GEN_RAW, P_METRICS, Keys, dig, read_official_checkpoint
from .safe_load import jsonable
from .vae import convert_vae

PathLike = Union[str, Path]

CONVERSION = "conversion.json"
VAE_DIR = "vae"


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


def _materialise(tensors: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Own, contiguous copies in the output dtype (the sources may be views of the mmap'd file)."""
    return {k: v.detach().to(dtype=dtype, copy=True).contiguous() for k, v in tensors.items()}


# ----------------------------------------------------------------------------- the converter
def _scale_factor(hp: dict, name: str, notes: List[str]) -> float:
    """The VAE-latent -> token scale of the hyper-parameters (1.0, noted, when absent)."""
    scale_factor = dig(hp, "first_stage_cfg", "params", "scale_factor")
    if scale_factor is None:
        scale_factor = 1.0
        notes.append("no first_stage_cfg.params.scale_factor in the hyper-parameters: token_std = 1.0")
    scale_factor = float(scale_factor)
    if not scale_factor > 0:
        raise InputError(f"{name}: scale_factor {scale_factor} must be positive")
    return scale_factor


def _encoders(src: "Keys", enc_opts: dict, notes: List[str]):
    """The encode() copy (inference) and the fp32 fine-tuned copy the decoder was trained on
    (training; the encode() copy when absent), with the two comparisons the summary reports."""
    ecfg, enc = convert_encoder(src, notes=notes, **enc_opts)
    dino_cmp = compare_dino_copies(src)
    if dino_cmp.get("present"):
        ecfg32, enc_train = convert_encoder(src, notes=[], prefix=P_DINO_FP32, **enc_opts)
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
    target_cmp = compare_target(src)
    if target_cmp.get("compared") and not target_cmp["differs_only_in_cls_token"]:
        notes.append(f"the target DINO ({P_DINO_TARGET}*) differs from the fine-tuned one in "
                     f"{', '.join(target_cmp['differing'][:3])} besides cls_token (max |diff| "
                     f"{target_cmp['max_abs_diff_besides_cls_token']:.3g}); the converted encoder keeps only the "
                     "target's cls token, so its cosine target differs from the official one")
    return ecfg, enc, enc_train, dino_cmp, target_cmp


def _generators(src: "Keys", hp: dict, token_dim: int, scale_factor: float, use_ema: bool, notes: List[str]):
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
    gcfg, gen = convert_generator(src, prefix=gen_prefix, **kw)
    train_prefix = P_GEN_RAW if has_raw else gen_prefix
    gen_train = gen
    if train_prefix != gen_prefix:
        gcfg_raw, gen_train = convert_generator(src, prefix=train_prefix, **kw)
        if gcfg_raw != gcfg:
            raise InputError(f"{src.name}: the raw generator ({P_GEN_RAW}*) has another architecture than the EMA one")
    gcfg.token_norm = "scalar"  # cls / scale_factor
    gcfg.time_sampler, gcfg.time_loc, gcfg.time_scale = time_sampler(hp, notes)
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


def _check_consumed(src: "Keys", gen_prefix: str, train_prefix: str) -> Dict[str, int]:
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
    sk = dig(hp, "sample_kwargs", default={}) or {}
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
        raise InputError(f"--weights-dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if encoder_heads is not None and encoder_heads <= 0:
        raise InputError(f"--encoder-heads {encoder_heads}: must be positive")
    out = Path(out_dir)
    check_new_output(out, overwrite, folder=True)
    ck = read_official_checkpoint(ckpt_path)
    src, hp, notes = Keys(ck.state, ck.path.name), ck.hparams, []
    scale_factor = _scale_factor(hp, src.name, notes)
    if image_size is None:
        image_size = int(dig(hp, "first_stage_cfg", "params", "image_size", default=256) or 256)

    # --- components (all validation happens before anything is written)
    enc_opts = dict(heads=encoder_heads, patch=encoder_patch, img_size=encoder_img_size, model=encoder_model)
    ecfg, enc, enc_train, dino_cmp, target_cmp = _encoders(src, enc_opts, notes)
    vae_model, vae = convert_vae(src, vae_config=vae_config, norm_groups=vae_norm_groups, image_size=image_size)
    vae_cfg = dict(vae_model.config)
    latent, downsample = int(vae_cfg["latent_channels"]), _vae_downsample(vae_cfg, image_size)
    dcfg, dec = convert_decoder(src, latent_channels=latent, input_size=image_size // downsample, token_dim=ecfg.dim)
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

    check_new_output(out, overwrite, folder=True)  # again: the load may have taken minutes
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

"""Stage (b): train the MLP-Mixer generator on extracted tokens with flow matching.

Generator space (``generator.token_norm``): "scalar" divides the tokens by one number, the std of
all training token elements (the official ``cls / scale_factor``, no mean); "per_dim" standardises
each dimension with the extraction sidecar's mean/std. The statistics are stored in the generator
(buffers) so sampling undoes them; ``--init RUN`` keeps the initial generator's. The run records the tokenizer run
that produced the tokens (``tokenizer_run`` in config.json), so sampling finds the decoder.

Text-to-image (``generator.text_encoder`` set): the captions of ``tokens.captions.json`` are
encoded once at the start by the frozen text encoder, one row per unique caption plus the empty
prompt "" (``CaptionFeatures``, in memory, padding beyond the longest caption trimmed); each step
gathers its rows, and ``caption_dropout`` replaces a caption by "" (the CFG null condition). A
random ``tiny`` text tower is saved with the generator (``text_encoder.*``); hub encoders are
recorded by their spec only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .. import flow
from .. import run as rundir
from ..config import PipelineConfig
from ..errors import InputError
from ..extract import load_tokens, sidecar_paths
from ..outputs import check_run_output
from ..models import build_generator
from ..models.generator import TokenGenerator
from ..dist import DistInfo
from ..run import resolve_config, read_run_config
from ..flops import train_gflops
from .loop import _check_batch, fit, amp_dtype_for
from .start import check_init, has_checkpoint, init_run_config, load_init, prepare_run_dir, read_init


class CaptionFeatures:
    """The frozen text encoder's states for every unique caption, computed once.

    ``hidden`` (U, L, E) and ``mask`` (U, L) on the CPU (float16 when float32 would exceed 4 GiB),
    row 0 is the empty prompt ""; ``index`` (N,) maps each example to its caption's row.
    L is trimmed to the longest caption (the padding beyond it is masked out anyway).
    """

    def __init__(self, encoder, captions, device="cpu", batch_size: int = 256):
        captions = [str(c) for c in captions]
        unique = list(dict.fromkeys([""] + captions))
        row = {c: i for i, c in enumerate(unique)}
        self.index = torch.tensor([row[c] for c in captions], dtype=torch.long)
        home = encoder.device
        encoder.to(device)
        hidden, mask = encoder.encode(unique, batch_size)
        encoder.to(home)
        length = int(mask.sum(1).max())
        hidden, mask = hidden[:, :length].cpu(), mask[:, :length].cpu()
        if hidden.numel() * 4 > 4 * 2 ** 30:
            hidden = hidden.half()
        self.hidden, self.mask, self.unique = hidden, mask, len(unique)

    def rows(self, examples: torch.Tensor):
        r = self.index[examples]
        return self.hidden[r].float(), self.mask[r]


class GenTask(nn.Module):
    def __init__(self, generator: TokenGenerator, tokens: np.ndarray, labels: np.ndarray,
                 class_dropout: float, text: CaptionFeatures = None, text_encoder=None):
        super().__init__()
        self.generator = generator
        self.tokens = torch.from_numpy(np.array(tokens, dtype=np.float32))  # a copy: tokens may be a read-only memmap
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.class_dropout = class_dropout if generator.null_class is not None else 0.0
        self.text = text  # plain attribute: the caption table stays on the CPU
        self.__dict__["text_encoder"] = text_encoder  # not a submodule (frozen, never on the training device)
        if text is not None:
            self.class_dropout = generator.cfg.caption_dropout
            self.register_buffer("null_text", text.hidden[:1].float(), persistent=False)
            self.register_buffer("null_mask", text.mask[:1].clone(), persistent=False)

    def saved_modules(self):
        mods = {"generator": self.generator}
        te = self.__dict__.get("text_encoder")
        if te is not None and te.stores_weights:
            mods["text_encoder"] = te
        return mods

    def num_examples(self) -> int:
        return len(self.tokens)

    def compile_regions(self) -> list:
        return [self.generator]

    def load_examples(self, indices: torch.Tensor) -> dict:
        out = {"z": self.tokens[indices], "y": self.labels[indices]}
        if self.text is not None:
            out["text"], out["text_mask"] = self.text.rows(indices)
        return out

    def draw_noise(self, batch_size: int, g: torch.Generator) -> dict:
        cfg = self.generator.cfg
        return {
            "t": flow.sample_time(batch_size, cfg.time_sampler, generator=g, loc=cfg.time_loc, scale=cfg.time_scale),
            "x0": torch.randn(batch_size, cfg.n_tokens, cfg.token_dim, generator=g),
            "drop": (torch.rand(batch_size, generator=g) < self.class_dropout).long(),
        }

    def forward(self, batch: dict, noise: dict):
        x1 = self.generator.normalize(batch["z"])
        if self.text is not None:
            drop = noise["drop"].bool()
            text = torch.where(drop[:, None, None], self.null_text, batch["text"])
            mask = torch.where(drop[:, None], self.null_mask, batch["text_mask"])
            fn = lambda xt, t: self.generator(xt, t, text, mask)  # noqa: E731
        else:
            y = batch["y"]
            fn = lambda xt, t: self.generator(xt, t, y, force_drop_ids=noise["drop"])  # noqa: E731
        loss = flow.flow_matching_loss(fn, x1, noise["x0"], noise["t"])
        return loss.mean(), {}


def token_stats(tokens: np.ndarray, meta: dict, token_norm: str):
    """Generator-space statistics (mean (D,), std (D,)) for ``token_norm``.

    "scalar": mean 0 and every std = s, the standard deviation of all token elements (unbiased,
    the Latent-Diffusion ``scale_factor`` rule: one number that brings the tokens to unit
    variance; the official generator divides by it). "per_dim": the sidecar's per-dimension
    mean / std (floored at 1e-6)."""
    dim = int(meta["dim"])
    if token_norm == "scalar":
        flat = np.asarray(tokens, dtype=np.float64).reshape(-1)
        s = max(float(flat.std(ddof=1)) if flat.size > 1 else 1.0, 1e-6)
        return torch.zeros(dim), torch.full((dim,), s, dtype=torch.float64)
    std = np.maximum(np.asarray(meta["std"], np.float64), 1e-6)
    return torch.tensor(meta["mean"]), torch.tensor(std)


def train_gen(tokens_path: Path, out: Path, cfg: PipelineConfig, *, resume: bool = False, device: str = "cpu",
              info: DistInfo = DistInfo(), progress: bool = True, precision: str = "auto",
              init: Optional[Path] = None, workers: Optional[int] = None, compile: bool = False,
              tensorboard: bool = True, wandb: Optional[str] = None, val_tokens: Optional[Path] = None) -> dict:
    """Train a generator run in ``out`` on ``tokens_path``. ``init``: start from that run's raw
    generator weights (a generator or pipeline run, e.g. converted official weights) and keep its
    normalisation buffers, with a fresh optimizer and EMA. The tokens sit in memory, so the
    loader reads them in the training process unless ``workers`` asks for more. ``val_tokens``:
    held-out tokens for validation (``reptok.train.validate``; a resumed run finds its own)."""
    from .logs import check_wandb

    amp_dtype_for(precision, device)
    check_wandb(wandb)
    data = load_tokens(tokens_path)
    meta = data["meta"]
    if cfg.generator is None:
        raise InputError("the config has no generator section")
    if meta["dim"] != cfg.generator.token_dim:
        raise InputError(f"{tokens_path}: tokens have {meta['dim']} dims but the generator expects "
                         f"{cfg.generator.token_dim}; use the preset of the tokenizer run")
    labels = data["labels"]
    text_encoder = None
    if cfg.generator.text_encoder is not None:
        text_encoder = _text_encoder_for(tokens_path, data, cfg)
    elif cfg.generator.num_classes > 0:
        if (labels < 0).any():
            raise InputError(f"{tokens_path}: some images have no label; train an unconditional generator "
                             f"(--num-classes 0) or prepare a labelled dataset")
        if labels.max(initial=-1) >= cfg.generator.num_classes:
            raise InputError(f"{tokens_path}: labels go up to {int(labels.max())} but the generator has "
                             f"{cfg.generator.num_classes} classes; pass --num-classes {int(labels.max()) + 1}")
    if resume and val_tokens is None and (Path(out) / "config.json").exists():
        val_tokens = read_run_config(Path(out)).get("val_tokens")
    val = _val_tokens(val_tokens, meta, cfg) if val_tokens is not None else None
    tokenizer_run = meta.get("checkpoint")
    cfg.class_names = meta.get("class_names")
    _check_batch(cfg.train, info)  # before the run directory is created
    init_state = read_init(init, "gen", cfg) if init is not None and not resume else None
    extra = {"tokenizer_run": tokenizer_run, "tokens": str(Path(tokens_path).resolve()),
             "val_tokens": str(Path(val_tokens).resolve()) if val_tokens is not None else None}
    if init_state is not None:
        extra["init"] = str(Path(init).resolve())
    cfg = prepare_run_dir(out, cfg, "generator", resume, info, extra=extra)
    torch.manual_seed(cfg.train.seed)
    gen = build_generator(cfg.generator)
    gen.set_token_stats(*token_stats(data["tokens"], meta, cfg.generator.token_norm))
    if init_state is not None:
        load_init(init_state, {"generator": gen})
    feats = None
    if text_encoder is not None:
        if resume and text_encoder.stores_weights:  # the run's own random tower, before encoding
            part = rundir.split_prefix(rundir.read_weights(Path(out), use_ema=False), "text_encoder")
            rundir.load_into(text_encoder, part, str(Path(out) / rundir.MODEL))
        elif init_state is not None and text_encoder.stores_weights:  # the --init run's tower
            if "text_encoder" not in init_state:
                raise InputError(f"--init {init}: the run has no text_encoder weights for its random text tower")
            load_init(init_state, {"text_encoder": text_encoder})
        feats = CaptionFeatures(text_encoder, data["captions"], device=device)
    task = GenTask(gen, data["tokens"], labels, cfg.generator.class_dropout,
                   text=feats, text_encoder=text_encoder)
    summary = fit(task, Path(out), cfg.train, device=device, info=info, resume=resume, progress=progress,
                  precision=precision, workers=workers, compile=compile, tensorboard=tensorboard, wandb=wandb,
                  config=cfg.to_dict(), validate=gen_validation(val, cfg, info, device, amp_dtype_for(precision, device),
                                                                text_encoder),
                  gflops=train_gflops(cfg, "gen"))
    summary["run"] = str(out)
    if feats is not None:
        summary.update(text_encoder=cfg.generator.text_encoder, unique_captions=feats.unique)
    return summary


def _val_tokens(path: Path, meta: dict, cfg: PipelineConfig) -> dict:
    """The held-out tokens, checked against the training tokens before any work."""
    val = load_tokens(path)
    if val["meta"]["dim"] != meta["dim"]:
        raise InputError(f"--val-tokens {path}: {val['meta']['dim']}-dim tokens, the training tokens have {meta['dim']}")
    if val["meta"].get("checkpoint") != meta.get("checkpoint"):
        raise InputError(f"--val-tokens {path}: extracted by another tokenizer run ({val['meta'].get('checkpoint')}) "
                         f"than the training tokens ({meta.get('checkpoint')}); extract both with the same --ckpt")
    if cfg.generator is not None and cfg.generator.text_encoder is not None and not val["captions"]:
        raise InputError(f"--val-tokens {path}: no captions sidecar; a text-to-image run validates on captioned tokens")
    classes = cfg.generator.num_classes if cfg.generator is not None else 0
    if classes and (val["labels"] >= classes).any():
        raise InputError(f"--val-tokens {path}: labels go up to {int(val['labels'].max())} but the generator has "
                         f"{classes} classes")
    return val


def gen_validation(val: Optional[dict], cfg: PipelineConfig, info: DistInfo, device, amp_dtype, text_encoder=None):
    from .validate import GenValidation, validation_off

    if val is None:
        return validation_off("no held-out set (train gen --val-tokens FILE, tokens from reptok extract)")
    if cfg.train.val_every == 0:
        return validation_off("train.val_every=0")
    text = None
    if text_encoder is not None:  # the held-out captions, encoded once like the training ones
        text = (CaptionFeatures(text_encoder, val["captions"], device=device), text_encoder, val["captions"])
    return GenValidation(val["tokens"], val["labels"], cfg, info=info, device=device, amp_dtype=amp_dtype, text=text)


def _text_encoder_for(tokens_path: Path, data: dict, cfg: PipelineConfig):
    """Check the captions, build the frozen text encoder and record its spec / sizes in ``cfg``."""
    from ..models.text import build_text_encoder

    captions = data["captions"]
    if captions is None:
        raise InputError(f"{tokens_path}: these tokens have no captions ({sidecar_paths(tokens_path)['captions'].name} "
                         f"is missing); prepare a captioned dataset (builtin:shapes, .txt sidecars, an HF caption "
                         f"column) and re-run 'reptok extract', or drop --text-encoder")
    if len(captions) != len(data["tokens"]):
        raise InputError(f"{tokens_path}: {len(captions)} captions for {len(data['tokens'])} tokens; re-run 'reptok extract'")
    if not any(str(c).strip() for c in captions):
        raise InputError(f"{tokens_path}: every caption is empty; prepare the dataset with its captions")
    g = cfg.generator
    te = build_text_encoder(g.text_encoder, max_len=g.text_len or None)
    if g.text_dim and g.text_dim != te.dim:
        raise InputError(f"generator.text_dim={g.text_dim} but the text encoder {te.spec!r} has width {te.dim}")
    g.text_encoder, g.text_dim, g.text_len = te.spec, te.dim, te.max_len
    return te


def gen_run_config(out: Path, tokens: Path, overrides: dict, *, preset: str = "small", resume: bool = False,
                   init: Optional[Path] = None) -> PipelineConfig:
    """The config ``train gen`` runs with, checked before any work: the run's own (``resume``) or
    the tokens' tokenizer run + the preset's (or the ``init`` run's) generator, then ``overrides``.
    Captions are dropped only for text-to-image runs (``generator.text_encoder``)."""
    text = overrides.get("generator.text_encoder")
    if overrides.get("generator.caption_dropout") is not None and text is None and not resume:
        raise InputError("--caption-dropout applies to text-to-image runs; add --text-encoder NAME")
    check_init(init, resume, **{"--text-encoder": text, "--num-classes": overrides.get("generator.num_classes") is not None,
                                "--token-norm": overrides.get("generator.token_norm")})
    check_run_output(out, resume)
    if resume and has_checkpoint(out):
        if text is not None:  # compared with the run's (canonical) spec; gen_config does it for new runs
            from ..models.text import canonical_spec

            overrides = {**overrides, "generator.text_encoder": canonical_spec(text)}
        return resolve_config(ckpt=str(out), overrides=overrides)
    init_cfg = init_run_config(init, "gen") if init is not None else None
    return gen_config(tokens, resolve_config(preset=preset), overrides, init=init_cfg)


def gen_config(tokens_path: Path, preset: PipelineConfig, overrides: dict,
               init: Optional[PipelineConfig] = None) -> PipelineConfig:
    """The generator run's config: the tokenizer run's models + the preset's generator/training.
    ``init`` (the config of an ``--init`` run): its generator and sampling settings instead of the
    preset's (the weights must fit), training still from the preset."""
    meta = load_tokens(tokens_path)["meta"]
    tok = meta.get("checkpoint")
    if tok and (Path(tok) / rundir.CONFIG).exists():
        base = rundir.read_run_config(Path(tok))["config"]
    else:
        base = preset
    cfg = PipelineConfig.from_dict(base.to_dict())
    if init is not None:
        if init.generator is None:
            raise InputError("--init: that run has no generator")
        gen = PipelineConfig.from_dict(init.to_dict()).generator  # token_dim / classes checked by train_gen
        preset = PipelineConfig.from_dict({**preset.to_dict(), "sampling": init.to_dict()["sampling"]})
    else:
        gen = PipelineConfig.from_dict(preset.to_dict()).generator
        gen.token_dim = int(meta["dim"])
        gen.num_classes = int(meta.get("num_classes") or 0)
    if overrides.get("generator.text_encoder") is not None:  # text-to-image: no classes, spec canonical
        from ..models.text import canonical_spec

        gen.num_classes = 0
        overrides = {**overrides, "generator.text_encoder": canonical_spec(overrides["generator.text_encoder"])}
    cfg.generator = gen
    cfg.train = preset.train
    cfg.sampling.steps, cfg.sampling.cfg = preset.sampling.steps, preset.sampling.cfg
    cfg.sampling.cfg_interval = preset.sampling.cfg_interval
    cfg = cfg.replace(**{k: v for k, v in overrides.items() if v is not None})
    return cfg.validate()

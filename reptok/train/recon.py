"""Stage (a): jointly train the encoder's ``[cls]`` token and the flow decoder.

Loss = flow matching on decoder latents (the linear path, velocity target) conditioned on the
token, plus ``cos_weight * (1 - cos(z, z_frozen))`` (the cosine anchor that keeps z near the
SSL space). ``freeze_token`` trains the decoder on the unmodified SSL token (the baseline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .. import run as rundir
from .. import flow
from ..config import PipelineConfig
from ..data.latents import LatentCache
from ..errors import InputError
from ..models.encoder import cos_anchor_loss
from ..shapes.ssl import builtin_weights
from ..pipeline import Pipeline, STREAM_DECODER, index_noise
from ..images import make_grid, save_png, tensor_to_uint8
from ..dist import DistInfo
from .loop import _check_batch, fit, amp_dtype_for
from .start import load_init, prepare_run_dir, read_init
from ..flops import train_gflops


class ReconSource:
    """Picklable batch reader for DataLoader workers: raw uint8 images (B, 3, R, R) and, with a
    latent cache, its float16 moments (B, V, 2C, h, w) (V = 2: [image, mirror image])."""

    def __init__(self, dataset, cache=None):
        self.dataset, self.cache = dataset, cache

    def __call__(self, indices: torch.Tensor) -> dict:
        idx = indices.numpy()
        out = {"image": torch.from_numpy(self.dataset.get_uint8_chw(idx))}
        if self.cache is not None:
            out["moments"] = torch.from_numpy(self.cache.get(idx))
        return out


class ReconTask(nn.Module):
    """One step of stage (a). Only the cls token and the decoder are trainable.

    Batches arrive as uint8 and are converted on the training device; ``hflip`` mirrors each
    image with probability 1/2, drawn with the rest of step s (and then uses the mirror image's
    cached posterior)."""

    reads_files = True  # the loader uses worker processes by default

    def __init__(self, pipe: Pipeline, dataset, cos_weight: float, freeze_token: bool,
                 token_lr_scale: float = 1.0, hflip: bool = False, cache=None):
        super().__init__()
        self.token_lr_scale = token_lr_scale
        self.encoder, self.decoder, self.latent = pipe.encoder, pipe.decoder, pipe.latent
        self.dataset = dataset
        self.cos_weight = cos_weight
        dc = pipe.decoder.cfg  # the stage's time sampler (official: logit-normal(0, 1))
        self.time_sampler, self.time_loc, self.time_scale = dc.time_sampler, dc.time_loc, dc.time_scale
        self.freeze_token = freeze_token
        self.latent_shape = pipe.latent_shape
        self.hflip = hflip
        self.source = ReconSource(dataset, cache)
        self.cached = cache is not None
        if freeze_token:  # the baseline: the whole encoder stays as it is
            self.encoder.requires_grad_(False)

    def saved_modules(self):
        return {"encoder": self.encoder, "decoder": self.decoder}

    def lr_scales(self) -> dict:
        return {} if self.freeze_token else {self.encoder.vit.cls_token: self.token_lr_scale}

    def compile_regions(self) -> list:
        """--compile: each decoder block and each ViT block on its own (identical blocks share
        one compiled graph; the encoder calls its blocks, not ``vit.forward``)."""
        return list(self.decoder.blocks) + list(self.encoder.vit.blocks)

    def num_examples(self) -> int:
        return len(self.dataset)

    def example_source(self) -> ReconSource:
        return self.source

    def load_examples(self, indices: torch.Tensor) -> dict:
        return self.source(indices)

    def draw_noise(self, batch_size: int, g: torch.Generator) -> dict:
        out = {
            "t": flow.sample_time(batch_size, self.time_sampler, generator=g, loc=self.time_loc, scale=self.time_scale),
            "x0": torch.randn(batch_size, *self.latent_shape, generator=g),
            "eps": torch.randn(batch_size, *self.latent_shape, generator=g),  # VAE posterior sample
        }
        if self.hflip:  # drawn last: runs without flips keep their exact noise
            out["flip"] = torch.rand(batch_size, generator=g) < 0.5
        return out

    def forward(self, batch: dict, noise: dict):
        images = batch["image"]
        if images.dtype == torch.uint8:
            images = images.float().div_(127.5).sub_(1.0)
        flip = noise.get("flip")
        if flip is not None:
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        with torch.no_grad():
            if "moments" in batch:
                moments = batch["moments"]
                if flip is not None:
                    moments = moments[torch.arange(len(flip), device=flip.device), flip.long()]
                else:
                    moments = moments[:, 0]
            else:
                moments = self.latent.encode_moments(images)
            x1 = self.latent.latents_from_moments(moments.float(), noise=noise["eps"]).float()
        if self.freeze_token:
            z = self.encoder.forward_frozen(images)
            cos = torch.zeros(images.shape[0], device=images.device)
        else:
            z, z_frozen = self.encoder.forward_pair(images)
            cos = cos_anchor_loss(z, z_frozen)
        rf = flow.flow_matching_loss(lambda xt, t: self.decoder(xt, t, z), x1, noise["x0"], noise["t"])
        loss = rf.mean() + self.cos_weight * cos.mean()
        return loss, {"rf": rf.mean().detach(), "cos": cos.mean().detach()}


def recon_grid(pipe_like: Pipeline, images: torch.Tensor, steps: int, seed: int = 0) -> "np.ndarray":  # noqa: F821
    """Originals (top row) over their reconstructions (bottom row), one uint8 grid."""
    recon = pipe_like.reconstruct(images, seed, steps=steps, output="pt")
    both = list(tensor_to_uint8(images)) + list(tensor_to_uint8(recon))
    return make_grid(both, ncol=len(images))


def train_recon(
    data: Path, out: Path, cfg: PipelineConfig, *, resume: bool = False, freeze_token: bool = False,
    device: str = "cpu", info: DistInfo = DistInfo(), progress: bool = True, precision: str = "auto",
    grid_images: int = 8, init: Optional[Path] = None, workers: Optional[int] = None, compile: bool = False,
    grad_checkpoint: bool = False, tensorboard: bool = True, wandb: Optional[str] = None,
    notify: Optional[Callable[[str], None]] = None, val_data: Optional[Path] = None,
) -> dict:
    """Train a tokenizer run in ``out`` on the prepared dataset ``data``; returns a summary.

    ``init``: start from that run's raw encoder + decoder weights (a tokenizer or pipeline run;
    a converted official run gives the fp32 fine-tuned DINO and the original cls token, i.e. the
    official training computation), with a fresh optimizer and EMA. A latent cache of ``data``
    (``reptok data cache-latents``) is used when it matches the run's VAE and resolution (a
    mismatch is an InputError); ``notify`` receives one line saying so. ``val_data``: a held-out
    prepared dataset for validation (``reptok.train.validate``; a resumed run finds its own)."""
    from ..data.dataset import PreparedDataset
    from .logs import check_wandb

    dataset = PreparedDataset(data)
    if dataset.resolution != cfg.image_size:
        raise InputError(f"{data}: images are {dataset.resolution}px but the config wants {cfg.image_size}px; "
                         f"re-run 'reptok data prep --resolution {cfg.image_size}' or pick a matching preset")
    amp_dtype_for(precision, device)
    check_wandb(wandb)
    hflip = bool(cfg.train.hflip)
    cache = None if cfg.vae.is_pixel else LatentCache.of(dataset.path)
    if cache is not None:
        down = cfg.image_size // cfg.vae.downsample
        cache.check(cfg.vae.source, cfg.vae.subfolder, cfg.image_size, (2 * cfg.vae.latent_channels, down, down), hflip)
    cfg.class_names = dataset.class_names
    if resume and (Path(out) / rundir.CONFIG).exists():
        # A resumed baseline stays a baseline even without --freeze-token on the command line.
        old = rundir.read_run_config(Path(out))
        freeze_token = freeze_token or bool(old.get("freeze_token"))
        val_data = val_data if val_data is not None else old.get("val_data")
    val_set = _val_dataset(val_data, cfg) if val_data is not None else None
    _check_batch(cfg.train, info)  # before the run directory is created
    init_state = read_init(init, "recon", cfg) if init is not None and not resume else None
    extra = {"freeze_token": freeze_token, "data": str(Path(data).resolve()),
             "val_data": str(Path(val_data).resolve()) if val_data is not None else None}
    if init_state is not None:
        extra["init"] = str(Path(init).resolve())
    cfg = prepare_run_dir(out, cfg, "tokenizer", resume, info, extra=extra)
    torch.manual_seed(cfg.train.seed)  # the decoder's random init is part of the run's identity
    pipe = Pipeline.build(cfg, components=("encoder", "decoder", "vae"), load_weights=init_state is None,
                          resolve_builtin=builtin_weights)  # a builtin encoder: pre-trained once, cached
    if init_state is not None:
        load_init(init_state, {"encoder": pipe.encoder, "decoder": pipe.decoder})
    pipe.decoder.grad_checkpoint = grad_checkpoint
    task = ReconTask(pipe, dataset, cfg.train.cos_weight, freeze_token, cfg.train.token_lr_scale,
                     hflip=hflip, cache=cache)
    if notify is not None and info.is_main and cache is not None:
        notify(f"using the latent cache {cache.dir} ({'with' if cache.flips else 'no'} mirrored views): "
               f"no VAE encoder pass during training")
    grid_src = torch.as_tensor(dataset.get_batch(list(range(min(grid_images, len(dataset)))))["image"])

    def on_sample(ema: dict, step: int):
        view = Pipeline(cfg, encoder=ema["encoder"], decoder=ema["decoder"], latent=pipe.latent)
        grid = recon_grid(view, grid_src.to(device), cfg.sampling.decoder_steps)
        save_png(Path(out) / "samples" / f"recon_{step:07d}.png", grid)
        return grid

    validate = recon_validation(val_set, pipe.latent, cfg, info, device, amp_dtype_for(precision, device), freeze_token)
    summary = fit(task, Path(out), cfg.train, device=device, info=info, resume=resume, progress=progress,
                  on_sample=on_sample, precision=precision, workers=workers, compile=compile,
                  tensorboard=tensorboard, wandb=wandb, config=cfg.to_dict(), validate=validate,
                  gflops=train_gflops(cfg, "recon", freeze_token))
    summary["run"] = str(out)
    summary["latent_cache"] = str(cache.dir) if cache is not None else None
    return summary


def _val_dataset(val_data: Path, cfg: PipelineConfig):
    """The held-out prepared dataset, checked before any work."""
    from ..data.dataset import PreparedDataset

    ds = PreparedDataset(val_data)
    if ds.resolution != cfg.image_size:
        raise InputError(f"--val-data {val_data}: images are {ds.resolution}px but the run trains at "
                         f"{cfg.image_size}px; prepare it with --resolution {cfg.image_size}")
    return ds


def recon_validation(val_set, latent, cfg: PipelineConfig, info: DistInfo, device, amp_dtype, freeze_token: bool):
    from .validate import ReconValidation, recon_extractor, validation_off

    if val_set is None:
        return validation_off("no held-out set (train recon --val-data DIR, a prepared dataset)")
    if cfg.train.val_every == 0:
        return validation_off("train.val_every=0")
    extractor, features = recon_extractor(cfg.train.val_features, cfg.image_size, device) if cfg.train.val_fid_n > 1 \
        else (None, "val_fid_n < 2")
    return ReconValidation(val_set, latent, cfg, info=info, device=device, amp_dtype=amp_dtype,
                           freeze_token=freeze_token, extractor=extractor, features=features)

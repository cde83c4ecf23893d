"""Stage (a): jointly train the encoder's ``[cls]`` token and the flow decoder.

Loss = flow matching on decoder latents (the linear path, velocity target) conditioned on the
token, plus ``cos_weight * (1 - cos(z, z_frozen))`` (the cosine anchor that keeps z near the
SSL space). ``freeze_token`` trains the decoder on the unmodified SSL token (the baseline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .. import checkpoint as ckpt
from .. import flow
from ..config import PipelineConfig
from ..errors import InputError
from ..models.encoder import cos_anchor_loss
from ..pipeline import Pipeline, STREAM_DECODER, index_noise
from ..images import make_grid, save_png, tensor_to_uint8
from .dist import DistInfo
from .loop import _check_batch, fit
from .run import load_init, prepare_run_dir, read_init


class ReconTask(nn.Module):
    """One step of stage (a). Only the cls token and the decoder are trainable."""

    def __init__(self, pipe: Pipeline, dataset, cos_weight: float, freeze_token: bool, token_lr_scale: float = 1.0):
        super().__init__()
        self.token_lr_scale = token_lr_scale
        self.encoder, self.decoder, self.latent = pipe.encoder, pipe.decoder, pipe.latent
        self.dataset = dataset
        self.cos_weight = cos_weight
        self.freeze_token = freeze_token
        self.latent_shape = pipe.latent_shape
        self.cached = getattr(dataset, "has_latents", False)
        if freeze_token:  # the baseline: the whole encoder stays as it is
            self.encoder.requires_grad_(False)

    def saved_modules(self):
        return {"encoder": self.encoder, "decoder": self.decoder}

    def lr_scales(self) -> dict:
        return {} if self.freeze_token else {self.encoder.vit.cls_token: self.token_lr_scale}

    def num_examples(self) -> int:
        return len(self.dataset)

    def load_examples(self, indices: torch.Tensor) -> dict:
        b = self.dataset.get_batch(indices.tolist())
        out = {"image": torch.as_tensor(b["image"])}
        if self.cached and "latent_moments" in b:
            out["moments"] = torch.as_tensor(b["latent_moments"]).float()
        return out

    def draw_noise(self, batch_size: int, g: torch.Generator) -> dict:
        dc = self.decoder.cfg  # the stage's time sampler (official: logit-normal(0, 1))
        return {
            "t": flow.sample_time(batch_size, dc.time_sampler, generator=g, loc=dc.time_loc, scale=dc.time_scale),
            "x0": torch.randn(batch_size, *self.latent_shape, generator=g),
            "eps": torch.randn(batch_size, *self.latent_shape, generator=g),  # VAE posterior sample
        }

    def forward(self, batch: dict, noise: dict):
        images = batch["image"]
        with torch.no_grad():
            moments = batch["moments"] if "moments" in batch else self.latent.encode_moments(images)
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
    recon = pipe_like.reconstruct(images, list(range(len(images))), seed=seed, steps=steps)
    both = list(tensor_to_uint8(images)) + list(tensor_to_uint8(recon))
    return make_grid(both, ncol=len(images))


def train_recon(
    data: Path, out: Path, cfg: PipelineConfig, *, resume: bool = False, freeze_token: bool = False,
    device: str = "cpu", info: DistInfo = DistInfo(), progress: bool = True, precision: str = "auto",
    grid_images: int = 8, init: Optional[Path] = None,
) -> dict:
    """Train a tokenizer run in ``out`` on the prepared dataset ``data``; returns a summary.
    ``init``: start from that run's raw encoder + decoder weights (a tokenizer or pipeline run;
    a converted official run gives the fp32 fine-tuned DINO and the original cls token, i.e. the
    official training computation), with a fresh optimizer and EMA."""
    from ..data.dataset import PreparedDataset

    dataset = PreparedDataset(data)
    if dataset.resolution != cfg.image_size:
        raise InputError(f"{data}: images are {dataset.resolution}px but the config wants {cfg.image_size}px; "
                         f"re-run 'reptok data prep --resolution {cfg.image_size}' or pick a matching preset")
    cfg.class_names = dataset.class_names
    if resume and (Path(out) / ckpt.CONFIG).exists():
        # A resumed baseline stays a baseline even without --freeze-token on the command line.
        freeze_token = freeze_token or bool(ckpt.read_run_config(Path(out)).get("freeze_token"))
    _check_batch(cfg.train, info)  # before the run directory is created
    init_state = read_init(init, "recon", cfg) if init is not None and not resume else None
    extra = {"freeze_token": freeze_token, "data": str(Path(data).resolve())}
    if init_state is not None:
        extra["init"] = str(Path(init).resolve())
    cfg = prepare_run_dir(out, cfg, "tokenizer", resume, info, extra=extra)
    torch.manual_seed(cfg.train.seed)  # the decoder's random init is part of the run's identity
    pipe = Pipeline.build(cfg, components=("encoder", "decoder", "vae"), load_weights=init_state is None)
    if init_state is not None:
        load_init(init_state, {"encoder": pipe.encoder, "decoder": pipe.decoder})
    task = ReconTask(pipe, dataset, cfg.train.cos_weight, freeze_token, cfg.train.token_lr_scale)
    grid_src = torch.as_tensor(dataset.get_batch(list(range(min(grid_images, len(dataset)))))["image"])

    def on_sample(ema: dict, step: int) -> None:
        view = Pipeline(cfg, encoder=ema["encoder"], decoder=ema["decoder"], latent=pipe.latent)
        grid = recon_grid(view, grid_src.to(device), cfg.sampling.decoder_steps)
        save_png(Path(out) / "samples" / f"recon_{step:07d}.png", grid)

    summary = fit(task, Path(out), cfg.train, device=device, info=info, resume=resume, progress=progress,
                  on_sample=on_sample, precision=precision)
    summary["run"] = str(out)
    return summary

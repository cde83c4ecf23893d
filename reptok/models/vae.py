"""The decoder's working space: SD-VAE latents (diffusers ``AutoencoderKL``) or plain pixels.

Both classes share one interface (images are (B, 3, H, W) in [-1, 1]):

- ``encode(images, generator=None) -> latents``   a posterior sample, scaled: (B, C, h, w)
- ``encode_moments(images) -> moments``            what a latent cache stores
- ``latents_from_moments(moments, generator=None)`` a cached entry -> a latent sample
- ``decode(latents) -> images``                   not clamped (official behaviour)

Official SD-VAE conventions (official-checkpoint-spec.md section 5): scale 0.18215, shift 0,
encode = ``(posterior.sample() - shift) * scale``, decode = ``vae.decode(z / scale + shift)``,
moments = the ``quant_conv`` output (mean and logvar, 2C channels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from ..config import VAEConfig
from ..errors import InputError

# diffusers config of stabilityai/sd-vae-ft-mse (public), to size the VAE without downloading it.
SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=[128, 256, 512, 512], act_fn="silu", sample_size=256, scaling_factor=0.18215,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
)

PathLike = Union[str, Path]


# ----------------------------------------------------------------------------- helpers
def _randn_like_on(ref: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """N(0, 1) noise shaped like ``ref``; drawn on the generator's device (so a CPU generator
    gives the same numbers whatever device the model runs on), then moved — diffusers'
    ``randn_tensor`` rule, so ``encode`` matches ``posterior.sample(generator)``."""
    if generator is None:
        return torch.randn(ref.shape, device=ref.device, dtype=ref.dtype)
    noise = torch.randn(ref.shape, generator=generator, device=generator.device, dtype=ref.dtype)
    return noise.to(ref.device)


def resolve_vae_source(source: str, root: Optional[PathLike] = None) -> Tuple[str, bool]:
    """Where to load a VAE from: ``(location, is_local)``.

    A local directory is: an absolute / ``~`` / ``./`` path, any path that exists (relative
    paths are tried against ``root``, the run directory, first), or a bare name without ``/``
    (the run-directory form ``vae``). Anything else shaped ``org/name`` is a hub id.
    Raises InputError (exit code 2) for a local path that does not exist.
    """
    p = Path(source).expanduser()
    candidates = []
    if not p.is_absolute() and root is not None:
        candidates.append(Path(root) / p)
    candidates.append(p)
    for c in candidates:
        if c.exists():
            return str(c), True
    looks_local = p.is_absolute() or source.startswith((".", "~")) or "/" not in source or source.count("/") > 1
    if looks_local:
        where = f" (resolved against {root})" if root is not None and not p.is_absolute() else ""
        raise InputError(f"VAE directory not found: {source!r}{where}")
    return source, False


def _freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


# ----------------------------------------------------------------------------- latent space
class LatentVAE(nn.Module):
    """A frozen diffusers ``AutoencoderKL`` with the official scale/shift conventions.

    ``LatentVAE(cfg, root)`` loads ``cfg.source`` (hub id or diffusers directory; relative
    directories are resolved against ``root``, the run directory) with ``cfg.subfolder``.
    ``LatentVAE.from_module(autoencoder, cfg)`` wraps an in-memory model (tests, converter).
    The autoencoder is registered as ``self.vae`` so ``.to(device / dtype)`` moves it.
    """

    is_pixel = False

    def __init__(self, cfg: VAEConfig, root: Optional[PathLike] = None, *, module: Optional[nn.Module] = None):
        super().__init__()
        if cfg.is_pixel:
            raise ValueError("VAEConfig.source is 'none' (pixel space); use PixelSpace or build_latent_space")
        self.cfg = cfg
        if module is None:
            module = self._load(cfg, root)
        self.vae = _freeze(module)
        self._check(cfg)

    @classmethod
    def from_module(cls, autoencoder: nn.Module, cfg: Optional[VAEConfig] = None) -> "LatentVAE":
        """Wrap an already built ``AutoencoderKL`` (frozen in place)."""
        return cls(cfg if cfg is not None else VAEConfig(source="<in-memory>"), module=autoencoder)

    @staticmethod
    def _load(cfg: VAEConfig, root: Optional[PathLike]) -> nn.Module:
        from diffusers import AutoencoderKL

        location, local = resolve_vae_source(cfg.source, root)
        if local:
            cfg_dir = Path(location) / cfg.subfolder if cfg.subfolder else Path(location)
            if not (cfg_dir / "config.json").is_file():
                raise InputError(f"{cfg_dir} is not a diffusers AutoencoderKL directory (no config.json)")
        return AutoencoderKL.from_pretrained(location, subfolder=cfg.subfolder)

    def _check(self, cfg: VAEConfig) -> None:
        c = getattr(self.vae, "config", None)
        if c is None:
            return
        if c.latent_channels != cfg.latent_channels:
            raise InputError(f"vae.latent_channels={cfg.latent_channels} but the autoencoder has {c.latent_channels}")
        down = 2 ** (len(c.block_out_channels) - 1)
        if down != cfg.downsample:
            raise InputError(f"vae.downsample={cfg.downsample} but the autoencoder downsamples by {down}")

    def train(self, mode: bool = True) -> "LatentVAE":
        super().train(mode)
        self.vae.eval()  # frozen
        return self

    # ------------------------------------------------------------------ shapes
    @property
    def channels(self) -> int:
        return self.cfg.latent_channels

    @property
    def moment_channels(self) -> int:
        return 2 * self.cfg.latent_channels

    def latent_shape(self, image_size: int) -> Tuple[int, int, int]:
        """(C, h, w) of the latent of a square image."""
        s = image_size // self.cfg.downsample
        return (self.cfg.latent_channels, s, s)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    # ------------------------------------------------------------------ encode / decode
    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> moments (B, 2C, H/8, W/8): [mean, logvar], the quant_conv output.

        Uses the public ``encode`` so diffusers' slicing / tiling options still apply.
        """
        return self.vae.encode(images.to(self.dtype)).latent_dist.parameters

    def latents_from_moments(
        self, moments: torch.Tensor, generator: Optional[torch.Generator] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Cached moments (B, 2C, h, w) -> scaled latent sample (B, C, h, w).

        ``noise`` (B, C, h, w) replaces the N(0, 1) draw (training draws it for the global batch
        so that every rank / resume sees the same sample).

        logvar clamped to [-30, 20], latent = mean + exp(logvar / 2) * N(0, 1), then
        ``(latent - shift) * scale``. The official cached path adds the shift instead of
        subtracting it (spec section 8, quirk 5); with shift = 0 both agree, and subtracting
        keeps this path identical to ``encode``.
        """
        mean, logvar = torch.chunk(moments, 2, dim=1)
        logvar = torch.clamp(logvar, -30.0, 20.0)
        eps = _randn_like_on(mean, generator) if noise is None else noise.to(mean)
        latent = mean + torch.exp(0.5 * logvar) * eps
        return (latent - self.cfg.shift) * self.cfg.scale

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> latents (B, C, H/8, W/8): (sample - shift) * scale."""
        return self.latents_from_moments(self.encode_moments(images), generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, C, h, w) -> images (B, 3, 8h, 8w), roughly [-1, 1], not clamped."""
        z = latents / self.cfg.scale + self.cfg.shift
        return self.vae.decode(z.to(self.dtype)).sample


# ----------------------------------------------------------------------------- pixel space
class PixelSpace(nn.Module):
    """Identity "latent space" (``vae.source == "none"``): the decoder works on pixels.

    Moments are the images themselves (a deterministic encoder has no variance to store), so
    ``latents_from_moments`` is the identity too; ``moment_channels == channels == 3``.
    """

    is_pixel = True

    def __init__(self, cfg: Optional[VAEConfig] = None):
        super().__init__()
        self.cfg = cfg if cfg is not None else VAEConfig(source="none")

    @property
    def channels(self) -> int:
        return 3

    @property
    def moment_channels(self) -> int:
        return 3

    def latent_shape(self, image_size: int) -> Tuple[int, int, int]:
        return (3, image_size, image_size)

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def latents_from_moments(self, moments: torch.Tensor, generator: Optional[torch.Generator] = None,
                             noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        return moments

    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


def build_latent_space(cfg: VAEConfig, root: Optional[PathLike] = None) -> Union[LatentVAE, PixelSpace]:
    """``PixelSpace`` when ``cfg.source`` is "none", else a ``LatentVAE`` loaded from ``cfg.source``."""
    return PixelSpace(cfg) if cfg.is_pixel else LatentVAE(cfg, root)

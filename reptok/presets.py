"""Registry of named pipeline configs (timm style): ``get_preset("tiny")``.

- ``tiny``:  unit tests; pixel space 32x32, a 2-layer random ViT; seconds on a CPU.
- ``small``: the CPU quickstart; pixel space 16x16 on builtin:shapes, SSL-pretrained ViT.
- ``base`` / ``large`` / ``xl``: the paper's sizes on ImageNet 256 with DINOv2-B/14-reg and the
  SD-VAE. ``xl``'s decoder is the released one (width 1152, depth 28, head 72); its generator is
  the spec's best-guess XL MLP-Mixer (dim 1536, depth 28).
"""

from __future__ import annotations

from typing import Callable, Dict

from .config import (
    DecoderConfig,
    EncoderConfig,
    GeneratorConfig,
    PipelineConfig,
    SamplingConfig,
    TrainConfig,
    VAEConfig,
)

_PRESETS: Dict[str, Callable[[], PipelineConfig]] = {}
DEFAULT_PRESET = "small"  # what train recon / train gen / quickstart / info use without --preset


def register(name: str):
    def deco(fn):
        _PRESETS[name] = fn
        return fn

    return deco


def list_presets() -> list:
    return list(_PRESETS)


def get_preset(name: str) -> PipelineConfig:
    if name not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(_PRESETS)}")
    cfg = _PRESETS[name]()
    cfg.preset = name
    return cfg.validate()


def _tiny_vit(dim: int, depth: int, heads: int, patch: int, img: int) -> EncoderConfig:
    # init_values=1.0: with random weights DINOv2's LayerScale init (1e-5) would make the blocks
    # invisible and the cls output independent of the image.
    return EncoderConfig(
        model="vit_base_patch14_reg4_dinov2",
        weights="random",
        img_size=img,
        dim=dim,
        overrides=dict(embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch, init_values=1.0),
    )


# ----------------------------------------------------------------------------- CPU presets
@register("tiny")
def tiny() -> PipelineConfig:
    return PipelineConfig(
        image_size=32,
        encoder=_tiny_vit(dim=32, depth=2, heads=2, patch=8, img=32),
        vae=VAEConfig(source="none"),
        decoder=DecoderConfig(
            in_channels=3, input_size=32, patch_size=4, width=32, depth=2, head_dim=16,
            mapping_width=32, token_dim=32,
        ),
        generator=GeneratorConfig(token_dim=32, dim=64, depth=2, num_classes=10),
        sampling=SamplingConfig(steps=8, decoder_steps=8),
        train=TrainConfig(steps=20, batch_size=8, lr=1e-3, ema=0.9, log_every=5, ckpt_every=10, sample_every=10),
    )


@register("small")
def small() -> PipelineConfig:
    # 16 px: on a 2-core CPU the decoder learns class-correct shapes in ~5 minutes at 16 tokens
    # per image (patch 4); at 32 px / 64 tokens the same time buys a quarter of the images and
    # the samples stay blobs (benchmarks/oracle_decoder.py). The encoder is the same timm ViT
    # pre-trained offline, self-supervised (builtin:shapes-ssl): a random ViT's token barely knows
    # the class, and the method needs an SSL prior.
    enc = _tiny_vit(dim=64, depth=3, heads=2, patch=4, img=16)
    enc.weights = "builtin:shapes-ssl"
    return PipelineConfig(
        image_size=16,
        encoder=enc,
        vae=VAEConfig(source="none"),
        decoder=DecoderConfig(
            in_channels=3, input_size=16, patch_size=4, width=96, depth=3, head_dim=32,
            mapping_width=64, token_dim=64,
        ),
        # Generator space: the official scalar z / s (the default). Measured on the quickstart's
        # tokenizer and tokens, 800 x 128 generator steps, 480 samples (benchmarks/gen_shapes.py):
        # class accuracy at CFG 1 / 1.5 / 4 is 0.685 / 0.771 / 0.833 with scalar and 0.696 / 0.765 /
        # 0.831 with per_dim (generator U(0, 1) times for both); with logit-normal times 0.683 /
        # 0.767 / 0.842 (scalar) and 0.667 / 0.748 / 0.848 (per_dim, the previous default): no
        # difference beyond the +-0.017 standard error of 480 samples.
        generator=GeneratorConfig(token_dim=64, dim=256, depth=4, num_classes=12),
        # CFG 4 over the whole trajectory (DiT's scale for visuals; the official 1.5 inside
        # [0.3, 0.9] is ImageNet's FID optimum). Measured on the quickstart's models, 40 samples
        # per class (benchmarks/gen_shapes.py): in [0.3, 0.9] class accuracy is 0.68 / 0.70 / 0.75 /
        # 0.78 at CFG 1 / 1.5 / 3 / 4; over [0, 1] it is 0.82 / 0.83 / 0.85 at CFG 3 / 4 / 6 (bars
        # stop turning into crosses). Past 4 the gain is small and diversity goes.
        sampling=SamplingConfig(steps=25, decoder_steps=25, cfg=4.0, cfg_interval=(0.0, 1.0)),
        # A 3400-step run ends far from converged: cooling the lr down over the last 30% of the
        # steps sharpens the samples more than the same minutes at a constant lr.
        train=TrainConfig(steps=3400, batch_size=128, lr=1e-3, ema=0.995, cooldown=0.3, log_every=25,
                          ckpt_every=1000, sample_every=1000),
    )


# ----------------------------------------------------------------------------- paper sizes
def _imagenet(decoder: DecoderConfig, generator: GeneratorConfig) -> PipelineConfig:
    return PipelineConfig(
        image_size=256,
        encoder=EncoderConfig(),
        vae=VAEConfig(),
        decoder=decoder,
        generator=generator,
        sampling=SamplingConfig(),
        train=TrainConfig(steps=600_000, batch_size=256, lr=1e-4, ema=0.9999, ckpt_every=10_000, sample_every=10_000,
                          hflip=True),
    )


@register("base")
def base() -> PipelineConfig:
    return _imagenet(
        DecoderConfig(width=768, depth=12, head_dim=64, mapping_width=768),
        GeneratorConfig(dim=768, depth=12),
    )


@register("large")
def large() -> PipelineConfig:
    return _imagenet(
        DecoderConfig(width=1024, depth=24, head_dim=64, mapping_width=1024),
        GeneratorConfig(dim=1024, depth=24),
    )


@register("xl")
def xl() -> PipelineConfig:
    return _imagenet(DecoderConfig(), GeneratorConfig())

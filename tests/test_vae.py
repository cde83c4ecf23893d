"""LatentVAE / PixelSpace on a tiny random diffusers AutoencoderKL (no downloads)."""

from __future__ import annotations

import pytest
import torch

from reptok.config import VAEConfig
from reptok.errors import InputError
from reptok.models.vae import LatentVAE, PixelSpace, build_latent_space, resolve_vae_source

# The official SD-VAE layout at tiny widths (shared fixture tiny_vae/config.json): 4 levels, so
# downsampling by 8 and 4 latent channels, as sd-vae-ft-mse.
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
    block_out_channels=[8, 16, 16, 16], act_fn="silu", sample_size=256,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
)


def tiny_autoencoder(seed=0):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**TINY_VAE)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory holding ``vae/`` (a diffusers directory) — the checkpoint layout."""
    run = tmp_path_factory.mktemp("run")
    tiny_autoencoder().save_pretrained(run / "vae")
    return run


@pytest.fixture(scope="module")
def vae(run_dir):
    return LatentVAE(VAEConfig(source="vae"), root=run_dir)


def imgs(b=2, size=256, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_shapes_and_round_trip(vae):
    x = imgs()
    z = vae.encode(x, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 32, 32) == (2, *vae.latent_shape(256))
    m = vae.encode_moments(x)
    assert m.shape == (2, vae.moment_channels, 32, 32) == (2, 8, 32, 32)
    y = vae.decode(z)
    assert y.shape == (2, 3, 256, 256)
    # The round trip is diffusers' own encode -> posterior sample -> decode of the input
    # (AutoencoderKL.forward): catches a scale not undone, a shift of the wrong sign, or the
    # posterior mean / another draw taken for the sample.
    want = vae.vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(0)).sample
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)


def test_frozen_and_eval(vae):
    assert all(not p.requires_grad for p in vae.parameters())
    vae.train()
    assert not vae.vae.training


def test_official_conventions(vae):
    """encode = (posterior.sample(g) - shift) * scale; decode = vae.decode(z / scale + shift)."""
    x = imgs(1)
    ae = vae.vae
    post = ae.encode(x).latent_dist
    ref = (post.sample(generator=torch.Generator().manual_seed(4)) - 0.0) * 0.18215
    got = vae.encode(x, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, ref)
    # The cached path gives the same sample for the same generator.
    cached = vae.latents_from_moments(vae.encode_moments(x), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(cached, ref)
    torch.testing.assert_close(vae.decode(got), ae.decode(got / 0.18215).sample)


def test_latents_from_moments_clamps_logvar(vae):
    mean = torch.randn(1, 4, 2, 2)
    huge = torch.full((1, 4, 2, 2), 1e4)  # clamped to 20 -> std e^10, still finite
    tiny = torch.full((1, 4, 2, 2), -1e4)  # clamped to -30 -> ~deterministic
    out = vae.latents_from_moments(torch.cat([mean, tiny], 1))
    torch.testing.assert_close(out, mean * 0.18215, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(vae.latents_from_moments(torch.cat([mean, huge], 1))).all()


def test_from_module_and_subfolder(tmp_path):
    ae = tiny_autoencoder(1)
    wrapped = LatentVAE.from_module(ae, VAEConfig())
    assert wrapped.vae is ae and not any(p.requires_grad for p in ae.parameters())
    ae.save_pretrained(tmp_path / "repo" / "vae")
    loaded = LatentVAE(VAEConfig(source=str(tmp_path / "repo"), subfolder="vae"))
    x = imgs(1, 64)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    torch.testing.assert_close(loaded.encode(x, g()), wrapped.encode(x, g()))


def test_missing_or_bad_directory_errors(tmp_path):
    with pytest.raises(InputError, match="VAE directory not found: 'vae'"):
        LatentVAE(VAEConfig(source="vae"), root=tmp_path)
    with pytest.raises(InputError, match="not found"):
        LatentVAE(VAEConfig(source=str(tmp_path / "nowhere" / "vae")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="config.json"):
        LatentVAE(VAEConfig(source="empty"), root=tmp_path)


def test_config_mismatch_is_reported():
    with pytest.raises(InputError, match="latent_channels"):
        LatentVAE.from_module(tiny_autoencoder(), VAEConfig(latent_channels=8))
    with pytest.raises(InputError, match="downsample"):
        LatentVAE.from_module(tiny_autoencoder(), VAEConfig(downsample=16))


def test_resolve_source(tmp_path):
    assert resolve_vae_source("stabilityai/sd-vae-ft-mse") == ("stabilityai/sd-vae-ft-mse", False)
    (tmp_path / "vae").mkdir()
    assert resolve_vae_source("vae", tmp_path) == (str(tmp_path / "vae"), True)
    assert resolve_vae_source(str(tmp_path / "vae")) == (str(tmp_path / "vae"), True)


def test_pixel_space_and_builder(run_dir):
    px = build_latent_space(VAEConfig(source="none"))
    assert isinstance(px, PixelSpace) and px.is_pixel
    x = imgs(2, 32)
    assert px.encode(x) is x and px.decode(x) is x
    assert px.latents_from_moments(px.encode_moments(x)) is x
    assert px.latent_shape(32) == (3, 32, 32) and px.moment_channels == px.channels == 3
    assert isinstance(build_latent_space(VAEConfig(source="vae"), root=run_dir), LatentVAE)

"""builtin:shapes-ssl: the offline SimCLR-pretrained encoder of the CPU presets."""

import dataclasses

import numpy as np
import pytest
import torch

from reptok.errors import InputError
from reptok.shapes import ssl as ssl_shapes
from reptok.models.encoder import SSLEncoder, build_vit
from reptok.presets import get_preset


@pytest.fixture
def quick_ssl(monkeypatch, tmp_path):
    """A few SSL steps on a few images, cached in a fresh directory."""
    monkeypatch.setenv("REPTOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ssl_shapes, "DEFAULT_STEPS", 4)
    monkeypatch.setattr(ssl_shapes, "DEFAULT_IMAGES", 48)
    monkeypatch.setattr(ssl_shapes, "DEFAULT_BATCH", 16)
    cfg = get_preset("tiny").encoder
    cfg.weights = "builtin:shapes-ssl"
    return cfg


def test_render_views_same_object_other_geometry_and_background():
    views, geom = ssl_shapes.render_views(6, 32, seed=3)
    assert views.shape == (2, 6, 3, 32, 32) and views.dtype == np.uint8 and geom.shape == (2, 6, 4)
    a, b = views[0].astype(int), views[1].astype(int)
    assert not np.array_equal(a, b)
    assert (np.abs(geom[0, :, :2] - geom[1, :, :2]).max(1) > 0).all()  # the object moved
    # The object is the saturated part: in both views it has the same colour (same class and
    # colour jitter) and sits where the geometry says.
    for v in range(2):
        for i in range(6):
            img = views[v, i].astype(int)
            sat = (img.max(0) - img.min(0)) > 100
            ys, xs = np.nonzero(sat)
            assert abs(xs.mean() + 0.5 - geom[v, i, 0] * 32) < 2.5 and abs(ys.mean() + 0.5 - geom[v, i, 1] * 32) < 2.5
    colour = [[views[v, i][:, (views[v, i].max(0).astype(int) - views[v, i].min(0)) > 100].mean(1) for i in range(6)]
              for v in range(2)]
    np.testing.assert_allclose(colour[0], colour[1], atol=12)
    v2, g2 = ssl_shapes.render_views(6, 32, seed=3)
    np.testing.assert_array_equal(views, v2)
    np.testing.assert_array_equal(geom, g2)


def test_transform_targets_shift_scale_rotation():
    g1 = torch.tensor([[0.25, 0.5, float(np.log(0.2)), 0.0]])
    g2 = torch.tensor([[0.5, 0.25, float(np.log(0.4)), float(np.pi / 2)]])  # a quarter turn: a cross looks the same
    t = ssl_shapes.transform_targets(g1, g2)[0]
    torch.testing.assert_close(t, torch.tensor([0.25, -0.25, float(np.log(2)), -1.0, 0.0, 1.0, 0.0]), atol=1e-6, rtol=0)


def test_sincos_pos_embed_distinguishes_positions():
    pe = ssl_shapes.sincos_pos_embed(64, (4, 4))
    assert pe.shape == (16, 64)
    d = torch.cdist(pe, pe)
    assert (d + torch.eye(16) * 10).min() > 0.1  # every grid cell has its own code


def test_augment_keeps_shape_and_range():
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    g = torch.Generator().manual_seed(0)
    y = ssl_shapes.augment(x, g)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1 and not torch.allclose(x, y)


def test_info_nce_prefers_matching_views():
    a = torch.randn(8, 4)
    assert ssl_shapes.info_nce(a, a + 0.01 * torch.randn(8, 4)) < ssl_shapes.info_nce(a, torch.randn(8, 4))


def test_pretrain_changes_weights_and_lowers_loss(quick_ssl):
    state, meta = ssl_shapes.pretrain(quick_ssl, steps=12, n_images=48, batch_size=16)
    rand = build_vit(dataclasses.replace(quick_ssl, weights="random")).state_dict()
    assert set(state) == set(rand)
    assert any(not torch.equal(state[k], rand[k]) for k in state)
    assert meta["method"] == "simclr+equivariance" and np.isfinite(meta["final_loss"])
    assert np.isfinite(meta["final_equivariance_loss"])


def test_builtin_weights_train_once_then_cached(quick_ssl, capsys):
    enc = ssl_shapes.build_encoder(quick_ssl)  # trains (4 steps) and caches
    path = ssl_shapes.cache_path(quick_ssl)
    assert path.exists()
    err = capsys.readouterr()
    assert "pre-training" in err.err and err.out == ""  # stdout stays clean for --json
    mtime = path.stat().st_mtime_ns
    enc2 = ssl_shapes.build_encoder(quick_ssl)
    assert path.stat().st_mtime_ns == mtime and "pre-training" not in capsys.readouterr().err
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(enc(x), enc2(x))
    rand = SSLEncoder(dataclasses.replace(quick_ssl, weights="random"))
    assert not torch.allclose(enc(x), rand(x))


def test_unknown_builtin_weights(quick_ssl):
    quick_ssl.weights = "builtin:nope"
    with pytest.raises(InputError, match="builtin:shapes-ssl"):
        ssl_shapes.build_encoder(quick_ssl)


def test_models_layer_never_trains_builtin_weights(quick_ssl):
    # The models layer cannot resolve builtin:* itself (that would make it import the shapes world).
    with pytest.raises(InputError, match="reptok.shapes.ssl"):
        SSLEncoder(quick_ssl)
    assert not ssl_shapes.cache_path(quick_ssl).exists()


def test_pipeline_build_never_pretrains_a_builtin_encoder(quick_ssl):
    # Pipeline.build without a resolver refuses a builtin encoder instead of pre-training it as a
    # side effect; load_weights=False (a run's own weights come next) needs no builtin file at all.
    from reptok.pipeline import Pipeline

    cfg = get_preset("tiny")
    cfg.encoder = quick_ssl
    with pytest.raises(InputError, match="builtin"):
        Pipeline.build(cfg, components=("encoder",))
    assert Pipeline.build(cfg, components=("encoder",), load_weights=False).encoder is not None
    assert not ssl_shapes.cache_path(quick_ssl).exists()

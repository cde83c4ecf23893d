"""builtin:shapes-ssl: the offline SimCLR-pretrained encoder of the CPU presets."""

import dataclasses

import numpy as np
import pytest
import torch

from reptok.errors import InputError
from reptok.models import ssl_shapes
from reptok.models.encoder import SSLEncoder, build_vit
from reptok.presets import get_preset


@pytest.fixture
def quick_ssl(monkeypatch, tmp_path):
    """A few SimCLR steps on a few images, cached in a fresh directory."""
    monkeypatch.setenv("REPTOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ssl_shapes, "DEFAULT_STEPS", 4)
    monkeypatch.setattr(ssl_shapes, "DEFAULT_IMAGES", 48)
    monkeypatch.setattr(ssl_shapes, "DEFAULT_BATCH", 16)
    cfg = get_preset("tiny").encoder
    cfg.weights = "builtin:shapes-ssl"
    return cfg


def test_render_pairs_same_object_other_background():
    pairs = ssl_shapes.render_pairs(6, 32, seed=3)
    assert pairs.shape == (2, 6, 3, 32, 32) and pairs.dtype == np.uint8
    a, b = pairs[0].astype(int), pairs[1].astype(int)
    assert not np.array_equal(a, b)
    # The object is the saturated part: its pixels have a large channel spread in both views.
    sat_a = (a.max(1) - a.min(1)) > 100
    sat_b = (b.max(1) - b.min(1)) > 100
    overlap = (sat_a & sat_b).sum((1, 2)) / np.maximum((sat_a | sat_b).sum((1, 2)), 1)
    assert (overlap > 0.8).all()
    np.testing.assert_array_equal(pairs, ssl_shapes.render_pairs(6, 32, seed=3))


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
    assert meta["method"] == "simclr" and np.isfinite(meta["final_loss"])


def test_builtin_weights_train_once_then_cached(quick_ssl, capsys):
    enc = SSLEncoder(quick_ssl)  # trains (4 steps) and caches
    path = ssl_shapes.cache_path(quick_ssl)
    assert path.exists()
    err = capsys.readouterr()
    assert "pre-training" in err.err and err.out == ""  # stdout stays clean for --json
    mtime = path.stat().st_mtime_ns
    enc2 = SSLEncoder(quick_ssl)
    assert path.stat().st_mtime_ns == mtime and "pre-training" not in capsys.readouterr().err
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(enc(x), enc2(x))
    rand = SSLEncoder(dataclasses.replace(quick_ssl, weights="random"))
    assert not torch.allclose(enc(x), rand(x))


def test_unknown_builtin_weights(quick_ssl):
    quick_ssl.weights = "builtin:nope"
    with pytest.raises(InputError, match="builtin:shapes-ssl"):
        SSLEncoder(quick_ssl)

"""The shapes judge: trained on demand, cached, accurate on fresh shapes."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from reptok.shapes.render import SHAPES_VERSION, make_shapes
from reptok.shapes import judge as J


def _float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_small_judge_trains_caches_and_predicts(tmp_path):
    # A quick judge (a few seconds); the default one is tested below.
    j = J.load_judge(cache_dir=tmp_path, n_train=3000, steps=100)
    assert not j.from_cache and j.path.exists() and j.path.parent == tmp_path
    assert j.path.name != J.judge_cache_path(tmp_path).name  # never shadows the default judge
    fresh = make_shapes(600, 32, seed=4242)
    x = _float(fresh["images"])
    acc = j.accuracy(x, fresh["labels"])
    assert acc >= 0.8, acc
    pred = j.predict(x)
    assert pred.dtype == torch.int64 and pred.shape == (600,)
    assert J.colour_accuracy(pred, fresh["labels"]) >= 0.95
    assert J.shape_accuracy(pred, fresh["labels"]) >= acc - 1e-9

    # Second load comes from the cache and behaves identically.
    t0 = time.perf_counter()
    j2 = J.load_judge(cache_dir=tmp_path, n_train=3000, steps=100)
    assert j2.from_cache and time.perf_counter() - t0 < 5
    assert torch.equal(j2.predict(x), pred)
    assert j2.meta["heldout_accuracy"] == pytest.approx(j.meta["heldout_accuracy"])

    # FeatureExtractor-style call on uint8 (B, H, W, 3).
    out = j(fresh["images"][:5])
    assert out["features"].shape == (5, 128) and out["features"].dtype == np.float32
    assert out["logits"].shape == (5, 12) and out["logits"].dtype == np.float32
    assert j.name == "judge"
    np.testing.assert_array_equal(out["logits"].argmax(1), pred[:5].numpy())

    # Other resolutions are resized to 32.
    big = make_shapes(120, 64, seed=4243)
    assert j.accuracy(_float(big["images"]), big["labels"]) >= 0.7


def test_corrupt_cache_is_retrained(tmp_path):
    path = J.judge_cache_path(tmp_path, n_train=256, epochs=1, steps=2)
    path.write_bytes(b"not safetensors")
    j = J.load_judge(cache_dir=tmp_path, n_train=256, epochs=1, steps=2)
    assert not j.from_cache
    assert J.load_judge(cache_dir=tmp_path, n_train=256, epochs=1, steps=2).from_cache


def test_accuracy_helpers():
    target = np.array([0, 1, 2, 3, 4, 5])
    # index 1: right shape, wrong colour; 3 and 5: wrong shape, right colour
    pred = torch.tensor([0, 2, 2, 0, 4, 11])
    assert J.shape_accuracy(pred, target) == pytest.approx(4 / 6)
    assert J.colour_accuracy(pred, target) == pytest.approx(5 / 6)


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("REPTOK_CACHE", str(tmp_path / "c"))
    assert J.judge_cache_path().parent == tmp_path / "c"
    assert J.judge_cache_path().name == f"judge-v{J.JUDGE_VERSION}s{SHAPES_VERSION}.safetensors"


@pytest.mark.slow
def test_default_judge_under_a_minute_and_accurate(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the budget is one core
    try:
        t0 = time.perf_counter()
        j = J.load_judge(cache_dir=tmp_path)
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    assert not j.from_cache
    fresh = make_shapes(2000, 32, seed=31337)
    acc = j.accuracy(_float(fresh["images"]), fresh["labels"])
    assert acc > 0.95, acc
    assert j.meta["heldout_accuracy"] > 0.95
    assert seconds < 90, seconds  # ~35 s on an idle core; slack for a shared machine

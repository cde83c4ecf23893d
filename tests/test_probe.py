"""``reptok eval probe`` and reptok/evaluate/probe.py: the split, the logistic probe, and a run
on the shared tiny tokenizer (class_runs) with 96 held-out builtin:shapes images."""

import json

import numpy as np
import pytest
import torch

from clihelp import cli, last_json
from reptok.evaluate.probe import logistic_probe, stratified_split


def test_stratified_split_is_seeded_per_class_and_disjoint():
    labels = np.repeat([3, 7, 9], [10, 5, 1])  # a single-image class stays in training
    tr, te = stratified_split(labels, 0.2, seed=1)
    assert sorted(np.r_[tr, te].tolist()) == list(range(16))
    assert np.bincount(labels[te], minlength=10)[[3, 7, 9]].tolist() == [2, 1, 0]
    again = stratified_split(labels, 0.2, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip((tr, te), again))
    assert not np.array_equal(te, stratified_split(labels, 0.2, seed=2)[1])


def test_logistic_probe_separable_vs_uninformative():
    """Catches a probe that ignores the features, one that fits the test rows, and
    standardising with the test rows' statistics (the offset of the test rows would leak)."""
    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    x = rng.standard_normal((90, 5)) + 4.0 * np.eye(5)[y] * 3  # class c shifts feature c
    tr, te = stratified_split(y, 0.3, 0)
    assert logistic_probe(x, y, tr, te) == {"accuracy": 1.0, "train_accuracy": 1.0}
    noise = rng.standard_normal((90, 5))
    assert logistic_probe(noise, y, tr, te)["accuracy"] < 0.6
    # Test rows shifted far away: with train statistics every test row lands in one class.
    far = x.copy()
    far[te] += 100.0
    assert logistic_probe(far, y, tr, te)["accuracy"] == pytest.approx(1 / 3)


@pytest.fixture(scope="module")
def probe_data(class_runs, tmp_path_factory):
    from reptok.data.prep import prepare

    root = tmp_path_factory.mktemp("probe")
    prepare("builtin:shapes", root / "shapes96", limit=96)
    return class_runs, root / "shapes96"


def test_probe_cli_beats_chance_and_prints_both_rows(probe_data):
    runs, data = probe_data
    res = cli("eval", "probe", "--ckpt", runs / "tok", "--data", data, "-q")
    assert res.stderr == ""
    assert "fine-tuned" in res.stdout and "frozen SSL" in res.stdout and "mean cosine" in res.stdout
    out = last_json(cli("eval", "probe", "--ckpt", runs / "tok", "--data", data, "--json", "-q"))
    rows = {r["token"]: r for r in out["rows"]}
    assert set(rows) == {"fine-tuned", "frozen SSL"} and (out["n_train"], out["n_test"]) == (72, 24)
    assert out["chance"] == pytest.approx(2 / 24, abs=1e-6)  # 2 test images per class
    assert min(r["accuracy"] for r in rows.values()) >= 3 * out["chance"]
    # The mean cosine, recomputed from the encoder's two tokens.
    from reptok.data.dataset import PreparedDataset
    from reptok.pipeline import Pipeline

    enc = Pipeline.from_run(runs / "tok", "cpu", components=("encoder",)).encoder
    x = PreparedDataset(data).get_batch(np.arange(96))["image"]
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(enc(x).double(), enc.forward_frozen(x).double()).mean()
    assert out["mean_cosine"] == pytest.approx(float(cos), abs=2e-6) and out["mean_cosine"] < 1.0


def test_probe_needs_labels_and_a_matching_resolution(probe_data, tmp_path):
    from reptok.data.prep import prepare

    runs, _ = probe_data
    prepare("builtin:shapes", tmp_path / "big", limit=4, resolution=64)
    res = cli("eval", "probe", "--ckpt", runs / "tok", "--data", tmp_path / "big", code=2)
    assert res.output.count("error:") == 1 and "--resolution 32" in res.output
    res = cli("eval", "probe", "--ckpt", runs / "tok", "--data", runs / "data", "--test-fraction", 1.5, code=2)
    assert "--test-fraction" in res.output

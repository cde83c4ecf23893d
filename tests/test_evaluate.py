"""``reptok eval recon`` / ``reptok eval gen`` end to end on tiny runs (CPU, offline).

Real runs use ``--features judge`` (a randomly initialised judge placed in the cache, so nothing
trains); the Inception path runs on a few images with a randomly initialised FIDInceptionV3
saved to a temp file (the real weights are not available offline).
"""

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from reptok_cli.app import app

from clihelp import cli, last_json, tiny_chain  # noqa: E402

runner = CliRunner()

GEN_KEYS = {"fid", "inception_score", "precision", "recall", "n_samples", "n_ref", "features"}
RECON_KEYS = GEN_KEYS | {"psnr", "ssim", "rfid", "n"}




@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """builtin:shapes (16 images, 32 px) -> tiny tokenizer (2 steps) -> tokens -> tiny generator
    (2 steps) -> 24 samples in ADM .npz (like quickstart's samples_eval.npz); a PNG copy of the
    data; a random judge in a private cache; random FID Inception weights."""
    from PIL import Image

    from reptok.io import save_tensors
    from reptok.data.dataset import PreparedDataset
    from reptok.evaluate import FIDInceptionV3
    from reptok.shapes.judge import JudgeNet, judge_cache_path

    root = tiny_chain(tmp_path_factory.mktemp("eval"), 16, 2, 2, recon_args=("--sample-every", 0, "--batch-size", 8))
    cli("sample", "--ckpt", root / "gen", "--class", "all", "-n", 2, "--out", root / "samples.npz",
        "--decoder-steps", 2, "--steps", 2)
    ds = PreparedDataset(root / "data")
    (root / "ref_png").mkdir()
    for i, im in enumerate(ds.get_uint8(np.arange(len(ds)))):
        Image.fromarray(im).save(root / "ref_png" / f"{i:03d}.png")
    torch.manual_seed(0)
    save_tensors(judge_cache_path(root / "cache"), JudgeNet().state_dict(), metadata={"heldout_accuracy": 0.0})
    torch.save(FIDInceptionV3().state_dict(), root / "inception.pth")
    return root


@pytest.fixture
def judge_cache(env, monkeypatch):
    monkeypatch.setenv("REPTOK_CACHE", str(env / "cache"))
    return env


@pytest.fixture
def offline(monkeypatch):
    def refuse(*a, **k):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """No FID Inception weights anywhere, and no network."""
    from reptok.evaluate import inception

    for var in ("TORCH_HOME", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.setenv(var, str(tmp_path / "empty" / var.lower()))

    def fail():
        raise OSError("no network")

    monkeypatch.setattr(inception, "_download_weights", fail)


# ----------------------------------------------------------------------------- eval gen
def _ref_images(env) -> np.ndarray:
    from reptok.data.dataset import PreparedDataset

    ds = PreparedDataset(env / "data")
    return ds.get_uint8(np.arange(len(ds)))


def _by_hand(fake: np.ndarray, real: np.ndarray, k: int) -> dict:
    """FID, improved precision / recall and IS from the judge's features, written out with numpy:
    Tr sqrtm(S1 S2) as the sum of the square roots of the product's (real, >= 0) eigenvalues; a
    sample is inside a set's manifold when within the k-th neighbour distance of one of its
    members; IS = exp(mean KL(p(y|x) || p(y))), averaged over splits at i * N // splits."""
    from reptok.evaluate.commands import IS_SPLITS
    from reptok.shapes.judge import load_judge

    judge = load_judge("cpu")
    f, r = judge(fake), judge(real)
    a, b = f["features"].astype(np.float64), r["features"].astype(np.float64)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    roots = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    fid = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * roots

    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    d = np.linalg.norm(b[:, None] - a[None], axis=-1)  # (real, fake)
    precision = (d <= radii(b)[:, None]).any(0).mean()
    recall = (d <= radii(a)[None, :]).any(1).mean()
    logits = f["logits"].astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    n, splits = len(p), min(IS_SPLITS, len(p))
    for part in (p[i * n // splits:(i + 1) * n // splits] for i in range(splits)):  # in order, ADM's bounds
        py = part.mean(0, keepdims=True)
        scores.append(np.exp((part * (np.log(part) - np.log(py))).sum(1).mean()))
    return {"fid": fid, "precision": precision, "recall": recall, "is": float(np.mean(scores))}


def test_gen_npz_vs_png_folder(judge_cache, offline, tmp_path):
    import shutil

    env = judge_cache
    samples = shutil.copy(env / "samples.npz", tmp_path / "samples.npz")  # results go next to them
    res = cli("eval", "gen", "--samples", samples, "--ref", env / "ref_png", "--features", "judge", "--json")
    out = last_json(res)
    assert GEN_KEYS <= set(out)
    assert out["n_samples"] == 24 and out["n_ref"] == 16
    assert out["features"]["name"] == "judge" and "judge" in out["features"]["description"]
    want = _by_hand(np.load(env / "samples.npz")["arr_0"], _ref_images(env), out["k"])
    assert out["fid"] == pytest.approx(want["fid"], rel=1e-2, abs=1e-2)
    assert out["precision"] == pytest.approx(want["precision"]) and out["recall"] == pytest.approx(want["recall"])
    assert out["inception_score"] == pytest.approx(want["is"], rel=1e-4)
    assert any("12 classes" in n for n in out["notes"])
    # results written next to the samples, same numbers
    saved = json.loads((tmp_path / "samples.eval.json").read_text())
    assert saved["fid"] == out["fid"] and saved["precision"] == out["precision"]
    assert "FID" in res.stderr and "precision" in res.stderr


def test_gen_vs_prepared_dataset_quickstart_like_offline(judge_cache, offline, tmp_path):
    env = judge_cache
    a = last_json(cli("eval", "gen", "--samples", env / "samples.npz", "--ref", env / "data", "--features", "judge",
                      "--json", "--out", tmp_path / "a.json"))
    b = last_json(cli("eval", "gen", "--samples", env / "samples.npz", "--ref", env / "ref_png", "--features", "judge",
                      "--json", "--out", tmp_path / "b.json"))
    # The same 16 images as a prepared dataset or as PNGs give the same numbers.
    for key in ("fid", "precision", "recall", "n_ref"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert a["ref"]["kind"] == "prepared"
    # A folder of samples gets <folder>/eval.json; --limit applies to both sets.
    import shutil

    pngs = shutil.copytree(env / "ref_png", tmp_path / "ref_png")  # the shared folder stays as it is
    c = last_json(cli("eval", "gen", "--samples", pngs, "--ref", env / "data", "--features", "judge",
                      "--limit", 10, "--json"))
    assert c["n_samples"] == 10 and c["n_ref"] == 10 and c["fid"] == pytest.approx(0, abs=1e-4)
    assert c["precision"] == 1.0 and c["recall"] == 1.0
    assert (pngs / "eval.json").exists() and not (env / "ref_png" / "eval.json").exists()


def test_gen_vs_reference_stats_npz(judge_cache, tmp_path):
    from reptok.evaluate import compute_stats, load_images
    from reptok.shapes.judge import load_judge

    env = judge_cache
    st = compute_stats(load_judge(), load_images(str(env / "ref_png")))
    np.savez(tmp_path / "stats.npz", mu=st["mu"], sigma=st["sigma"])  # stats only, no arr_0
    imgs = np.stack(list(load_images(str(env / "ref_png")).batches(100)))[0]
    np.savez(tmp_path / "full.npz", arr_0=imgs, mu=st["mu"], sigma=st["sigma"])
    base = ["eval", "gen", "--samples", env / "samples.npz", "--features", "judge", "--json"]
    direct = last_json(cli(*base, "--ref", env / "ref_png", "--out", tmp_path / "d.json"))

    only = last_json(cli(*base, "--ref", tmp_path / "stats.npz", "--out", tmp_path / "s.json"))
    assert only["fid"] == pytest.approx(direct["fid"], rel=1e-5, abs=1e-6)
    assert only["precision"] is None and only["recall"] is None and only["n_ref"] is None
    assert any("only mu/sigma" in n for n in only["notes"])

    full = last_json(cli(*base, "--ref", tmp_path / "full.npz", "--out", tmp_path / "f.json"))
    assert full["fid"] == pytest.approx(direct["fid"], rel=1e-5, abs=1e-6)
    assert full["precision"] == direct["precision"] and full["n_ref"] == 16
    assert full["ref"]["fid_stats"] == "precomputed mu/sigma"

    # 2048-d (Inception) statistics cannot be compared with judge features.
    np.savez(tmp_path / "inc.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    res = cli(*base, "--ref", tmp_path / "inc.npz", code=2)
    assert "2048-d" in res.output and "--features inception" in res.output


@pytest.fixture
def fast_fid(monkeypatch):
    """scipy's sqrtm of a 2048 x 2048 matrix takes ~20 s on one core: check that the Inception
    statistics reach the FID as 2048-d, then compute it on the first 64 dimensions (the formula
    itself is tested in test_metrics.py)."""
    from reptok.evaluate import commands as run, metrics

    seen = []

    def fid64(mu1, sigma1, mu2, sigma2):
        seen.append((np.shape(mu1), np.shape(sigma1), np.shape(mu2), np.shape(sigma2)))
        d = slice(0, 64)
        return metrics.frechet_distance(mu1[d], sigma1[d, d], mu2[d], sigma2[d, d])

    monkeypatch.setattr(run, "frechet_distance", fid64)
    return seen


def test_gen_inception_path_random_weights(env, tmp_path, offline, fast_fid):
    from PIL import Image

    # Reference at another size: fine for Inception (everything is resized to 299), with a note.
    ref = tmp_path / "ref48"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    out = last_json(cli("eval", "gen", "--samples", env / "samples.npz", "--ref", ref, "--limit", 4,
                        "--inception-weights", env / "inception.pth", "--batch-size", 4, "--json",
                        "--out", tmp_path / "r.json"))
    assert GEN_KEYS <= set(out) and out["features"]["name"] == "inception"
    assert str(env / "inception.pth") in out["features"]["description"]
    assert np.isfinite(out["fid"]) and np.isfinite(out["inception_score"])
    assert out["precision"] is not None and out["n_samples"] == 4 and out["n_ref"] == 4
    assert any("299x299" in n for n in out["notes"])
    assert any("50,000" in n and "Inception Score" in n and "1 chunk(s)" in n for n in out["notes"])
    assert fast_fid == [((2048,), (2048, 2048), (2048,), (2048, 2048))]
    # Everything needed to compare two numbers is recorded.
    import hashlib

    proto = out["protocol"]
    assert proto["features_weights_sha256"] == hashlib.sha256((env / "inception.pth").read_bytes()).hexdigest()
    assert (proto["is_rule"], proto["pr_distances"], proto["batch_size"], proto["feature_batch"]) == ("adm", "adm", 4, 1)
    assert "TF32 off" in proto["numerics"] and proto["tool"].startswith("reptok ")


# ----------------------------------------------------------------------------- eval recon
def test_recon_tiny_tokenizer(judge_cache, offline, tmp_path):
    import shutil

    env = judge_cache
    tok = shutil.copytree(env / "tok", tmp_path / "tok")  # eval_recon.json goes into the run
    res = cli("eval", "recon", "--ckpt", tok, "--data", env / "data", "--limit", 8, "--decoder-steps", 2,
              "--features", "judge", "--batch-size", 5, "--json")
    out = last_json(res)
    assert RECON_KEYS <= set(out)
    assert out["n"] == 8 and out["decoder_steps"] == 2
    assert np.isfinite(out["psnr"]) and -1 <= out["ssim"] <= 1 and np.isfinite(out["rfid"])
    assert out["fid"] == out["rfid"]
    assert any("trained on" in n for n in out["notes"])  # training data flagged as not held out
    saved = json.loads((tok / "eval_recon.json").read_text())
    assert saved["psnr"] == out["psnr"]
    # Deterministic: same seed, same numbers (noise from (seed, image index)).
    again = last_json(cli("eval", "recon", "--ckpt", tok, "--overwrite", "--data", env / "data", "--limit", 8,
                          "--decoder-steps", 2, "--features", "judge", "--json"))
    assert again["psnr"] == out["psnr"] and again["ssim"] == out["ssim"]


def test_recon_inception_path_random_weights(env, tmp_path, offline, fast_fid):
    out = last_json(cli("eval", "recon", "--ckpt", env / "tok", "--data", env / "data", "--limit", 4,
                        "--decoder-steps", 1, "--inception-weights", env / "inception.pth", "--json",
                        "--out", tmp_path / "r.json"))
    assert RECON_KEYS <= set(out) and out["features"]["name"] == "inception" and out["n"] == 4
    assert np.isfinite(out["rfid"]) and np.isfinite(out["inception_score"])
    assert json.loads((tmp_path / "r.json").read_text())["rfid"] == out["rfid"]
    assert len(fast_fid) == 1


# ----------------------------------------------------------------------------- failures
def test_missing_inception_weights_fail_before_work(env, no_weights, monkeypatch, tmp_path):
    from reptok.evaluate import commands as run
    from reptok.pipeline import Pipeline

    def must_not_run(*a, **k):
        raise AssertionError("work started before the Inception weights were found")

    monkeypatch.setattr(Pipeline, "from_run", must_not_run)
    monkeypatch.setattr(run, "_extract", must_not_run)
    res = cli("eval", "recon", "--ckpt", env / "tok", "--data", env / "data", "--out", tmp_path / "r.json", code=2)
    assert "pt_inception-2015-12-05" in res.output and "--inception-weights" in res.output
    res = cli("eval", "gen", "--samples", env / "samples.npz", "--ref", env / "data", "--out", tmp_path / "g.json",
              code=2)
    assert "--inception-weights" in res.output
    res = cli("eval", "gen", "--samples", env / "samples.npz", "--ref", env / "data",
              "--inception-weights", tmp_path / "nope.pth", code=2)
    assert "nope.pth" in res.output
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "g.json").exists()


def test_not_an_inception_file_is_exit_2(env, tmp_path):
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    res = cli("eval", "gen", "--samples", env / "samples.npz", "--ref", env / "data",
              "--inception-weights", tmp_path / "bad.pth", code=2)
    assert "not the FID Inception state dict" in res.output


@pytest.mark.parametrize("case", ["empty_folder", "wrong_shape_npz", "float_npz", "missing", "one_image",
                                  "bad_features", "no_arr0_samples"])
def test_bad_sample_sets_exit_2(judge_cache, tmp_path, case):
    env = judge_cache
    samples = tmp_path / "s.npz"
    if case == "empty_folder":
        samples = tmp_path / "empty"
        samples.mkdir()
    elif case == "wrong_shape_npz":
        np.savez(samples, arr_0=np.zeros((4, 32, 32), np.uint8))
    elif case == "float_npz":
        np.savez(samples, arr_0=np.zeros((4, 32, 32, 3), np.float32))
    elif case == "missing":
        samples = tmp_path / "missing.npz"
    elif case == "one_image":
        np.savez(samples, arr_0=np.zeros((1, 32, 32, 3), np.uint8))
    elif case == "no_arr0_samples":
        np.savez(samples, mu=np.zeros(3), sigma=np.eye(3))
    else:
        samples = env / "samples.npz"
    features = "bogus" if case == "bad_features" else "judge"
    res = cli("eval", "gen", "--samples", samples, "--ref", env / "data", "--features", features, code=2)
    assert "error:" in res.output and "Traceback" not in res.output
    assert not Path(str(samples)).with_name("s.eval.json").exists()


def test_recon_bad_inputs_exit_2(judge_cache, tmp_path):
    env = judge_cache
    res = cli("eval", "recon", "--ckpt", env / "tok", "--data", tmp_path, "--features", "judge", code=2)
    assert "not a prepared dataset" in res.output
    res = cli("eval", "recon", "--ckpt", tmp_path, "--data", env / "data", "--features", "judge", code=2)
    assert "not a reptok run" in res.output
    res = cli("eval", "recon", "--ckpt", env / "tok", "--data", env / "data", "--features", "judge",
              "--solver", "rk4", code=2)
    assert "euler" in res.output
    for opt, val, choices in (("--is-rule", "adm5000", "splits10"), ("--pr-distances", "fp16", "float64")):
        res = cli("eval", "recon", "--ckpt", env / "tok", "--data", env / "data", "--features", "judge",
                  opt, val, code=2)  # a typo in a rule name: refused before any work
        assert res.output.count("error:") == 1 and choices in res.output


def test_eval_reads_every_image_kind_data_prep_reads(tmp_path):
    # One extension list for prep and eval: a .tif / .gif folder prep accepts must not be "empty" here.
    from PIL import Image
    from reptok.evaluate import load_images

    pix = np.zeros((4, 4, 3), np.uint8)
    pix[1, 2] = (200, 10, 30)
    Image.fromarray(pix).save(tmp_path / "a.tif")
    Image.fromarray(pix).save(tmp_path / "b.GIF", format="GIF")
    (tmp_path / "c.txt").write_text("not an image")
    imgs = np.concatenate(list(load_images(str(tmp_path)).batches(10)))
    assert imgs.shape == (2, 4, 4, 3)
    assert tuple(imgs[0, 1, 2]) == (200, 10, 30)  # the lossless .tif, pixel for pixel

"""Evaluation core: FID / IS / precision-recall / PSNR / SSIM, the FID Inception network (random
weights, no download), and the image-set loaders. CPU only, no network, a few seconds."""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg

from reptok.evaluate import inception as inc
from reptok.evaluate import metrics
from reptok.evaluate import (
    EvalInputError,
    FeatureExtractor,
    FIDInceptionExtractor,
    FIDInceptionV3,
    InceptionWeightsMissing,
    compute_stats,
    feature_stats,
    find_fid_inception_weights,
    frechet_distance,
    images_to_uint8,
    inception_score,
    load_fid_inception,
    load_images,
    load_reference_stats,
    precision_recall,
    preprocess_for_inception,
    psnr,
    ssim,
)


# ----------------------------------------------------------------------------- helpers
def _direct_fid(f1, f2):
    """The textbook formula straight from scipy, for comparison."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def _eig_fid(f1, f2):
    """Independent route: Tr sqrt(S1 S2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))) (symmetric PSD)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).sum())


def _brute_pr(real, fake, k):
    def dists(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    r_rad = np.sort(dists(real, real), axis=1)[:, k]
    f_rad = np.sort(dists(fake, fake), axis=1)[:, k]
    d = dists(real, fake)  # (n_real, n_fake)
    precision = (d <= r_rad[:, None]).any(0).mean()
    recall = (d <= f_rad[None, :]).any(1).mean()
    return precision, recall


def _pattern(n, h, w, seed=0):
    """Deterministic uint8 (n, h, w, 3) images without relying on an RNG stream."""
    i, j, c = np.meshgrid(np.arange(h), np.arange(w), np.arange(3), indexing="ij")
    return np.stack([((i * (7 + s) + j * (13 + 2 * s) + c * 31 + 17 * seed + (i * j) % 11) % 256)
                     for s in range(n)]).astype(np.uint8)


# ----------------------------------------------------------------------------- FID
def test_feature_stats_matches_numpy():
    f = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float32)
    mu, sigma = feature_stats(torch.from_numpy(f))
    assert mu.dtype == np.float64 and sigma.shape == (6, 6)
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0))
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False))
    with pytest.raises(ValueError):
        feature_stats(f[:1])


def test_frechet_distance_matches_direct_scipy():
    rng = np.random.default_rng(1)
    f1 = rng.standard_normal((300, 24))
    f2 = rng.standard_normal((250, 24)) @ rng.standard_normal((24, 24)) * 0.5 + 0.3
    ours = frechet_distance(*feature_stats(f1), *feature_stats(f2))
    direct = _direct_fid(f1, f2)
    assert abs(ours - direct) / abs(direct) < 1e-6
    assert abs(ours - _eig_fid(f1, f2)) / abs(direct) < 1e-6


def test_frechet_distance_near_singular_covariance():
    # Fewer samples than dimensions and rank-deficient features: both covariances are singular.
    rng = np.random.default_rng(2)
    f1 = rng.standard_normal((20, 5)) @ rng.standard_normal((5, 64))
    f2 = rng.standard_normal((30, 8)) @ rng.standard_normal((8, 64)) + 0.1
    assert np.linalg.matrix_rank(np.cov(f1, rowvar=False)) < 64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ours = frechet_distance(*feature_stats(f1), *feature_stats(f2))
    direct = _direct_fid(f1, f2)
    assert np.isfinite(ours)
    assert abs(ours - direct) / abs(direct) < 1e-6
    assert abs(ours - _eig_fid(f1, f2)) / abs(direct) < 1e-6


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
    assert frechet_distance([0.0], [[4.0]], [1.0], [[1.0]]) == pytest.approx(2.0, rel=1e-12)
    mu, sigma = feature_stats(np.random.default_rng(3).standard_normal((100, 10)))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_frechet_distance_eps_retry_and_imaginary_error(monkeypatch):
    real_sqrtm = linalg.sqrtm
    calls = []

    def nan_first(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(metrics.linalg, "sqrtm", nan_first)
    s1, s2 = np.diag([1.0, 2.0]), np.diag([3.0, 0.0])
    with pytest.warns(RuntimeWarning, match="singular product"):
        d = frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=1e-6)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(2)) @ (s2 + 1e-6 * np.eye(2)))
    # eps * I on the zero eigenvalue adds sqrt(2e-6) ~ 1.4e-3 to the trace of the root.
    assert d == pytest.approx(3.0 + 3.0 - 2 * math.sqrt(3.0), abs=5e-3)

    monkeypatch.setattr(metrics.linalg, "sqrtm", lambda a: np.eye(len(a)) * (1 + 1j))
    with pytest.raises(ValueError, match="Imaginary component"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        frechet_distance(np.zeros(2), s1, np.zeros(2), s1)


# ----------------------------------------------------------------------------- IS
def test_inception_score_uniform_is_one():
    mean, std = inception_score(np.zeros((50, 7)), splits=5)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_one_hot_diverse_equals_classes():
    k = 10
    labels = np.arange(100) % k  # every split of 10 consecutive samples holds each class once
    probs = np.eye(k)[labels]
    mean, std = inception_score(probs, splits=10, from_logits=False)
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    mean, _ = inception_score(100.0 * probs, splits=10)  # near one-hot softmax
    assert mean == pytest.approx(k, rel=1e-6)
    # All samples in one class: confident but not diverse -> 1.
    assert inception_score(np.eye(k)[np.zeros(40, int)], splits=4, from_logits=False)[0] == pytest.approx(1.0)


def test_inception_score_matches_adm_formula():
    logits = np.random.default_rng(4).standard_normal((60, 12)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, 60, 20):  # ADM: fixed split_size chunks, no shuffling
        part = p[i : i + 20]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    mean, std = inception_score(logits, splits=3)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-8)
    assert inception_score(p, splits=3, from_logits=False)[0] == pytest.approx(mean, rel=1e-10)
    with pytest.raises(ValueError):
        inception_score(-p, splits=3, from_logits=False)


@pytest.mark.parametrize("n", [200, 10_000, 12_345, 50_000])
def test_inception_score_default_follows_adm_chunks_of_5000(n):
    """ADM's evaluator: consecutive chunks of 5,000 (one chunk at N = 200, a short last one at
    12,345); catches the old 10-split rule as default and a dropped partial chunk."""
    rng = np.random.default_rng(n)
    # Class-skewed predictions that drift along the set, so every chunking gives another mean.
    drift = np.linspace(0, 3, n)[:, None] * np.eye(10)[np.arange(n) * 7 // n]
    p = rng.dirichlet(np.full(10, 0.3), size=n) + drift
    p /= p.sum(1, keepdims=True)
    scores = []
    for c in range(-(-n // 5000)):
        part = p[5000 * c: 5000 * (c + 1)]
        kl = part * (np.log(part) - np.log(np.mean(part, 0)[None]))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    mean, std = inception_score(p, from_logits=False)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10) and std == pytest.approx(np.std(scores), abs=1e-10)
    old = inception_score(p, splits=10, from_logits=False)[0]
    assert (old == pytest.approx(mean, rel=1e-10)) == (n == 50_000)  # the rules agree at 50K only


# ----------------------------------------------------------------------------- precision / recall
def _adm_fp16_reference(u, v):
    """ADM's DistanceBlock written independently in numpy float16 (each op rounds to float16;
    squares summed in float32), with its float32 fallback for a non-finite block."""
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    with np.errstate(over="ignore", invalid="ignore"):
        nu = (u16 * u16).astype(np.float32).sum(1).astype(np.float16)
        nv = (v16 * v16).astype(np.float32).sum(1).astype(np.float16)
        mm = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
        d = np.maximum(nu[:, None] - np.float16(2) * mm + nv[None, :], np.float16(0))
    if np.isfinite(d).all():
        return d.astype(np.float32)
    u32, v32 = u.astype(np.float32), v.astype(np.float32)
    return np.maximum((u32 ** 2).sum(1)[:, None] - 2 * u32 @ v32.T + (v32 ** 2).sum(1)[None, :], 0)


def _blocked_pr(real, fake, k, bs, dist):
    def full(a, b):  # distances assembled block by block, as ADM's row/column batches
        return np.block([[dist(a[i:i + bs], b[j:j + bs]) for j in range(0, len(b), bs)]
                         for i in range(0, len(a), bs)])

    r_rad = np.sort(full(real, real), axis=1)[:, k]
    f_rad = np.sort(full(fake, fake), axis=1)[:, k]
    d = full(real, fake)
    return (d <= r_rad[:, None]).any(0).mean(), (d <= f_rad[None, :]).any(1).mean()


def test_precision_recall_adm_distances_equal_an_independent_float16_implementation():
    """Features on a 1/16 grid (so float32 sums are exact and only the float16 roundings
    matter); one huge row forces the float32 fallback in the blocks that contain it. Catches
    float32/float64 distances by default, a fallback for the whole set instead of per block
    (or never), and `<` instead of `<=` on ties."""
    rng = np.random.default_rng(3)
    # A common offset, as Inception's non-negative features have: |x|^2 ~ 8,000, where float16
    # steps are 4, so |u|^2 - 2 u.v + |v|^2 loses most of a distance^2 of ~300.
    real = 12.0 + rng.integers(0, 128, (40, 32)) / 16.0
    fake = 12.0 + rng.integers(0, 128, (35, 32)) / 16.0 + rng.integers(0, 2, (35, 32)) / 4.0
    fake[5] = 200.0  # |x|^2 = 1.28e6 > float16 max: its blocks fall back to float32
    for bs in (16, 10_000):
        got = precision_recall(real, fake, k=3, batch_size=bs)
        assert got == _blocked_pr(real, fake, 3, bs, _adm_fp16_reference)
    grid_r, grid_f = rng.integers(0, 3, (30, 6)), rng.integers(0, 3, (30, 6))  # many exact ties
    assert precision_recall(grid_r, grid_f, k=3) == _blocked_pr(grid_r, grid_f, 3, 30, _adm_fp16_reference)
    exact = precision_recall(real, fake, k=3, distances="float64")
    assert exact == pytest.approx(_brute_pr(real, fake, 3), abs=1e-12)
    assert got != exact  # float16 rounding changes the answer on these features
    with pytest.raises(ValueError, match="distances"):
        precision_recall(real, fake, distances="fp16")


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force(k):
    rng = np.random.default_rng(10 + k)
    real = rng.standard_normal((41, 5))
    fake = rng.standard_normal((33, 5)) * 1.3 + 0.4
    expected = _brute_pr(real, fake, k)
    for bs in (7, 1000):  # batched merging of the running top-(k+1) must not change the answer
        got = precision_recall(real, fake, k=k, batch_size=bs, distances="float64")
        assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < min(expected) < 1  # a non-trivial case


def test_precision_recall_edge_cases():
    x = np.random.default_rng(5).standard_normal((20, 4)).astype(np.float32)
    assert precision_recall(x, x, k=3) == (1.0, 1.0)
    p, r = precision_recall(torch.from_numpy(x), torch.from_numpy(x + 100.0), k=3)
    assert (p, r) == (0.0, 0.0)
    with pytest.raises(ValueError):
        precision_recall(x[:3], x, k=3)
    with pytest.raises(ValueError):
        precision_recall(x, x[:, :2], k=3)


# ----------------------------------------------------------------------------- PSNR / SSIM
def test_psnr_known_values():
    a = torch.zeros(2, 3, 8, 8)
    b = a.clone()
    b[0] += 0.1  # MSE 0.01 -> 20 dB
    out = psnr(a, b)
    assert out.shape == (2,)
    assert out[0] == pytest.approx(20.0, abs=1e-5) and out[1] == np.inf
    u = np.full((1, 8, 8, 3), 100, np.uint8)
    v = u + np.uint8(10)  # MSE 100 at data range 255
    assert psnr(u, v)[0] == pytest.approx(10 * math.log10(255**2 / 100), rel=1e-12)
    assert psnr(a * 2 - 1, b * 2 - 1, data_range=2.0)[0] == pytest.approx(20.0, abs=1e-5)


def test_ssim_known_values():
    x = _pattern(2, 24, 20)
    out = ssim(x, x)
    assert out.shape == (2,) and np.allclose(out, 1.0, atol=1e-12)
    # Constant images: only the luminance term remains, (2 ab + C1) / (a^2 + b^2 + C1).
    a, b = np.full((1, 16, 16, 3), 100, np.uint8), np.full((1, 16, 16, 3), 120, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b)[0] == pytest.approx((2 * 100 * 120 + c1) / (100**2 + 120**2 + c1), rel=1e-12)
    # A constant shift keeps contrast/structure: SSIM < 1 only through luminance; a negated image
    # is anti-correlated.
    xf = torch.from_numpy(x).permute(0, 3, 1, 2).double() / 255
    assert 0.9 < ssim(xf * 0.8, xf * 0.8 + 0.1)[0] < 1.0
    assert ssim(xf, 1 - xf)[0] < 0
    # uint8 (B,H,W,C) and float (B,C,H,W) in [0, 1] are the same computation.
    y = _pattern(2, 24, 20, seed=3)
    yf = torch.from_numpy(y).permute(0, 3, 1, 2).double() / 255
    np.testing.assert_allclose(ssim(x, y), ssim(xf, yf), rtol=1e-10)
    with pytest.raises(ValueError):
        ssim(x[:, :10], y[:, :10])  # smaller than the 11x11 window


def test_ssim_reference_value():
    # Value from skimage.metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
    # use_sample_covariance=False, data_range=255, channel_axis=-1) (scikit-image 0.26), which our
    # implementation also matched to ~2e-16 on random images.
    x = _pattern(1, 24, 20)[0]
    y = np.clip(x.astype(int) + _pattern(1, 24, 20, seed=3)[0] % 41 - 20, 0, 255).astype(np.uint8)
    assert ssim(x[None], y[None])[0] == pytest.approx(0.9451563358462165, abs=1e-12)


# ----------------------------------------------------------------------------- Inception
@pytest.fixture(scope="module")
def random_inception():
    torch.manual_seed(0)
    return FIDInceptionV3()


def test_inception_shapes_and_protocol(random_inception):
    ex = FIDInceptionExtractor(random_inception)
    assert isinstance(ex, FeatureExtractor) and ex.name == "inception"
    assert "RANDOM WEIGHTS" in ex.describe() and "unbiased" in ex.describe()
    imgs = _pattern(2, 32, 32)
    out = ex(imgs)
    assert out["features"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert np.isfinite(out["features"]).all() and out["features"].std() > 1e-3
    # Same images as float (B,3,H,W) in [0,1] give the same features.
    out_f = ex(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255)
    np.testing.assert_allclose(out_f["features"], out["features"], rtol=1e-4, atol=1e-5)
    # Logits are unbiased: pool @ W.T, no fc bias.
    w = random_inception.fc.weight.detach().numpy()
    np.testing.assert_allclose(out["logits"], out["features"] @ w.T, rtol=1e-4, atol=1e-4)


def test_preprocessing_resizes():
    x = torch.tensor([[0.0, 10.0], [20.0, 30.0]]).view(1, 1, 2, 2)
    # TF1 legacy bilinear (no half-pixel centres): src = dst * in/out, clamped at the edge.
    np.testing.assert_allclose(inc._resize_bilinear_tf1(x, 4)[0, 0, 0].numpy(), [0, 5, 10, 10])
    imgs = _pattern(1, 299, 299)
    t = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
    np.testing.assert_allclose(preprocess_for_inception(imgs, "tf").numpy(), ((t - 128) / 128).numpy())
    small = _pattern(1, 40, 30)
    ts = torch.from_numpy(small).permute(0, 3, 1, 2).float() / 255
    ref = 2 * F.interpolate(ts, size=(299, 299), mode="bilinear", align_corners=False) - 1
    np.testing.assert_allclose(preprocess_for_inception(small, "pytorch-fid").numpy(), ref.numpy(), atol=1e-6)
    assert preprocess_for_inception(small, "tf").shape == (1, 3, 299, 299)
    with pytest.raises(ValueError):
        preprocess_for_inception(small, "lanczos")


def _isolate_caches(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def offline():
        raise OSError("network unreachable")

    monkeypatch.setattr(inc, "_download_weights", offline)


def test_inception_weights_roundtrip(random_inception, tmp_path, monkeypatch):
    _isolate_caches(monkeypatch, tmp_path)
    path = tmp_path / "fid.pth"
    torch.save(random_inception.state_dict(), path)
    ex = load_fid_inception(str(path))
    assert ex.weights_path == str(path) and str(path) in ex.describe()
    imgs = _pattern(1, 32, 32)
    expected = FIDInceptionExtractor(random_inception)(imgs)["features"]
    np.testing.assert_allclose(ex(imgs)["features"], expected)
    # Found in the torch.hub cache without an explicit path.
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / inc.FID_WEIGHTS_FILENAME).write_bytes(path.read_bytes())
    assert find_fid_inception_weights() == str(cache / inc.FID_WEIGHTS_FILENAME)
    # A file that is not the Inception state dict is a clean error.
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not the FID Inception state dict"):
        load_fid_inception(str(bad))


def test_inception_weights_missing_without_network(tmp_path, monkeypatch):
    _isolate_caches(monkeypatch, tmp_path)
    with pytest.raises(InceptionWeightsMissing) as e:
        find_fid_inception_weights()
    msg = str(e.value)
    assert msg.startswith(
        "FID Inception weights not found: download "
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
        "pt_inception-2015-12-05-6726825d.pth and pass --inception-weights PATH"
    )
    with pytest.raises(InceptionWeightsMissing):
        load_fid_inception(None)
    with pytest.raises(InceptionWeightsMissing, match="no file at"):
        find_fid_inception_weights(str(tmp_path / "nope.pth"))
    with pytest.raises(InceptionWeightsMissing):
        find_fid_inception_weights(download=False)


# ----------------------------------------------------------------------------- inputs
def _write_pngs(root, imgs, names):
    for img, name in zip(imgs, names):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(p)


def _collect(image_set, bs=None):
    return np.concatenate(list(image_set.batches(bs)), axis=0)


def test_load_png_folder(tmp_path):
    imgs = _pattern(5, 12, 10)
    # Sorted by relative path, recursively; non-image files ignored.
    _write_pngs(tmp_path, imgs, ["a.png", "b.png", "sub/c.png", "sub/d.png", "z.png"])
    (tmp_path / "notes.txt").write_text("x")
    s = load_images(str(tmp_path), batch_size=2)
    assert (s.kind, len(s), s.height, s.width) == ("folder", 5, 12, 10)
    batches = list(s)
    assert [b.shape for b in batches] == [(2, 12, 10, 3), (2, 12, 10, 3), (1, 12, 10, 3)]
    assert all(b.dtype == np.uint8 for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), imgs)
    np.testing.assert_array_equal(_collect(load_images(str(tmp_path), limit=3), 10), imgs[:3])
    # Grayscale and JPG files load as RGB.
    g = tmp_path / "gray"
    g.mkdir()
    Image.fromarray(imgs[0, :, :, 0]).save(g / "x.png")
    Image.fromarray(imgs[1]).save(g / "y.jpg")
    assert _collect(load_images(str(g))).shape == (2, 12, 10, 3)


@pytest.mark.parametrize("compressed", [False, True])
def test_load_npz(tmp_path, compressed):
    imgs = _pattern(7, 9, 11)
    path = tmp_path / "samples.npz"
    (np.savez_compressed if compressed else np.savez)(path, imgs, np.arange(7))  # arr_0, arr_1
    s = load_images(str(path), batch_size=3)
    assert (s.kind, len(s), s.height, s.width) == ("npz", 7, 9, 11)
    np.testing.assert_array_equal(_collect(s), imgs)
    np.testing.assert_array_equal(_collect(load_images(str(path), limit=4), 3), imgs[:4])
    assert load_reference_stats(str(path)) is None


def test_load_dataset_dir(tmp_path):
    import datasets

    imgs = _pattern(6, 10, 8)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(x) for x in imgs], "label": list(range(6))}, features=feats
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    s = load_images(str(tmp_path / "ds"), batch_size=4)
    assert (s.kind, len(s), s.height, s.width) == ("dataset", 6, 10, 8)
    np.testing.assert_array_equal(_collect(s), imgs)
    # A DatasetDict with one split, and DIR/<split> of a multi-split one.
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd1"))
    np.testing.assert_array_equal(_collect(load_images(str(tmp_path / "dd1"), limit=2)), imgs[:2])
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "dd2"))
    with pytest.raises(EvalInputError, match="splits"):
        load_images(str(tmp_path / "dd2"))
    assert len(load_images(str(tmp_path / "dd2" / "validation"))) == 6


def test_reference_stats(tmp_path):
    imgs = _pattern(3, 8, 8)
    mu, sigma = np.arange(4.0), np.eye(4)
    np.savez(tmp_path / "ref.npz", arr_0=imgs, mu=mu, sigma=sigma)
    ref = load_reference_stats(str(tmp_path / "ref.npz"))
    np.testing.assert_array_equal(ref["mu"], mu)
    np.testing.assert_array_equal(ref["sigma"], sigma)
    assert len(load_images(str(tmp_path / "ref.npz"))) == 3  # its images still load
    np.savez(tmp_path / "bad.npz", arr_0=imgs, mu=mu, sigma=np.eye(3))
    with pytest.raises(EvalInputError):
        load_reference_stats(str(tmp_path / "bad.npz"))
    assert load_reference_stats(str(tmp_path)) is None


def test_bad_inputs_are_clean_errors(tmp_path):
    with pytest.raises(EvalInputError, match="no such file"):
        load_images(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalInputError, match="no images"):
        load_images(str(tmp_path / "empty"))
    bad_arrays = {
        "float": np.zeros((2, 8, 8, 3), np.float32),
        "3d": np.zeros((8, 8, 3), np.uint8),
        "rgba": np.zeros((2, 8, 8, 4), np.uint8),
        "nchw": np.zeros((2, 3, 8, 8), np.uint8),
    }
    for name, arr in bad_arrays.items():
        np.savez(tmp_path / f"{name}.npz", arr)
        with pytest.raises(EvalInputError, match=r"uint8 images of shape \(N, H, W, 3\)"):
            load_images(str(tmp_path / f"{name}.npz"))
    np.savez(tmp_path / "empty.npz", np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(EvalInputError, match="no images"):
        load_images(str(tmp_path / "empty.npz"))
    np.savez(tmp_path / "named.npz", images=_pattern(2, 8, 8))
    with pytest.raises(EvalInputError, match="arr_0"):
        load_images(str(tmp_path / "named.npz"))
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(EvalInputError, match="not a readable"):
        load_images(str(tmp_path / "junk.npz"))
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(EvalInputError, match="unsupported"):
        load_images(str(tmp_path / "x.txt"))
    mixed = tmp_path / "mixed"
    _write_pngs(mixed, [_pattern(1, 8, 8)[0], _pattern(1, 9, 8)[0]], ["a.png", "b.png"])
    with pytest.raises(EvalInputError, match="mixed image sizes"):
        load_images(str(mixed))
    with pytest.raises(EvalInputError):
        load_images(str(tmp_path / "float.npz"), limit=0)
    # Every message is one line.
    try:
        load_images(str(tmp_path / "rgba.npz"))
    except EvalInputError as e:
        assert "\n" not in str(e)


def test_dataset_mixed_sizes_is_clean_error(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(_pattern(1, 8, 8)[0]), Image.fromarray(_pattern(1, 9, 8)[0])]},
        features=datasets.Features({"image": datasets.Image()}),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    s = load_images(str(tmp_path / "ds"))
    with pytest.raises(EvalInputError, match="mixed image sizes"):
        _collect(s)


# ----------------------------------------------------------------------------- stats
class _MeanColour:
    """A stand-in feature extractor: per-channel means and a toy 'logits' vector."""

    name = "mean-colour"

    def __init__(self, logits=True):
        self.logits = logits

    def describe(self):
        return "per-channel mean colour"

    def __call__(self, images):
        f = np.asarray(images, np.float32).mean(axis=(1, 2))
        return {"features": torch.from_numpy(f), "logits": f[:, :2] if self.logits else None}


def test_compute_stats(tmp_path):
    imgs = _pattern(7, 9, 9)
    np.savez(tmp_path / "s.npz", imgs)
    seen = []
    images = load_images(str(tmp_path / "s.npz"), batch_size=3)
    st = compute_stats(_MeanColour(), images, progress=seen.append)
    assert isinstance(_MeanColour(), FeatureExtractor)
    assert st["n"] == 7 and seen == [3, 3, 1]
    f = imgs.astype(np.float32).mean(axis=(1, 2))
    np.testing.assert_allclose(st["features"], f)
    mu, sigma = feature_stats(f)
    np.testing.assert_allclose(st["mu"], mu)
    np.testing.assert_allclose(st["sigma"], sigma)
    assert st["logits"].shape == (7, 2)
    assert compute_stats(_MeanColour(logits=False), [imgs])["logits"] is None
    with pytest.raises(EvalInputError):
        compute_stats(_MeanColour(), [imgs[:1]])


def test_compute_stats_with_inception(random_inception, tmp_path):
    np.savez(tmp_path / "s.npz", _pattern(3, 16, 16))
    images = load_images(str(tmp_path / "s.npz"), batch_size=2)
    st = compute_stats(FIDInceptionExtractor(random_inception), images)
    assert st["features"].shape == (3, 2048) and st["logits"].shape == (3, 1008)
    assert st["mu"].shape == (2048,) and st["sigma"].shape == (2048, 2048)


def test_images_to_uint8():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0, 0.999]).view(1, 1, 1, 5).expand(2, 3, 1, 5)
    u = images_to_uint8(x)
    assert u.dtype == np.uint8 and u.shape == (2, 1, 5, 3)
    assert u[0, 0, :, 0].tolist() == [0, 128, 255, 255, 255]


# ----------------------------------------------------------------------------- batch-size independence
class _BatchDependent:
    """An extractor whose output depends on its batch, as a kernel choosing its algorithm by
    shape does: feature = the image's mean value + the batch mean + the batch size."""

    name = "batchdep"
    chunk = 4

    def describe(self):
        return "test"

    def __call__(self, images):
        v = images.astype(np.float64).mean(axis=(1, 2, 3))
        f = (v + v.mean() + len(v))[:, None]
        return {"features": f, "logits": np.c_[f, -f]}


def test_feature_stream_fixed_chunks_make_features_independent_of_the_batch_size():
    """Catches passing the loader's batches through (no re-chunking) and an unpadded last chunk."""
    from reptok.evaluate.inputs import FeatureStream

    imgs = _pattern(10, 5, 5)
    v = imgs.astype(np.float64).mean(axis=(1, 2, 3))
    padded = np.r_[v, 0.0, 0.0]  # chunks [0:4], [4:8], [8:10] + 2 black images
    expected = np.concatenate([padded[i:i + 4] + padded[i:i + 4].mean() + 4 for i in (0, 4, 8)])[:10]
    for sizes in ([3, 3, 3, 1], [5, 5], [10], [1] * 10):
        stream = FeatureStream(_BatchDependent())
        for a, b in zip(np.cumsum([0] + sizes[:-1]), np.cumsum(sizes)):
            stream.add(imgs[a:b])
        feats, logits = stream.result()
        np.testing.assert_array_equal(feats[:, 0], expected.astype(np.float32))
        np.testing.assert_array_equal(logits[:, 1], -expected.astype(np.float32))


def test_inception_features_and_scores_identical_for_two_batch_sizes(random_inception, tmp_path):
    """The real network on a CPU, chunk 2 (as CUDA uses 100): loading batches of 1 and 3 give
    bit-identical pool3 features, logits and IS; TF32 is off during the forward and restored."""
    ex = FIDInceptionExtractor(random_inception, chunk=2)
    assert FIDInceptionExtractor(random_inception).chunk == 1  # CPU default: no padding work
    seen = []
    forward = random_inception.forward
    before = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
              torch.backends.cudnn.deterministic)

    def spy(x):
        seen.append((torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
                     torch.backends.cudnn.deterministic))
        return forward(x)

    random_inception.forward = spy
    try:
        imgs = _pattern(3, 16, 16)
        a = compute_stats(ex, [imgs[i:i + 1] for i in range(3)])
        b = compute_stats(ex, [imgs])
    finally:
        del random_inception.forward
    np.testing.assert_array_equal(a["features"], b["features"])
    np.testing.assert_array_equal(a["logits"], b["logits"])
    assert inception_score(a["logits"]) == inception_score(b["logits"])
    assert set(seen) == {("ieee", "ieee", True)} and len(seen) == 4  # 2 chunks per run
    assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
            torch.backends.cudnn.deterministic) == before != ("ieee", "ieee", True)


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inception_batch_invariant_tf32_off_and_adm_pr_as_on_cpu(random_inception):
    """On CUDA (chunk 100): loading batches of 7 and 64 give bit-identical features; they stay
    within 1e-4 of the CPU features (TF32, 10-bit mantissas, would move them further); the
    float16 precision/recall blocks on the GPU give the CPU's answer."""
    imgs = _pattern(130, 24, 24)
    import copy

    ex = FIDInceptionExtractor(copy.deepcopy(random_inception), device="cuda")  # .to() is in place
    assert ex.chunk == 100
    a = compute_stats(ex, [imgs[i:i + 7] for i in range(0, 130, 7)])
    b = compute_stats(ex, [imgs[i:i + 64] for i in range(0, 130, 64)])
    np.testing.assert_array_equal(a["features"], b["features"])
    np.testing.assert_array_equal(a["logits"], b["logits"])
    cpu = compute_stats(FIDInceptionExtractor(random_inception), [imgs[:8]])
    scale = np.abs(cpu["features"]).max()
    assert np.abs(a["features"][:8] - cpu["features"]).max() <= 1e-4 * scale
    rng = np.random.default_rng(1)  # a 1/16 grid: float32 sums exact in any reduction order
    real, fake = 12 + rng.integers(0, 128, (300, 32)) / 16, 12 + rng.integers(0, 128, (280, 32)) / 16
    assert precision_recall(torch.from_numpy(real).cuda(), torch.from_numpy(fake).cuda(), batch_size=128) == \
        precision_recall(real, fake, batch_size=128)

"""Image-quality metrics with the field's standard semantics; no model loading here.

* :func:`frechet_distance` / :func:`feature_stats` -- FID exactly as the ADM evaluator
  (``guided-diffusion/evaluations/evaluator.py``) and pytorch-fid compute it.
* :func:`inception_score` -- IS as the ADM evaluator computes it (chunks of 5,000), or over
  S in-order splits (improved-GAN / torch-fidelity).
* :func:`precision_recall` -- improved precision and recall (Kynkaanniemi et al. 2019) with
  the ADM ``ManifoldEstimator`` semantics and, by default, its float16 distances
  (:func:`adm_squared_distances`); batched in torch so 50K x 50K runs on a GPU.
* :func:`strict_fp32` -- TF32 off (and cuDNN deterministic) for feature extraction and distances.
* :func:`psnr` / :func:`ssim` -- per-image reconstruction metrics (SSIM matches scikit-image's
  ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``).

Feature extraction (Inception) lives in :mod:`reptok.evaluate.inception`.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from scipy.special import log_softmax

ArrayLike = Union[np.ndarray, torch.Tensor]

__all__ = [
    "IS_RULES",
    "PR_DISTANCES",
    "STRICT_FP32_DOC",
    "adm_squared_distances",
    "feature_stats",
    "frechet_distance",
    "inception_score",
    "precision_recall",
    "psnr",
    "ssim",
    "strict_fp32",
]


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_float_tensor(x: ArrayLike, device, dtype) -> torch.Tensor:
    t = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x.detach()
    return t.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- FID
def feature_stats(features: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features, as every FID implementation computes them.

    features: (N, D), N >= 2. Returns ``mu`` (D,) and ``sigma`` (D, D), both float64;
    ``sigma`` is the unbiased sample covariance (``np.cov(rowvar=False)``, i.e. divided by N-1).
    """
    f = _to_numpy(features).astype(np.float64, copy=False)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (the FID formula).

    ``||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr(sqrtm(sigma1 @ sigma2))``, computed in
    float64 with ``scipy.linalg.sqrtm`` exactly as the ADM evaluator and pytorch-fid do:

    * if the matrix square root is not finite (singular product), retry with ``eps * I`` added to
      both covariances. Recent SciPy (>= 1.16) rarely returns non-finite values for singular
      products; it returns a complex root instead, so we also take the ``eps`` retry when the
      diagonal's imaginary part is not negligible (a case where ADM/pytorch-fid would raise);
    * tiny imaginary parts (numerical noise, |imag| <= 1e-3 on the diagonal) are dropped;
      a large imaginary component raises ``ValueError``.

    mu*: (D,); sigma*: (D, D). Returns a Python float.
    """
    mu1 = np.atleast_1d(_to_numpy(mu1).astype(np.float64))
    mu2 = np.atleast_1d(_to_numpy(mu2).astype(np.float64))
    sigma1 = np.atleast_2d(_to_numpy(sigma1).astype(np.float64))
    sigma2 = np.atleast_2d(_to_numpy(sigma2).astype(np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different lengths: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(
            f"covariances must both be ({mu1.shape[0]}, {mu1.shape[0]}), "
            f"got {sigma1.shape} and {sigma2.shape}"
        )

    diff = mu1 - mu2

    def _near_real(m: np.ndarray) -> bool:
        return not np.iscomplexobj(m) or np.allclose(np.diagonal(m).imag, 0, atol=1e-3)

    # `disp` is deprecated since SciPy 1.16; the default call returns only the root.
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all() or not _near_real(covmean):
        warnings.warn(
            f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))

    if np.iscomplexobj(covmean):
        if not _near_real(covmean):
            m = np.max(np.abs(covmean.imag))
            raise ValueError(f"Imaginary component {m}")
        covmean = covmean.real

    tr_covmean = np.trace(covmean)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# ----------------------------------------------------------------------------- IS
ADM_IS_SPLIT_SIZE = 5000
IS_RULES = {
    "adm": "in-order chunks of 5,000 images, the last one possibly shorter (the ADM evaluator)",
    "splits10": "10 in-order splits at i*N//10 (improved-GAN / torch-fidelity; reptok's rule before the ADM one)",
}


def inception_score(
    logits_or_probs: ArrayLike,
    splits: Optional[int] = None,
    *,
    split_size: int = ADM_IS_SPLIT_SIZE,
    from_logits: bool = True,
) -> Tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))``, mean and std over parts of the samples.

    logits_or_probs: (N, K). With ``from_logits=True`` (default) rows are logits and a softmax
    is applied (in float64, via log-softmax for stability); with ``from_logits=False`` rows are
    probabilities. For the FID Inception network pass its 1008-way *unbiased* logits
    (``pool3 @ W``, no bias), which is what the ADM evaluator's softmax and torch-fidelity's
    ``logits_unbiased`` use.

    Parts, always in order (no shuffling, like ADM):

    * default (``splits=None``): the ADM evaluator's rule, consecutive chunks of ``split_size``
      (5,000) samples, the last one possibly shorter (N = 200 -> one part, N = 12,000 -> 5,000 +
      5,000 + 2,000);
    * ``splits=S``: S parts cut at ``i * N // S`` (improved-GAN / torch-fidelity boundaries; the
      old reptok rule with S = 10; equal to ADM's only when N = 50,000).

    p(y) is the mean prediction within each part. Returns ``(mean, std)`` over parts
    (population std, ``ddof=0``, as improved-GAN; ADM reports the mean only).
    """
    x = _to_numpy(logits_or_probs).astype(np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected (N, K) logits or probabilities, got shape {x.shape}")
    n = x.shape[0]
    if splits is not None and not 1 <= splits <= n:
        raise ValueError(f"splits must be in [1, N={n}], got {splits}")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    if from_logits:
        logp = log_softmax(x, axis=1)
        p = np.exp(logp)
    else:
        if (x < 0).any() or not np.allclose(x.sum(1), 1.0, atol=1e-4):
            raise ValueError("probabilities must be non-negative and sum to 1 per row")
        p = x
        with np.errstate(divide="ignore"):
            logp = np.log(p)
    if splits is None:
        bounds = [(i, min(i + split_size, n)) for i in range(0, n, split_size)]
    else:
        bounds = [(i * n // splits, (i + 1) * n // splits) for i in range(splits)]
    scores = [_is_part(p[a:b], logp[a:b]) for a, b in bounds]
    return float(np.mean(scores)), float(np.std(scores))


def _is_part(part_p: np.ndarray, part_logp: np.ndarray) -> float:
    with np.errstate(divide="ignore"):
        log_py = np.log(part_p.mean(axis=0, keepdims=True))
    # 0 * log 0 := 0 (ADM's formula would give NaN for exact zeros, e.g. one-hot probs).
    with np.errstate(invalid="ignore"):
        term = part_p * (part_logp - log_py)
    kl = np.where(part_p > 0, term, 0.0)
    return float(np.exp(kl.sum(axis=1).mean()))


# ----------------------------------------------------------------------------- numerics
@contextlib.contextmanager
def strict_fp32():
    """float32 matmuls and cuDNN convolutions in IEEE float32 (TF32 off), cuDNN deterministic
    and not benchmarking, restored afterwards. TF32 (on by default for cuDNN convolutions) moves
    Inception features away from the reference evaluator's; benchmarking may pick another
    algorithm per run. A no-op for CPU tensors."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.benchmark, cudnn.deterministic)
    # torch >= 2.9 has per-backend fp32_precision; mixing it with the legacy allow_tf32 flags raises.
    new_api = hasattr(cudnn, "conv") and hasattr(cudnn.conv, "fp32_precision")
    precision = (cudnn.conv.fp32_precision, matmul.fp32_precision) if new_api else \
        (cudnn.allow_tf32, matmul.allow_tf32)
    try:
        cudnn.benchmark, cudnn.deterministic = False, True
        if new_api:
            cudnn.conv.fp32_precision, matmul.fp32_precision = "ieee", "ieee"
        else:
            cudnn.allow_tf32, matmul.allow_tf32 = False, False
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = saved
        if new_api:
            cudnn.conv.fp32_precision, matmul.fp32_precision = precision
        else:
            cudnn.allow_tf32, matmul.allow_tf32 = precision


STRICT_FP32_DOC = "float32 IEEE (TF32 off for matmuls and cuDNN convolutions), cuDNN deterministic, no benchmark"


# ----------------------------------------------------------------------------- precision / recall
PR_DISTANCES = {
    "adm": "squared distances in float16 blocks of 10,000 x 10,000, float32 for a block that is not "
           "finite (the ADM evaluator's DistanceBlock)",
    "float64": "Euclidean distances in float64 (torch.cdist), same blocks",
}
Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def adm_squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The ADM evaluator's ``DistanceBlock``: squared distances ``|u|^2 - 2 u.v + |v|^2`` (clamped
    at 0) in float16, or in float32 when any entry of the float16 block is not finite.

    Emulates its TensorFlow graph op by op: inputs cast to float16; squares rounded to float16
    and summed with float32 accumulation (TF's GPU reduction of halves); the matmul of the
    float16 inputs accumulated in float32 and rounded to float16 (cuBLAS, TF's default); the
    subtraction and addition each rounded to float16. u: (A, D), v: (B, D) -> (A, B) float32.
    """
    u16, v16 = u.half(), v.half()
    nu = (u16 * u16).float().sum(1).half()
    nv = (v16 * v16).float().sum(1).half()
    mm = (u16.float() @ v16.float().T).half()
    d = (nu[:, None] - 2 * mm + nv[None, :]).clamp_min(0)
    if bool(torch.isfinite(d).all()):
        return d.float()
    u32, v32 = u.float(), v.float()
    return ((u32 * u32).sum(1)[:, None] - 2 * (u32 @ v32.T) + (v32 * v32).sum(1)[None, :]).clamp_min(0)


def _knn_radii(x: torch.Tensor, k: int, batch_size: int, dist: Distance) -> torch.Tensor:
    """Distance from every row of x (N, D) to its k-th nearest neighbour, excluding itself.

    Index k of the ascending sorted row of distances to all N rows (itself included, normally
    the 0 at index 0) -- exactly ADM's ``manifold_radii`` (``partition(...)[:, k]``), also when
    float16 rounding makes a self-distance non-zero. Memory stays at (batch_size, batch_size +
    k + 1) by merging a running top-(k+1).
    """
    n = x.shape[0]
    radii = None
    for i in range(0, n, batch_size):
        rows = x[i : i + batch_size]
        best: Optional[torch.Tensor] = None
        for j in range(0, n, batch_size):
            d = dist(rows, x[j : j + batch_size])
            if best is not None:
                d = torch.cat([best, d], dim=1)
            best = torch.topk(d, min(k + 1, d.shape[1]), dim=1, largest=False, sorted=True).values
        if radii is None:
            radii = torch.empty(n, dtype=best.dtype, device=x.device)
        radii[i : i + batch_size] = best[:, k]
    return radii


def precision_recall(
    real_feats: ArrayLike,
    fake_feats: ArrayLike,
    k: int = 3,
    batch_size: int = 10000,
    *,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
    distances: str = "adm",
) -> Tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019), ADM ManifoldEstimator semantics.

    real_feats: (N_real, D); fake_feats: (N_fake, D) (numpy or torch).
    Each sample's radius is the distance to its k-th nearest neighbour in its own set
    (excluding itself). **Precision** = fraction of fake samples within (``<=``) the radius of at
    least one real sample; **recall** = fraction of real samples within the radius of at least
    one fake sample. Returns ``(precision, recall)`` as floats.

    ``distances``:

    * ``"adm"`` (default): squared distances exactly as the ADM evaluator computes them
      (:func:`adm_squared_distances`: float16, float32 fallback per non-finite block), in its
      blocks of ``batch_size`` x ``batch_size`` (its row/column batch: 10,000), so the blocks
      that fall back are the same. float16 keeps 11 significant bits (spacing 0.25 to 0.5 for
      squared distances in the hundreds): neighbours tie or swap order, and published ADM
      precision / recall carry that rounding;
    * ``"float64"``: ``torch.cdist`` in ``dtype`` (default float64), exact up to float64
      round-off, in the same blocks (``dtype`` is ignored by ``"adm"``).

    Runs on ``device`` (default: the tensors' device, CPU for numpy) with TF32 off; a
    10,000 x 10,000 block takes ~0.4 GB (float32) to ~0.8 GB (float64).
    """
    if distances not in PR_DISTANCES:
        raise ValueError(f"distances must be one of {', '.join(PR_DISTANCES)}, got {distances!r}")
    if device is None:
        device = real_feats.device if isinstance(real_feats, torch.Tensor) else "cpu"
    if distances == "adm":
        dtype, dist = torch.float32, adm_squared_distances
    else:
        dtype, dist = dtype or torch.float64, torch.cdist
    real = _as_float_tensor(real_feats, device, dtype)
    fake = _as_float_tensor(fake_feats, device, dtype)
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"features must be (N, D) with equal D, got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(
            f"need more than k={k} samples in each set, got {real.shape[0]} real and {fake.shape[0]} fake"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with torch.no_grad(), strict_fp32():
        return _pr_counts(real, fake, k, batch_size, dist)


def _pr_counts(real, fake, k: int, batch_size: int, dist: Distance) -> Tuple[float, float]:
    real_radii = _knn_radii(real, k, batch_size, dist)
    fake_radii = _knn_radii(fake, k, batch_size, dist)
    real_in = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    fake_in = torch.zeros(fake.shape[0], dtype=torch.bool, device=real.device)
    # One real-vs-fake distance block serves both directions (as ADM's less_thans).
    for i in range(0, real.shape[0], batch_size):
        r = real[i : i + batch_size]
        rr = real_radii[i : i + batch_size]
        for j in range(0, fake.shape[0], batch_size):
            d = dist(r, fake[j : j + batch_size])  # (real block, fake block)
            fake_in[j : j + batch_size] |= (d <= rr[:, None]).any(dim=0)
            real_in[i : i + batch_size] |= (d <= fake_radii[j : j + batch_size][None, :]).any(dim=1)
    return float(fake_in.double().mean()), float(real_in.double().mean())


# ----------------------------------------------------------------------------- PSNR / SSIM
def _image_pair(a: ArrayLike, b: ArrayLike, data_range: Optional[float]):
    """Both images as float64 (B, C, H, W) tensors plus the data range.

    Accepted layouts (explicit, by dtype):
      * uint8 (B, H, W, C) -- the layout of image files / ADM .npz; data range 255;
      * floating (B, C, H, W) -- the torch layout, values in [0, data_range] (default 1.0,
        i.e. images in [0, 1]; map reptok's [-1, 1] images with ``(x + 1) / 2`` first).
    """
    ta = torch.as_tensor(_to_numpy(a)) if not isinstance(a, torch.Tensor) else a.detach().cpu()
    tb = torch.as_tensor(_to_numpy(b)) if not isinstance(b, torch.Tensor) else b.detach().cpu()
    if ta.shape != tb.shape or ta.dtype != tb.dtype:
        raise ValueError(
            f"images must have the same shape and dtype, got {tuple(ta.shape)} {ta.dtype} "
            f"and {tuple(tb.shape)} {tb.dtype}"
        )
    if ta.dim() != 4:
        raise ValueError(f"expected a batch of images (4-D), got shape {tuple(ta.shape)}")
    if ta.dtype == torch.uint8:
        ta, tb = ta.permute(0, 3, 1, 2), tb.permute(0, 3, 1, 2)
        data_range = 255.0 if data_range is None else float(data_range)
    elif ta.is_floating_point():
        data_range = 1.0 if data_range is None else float(data_range)
    else:
        raise ValueError(f"images must be uint8 (B,H,W,C) or float (B,C,H,W), got dtype {ta.dtype}")
    return ta.double(), tb.double(), data_range


def psnr(a: ArrayLike, b: ArrayLike, data_range: Optional[float] = None) -> np.ndarray:
    """Peak signal-to-noise ratio per image, ``10 log10(data_range^2 / MSE)``, in dB.

    a, b: uint8 (B, H, W, C) (data_range 255) or float (B, C, H, W) in [0, data_range]
    (default 1.0). The MSE is over all pixels and channels of one image (as skimage's
    ``peak_signal_noise_ratio``). Returns float64 (B,); identical images give ``inf``.
    """
    x, y, r = _image_pair(a, b, data_range)
    mse = ((x - y) ** 2).flatten(1).mean(1).numpy()
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(r * r / mse)


def _gaussian_kernel1d(sigma: float, radius: int) -> torch.Tensor:
    # scipy.ndimage's kernel: exp(-x^2 / (2 sigma^2)) on [-radius, radius], normalised to sum 1.
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def ssim(
    a: ArrayLike,
    b: ArrayLike,
    data_range: Optional[float] = None,
    *,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> np.ndarray:
    """Structural similarity per image (Wang et al. 2004), Gaussian-window variant.

    a, b: uint8 (B, H, W, C) (data_range 255) or float (B, C, H, W) in [0, data_range]
    (default 1.0); H, W >= 11. Returns float64 (B,).

    Matches ``skimage.metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=R, channel_axis=-1)``: an 11 x 11 Gaussian window
    (sigma 1.5, truncated at 3.5 sigma -> radius 5), K1 = 0.01, K2 = 0.03, population
    (co)variances, SSIM computed per channel and averaged over channels and over the valid
    positions (skimage filters with reflect padding and then crops the 5-pixel border, which is
    exactly a 'valid' convolution, so no padding mode matters). Computed in float64.
    """
    x, y, r = _image_pair(a, b, data_range)
    radius = int(3.5 * sigma + 0.5)
    win = 2 * radius + 1
    bsz, c, h, w = x.shape
    if h < win or w < win:
        raise ValueError(f"SSIM needs images of at least {win}x{win}, got {h}x{w}")
    g = _gaussian_kernel1d(sigma, radius)
    gh, gv = g.view(1, 1, 1, win), g.view(1, 1, win, 1)

    def filt(z: torch.Tensor) -> torch.Tensor:
        # Separable depthwise 'valid' Gaussian filter over every (image, channel) plane.
        z = z.reshape(bsz * c, 1, h, w)
        return F.conv2d(F.conv2d(z, gh), gv)

    ux, uy = filt(x), filt(y)
    vx = filt(x * x) - ux * ux
    vy = filt(y * y) - uy * uy
    vxy = filt(x * y) - ux * uy
    c1, c2 = (k1 * r) ** 2, (k2 * r) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    # Equal positions per channel, so the overall mean equals the mean of per-channel means.
    return s.reshape(bsz, -1).mean(1).numpy()

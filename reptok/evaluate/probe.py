"""Token probe: how much class information the fine-tuned token keeps, next to the frozen SSL
token of the same encoder (the paper's central claim: the cosine anchor keeps the SSL geometry).

* :func:`encode_pairs` -- every image of a prepared dataset -> (fine-tuned token, frozen token),
  one encoder pass for both (``SSLEncoder.forward_pair``: the frozen token is the same network
  run with the original ``[cls]`` embedding, the cosine anchor's target).
* :func:`stratified_split` -- a fixed, seeded train/test split per class.
* :func:`logistic_probe` -- multinomial logistic regression on standardised features
  (train-split mean/std), L2 as scikit-learn's default ``C = 1``, full-batch L-BFGS in float64,
  so the accuracy is deterministic for a given split.
* :func:`probe_run` -- the whole measurement of ``reptok eval probe``, a JSON-ready dict.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..errors import InputError

__all__ = ["encode_pairs", "logistic_probe", "probe_run", "standardise", "stratified_split"]


def stratified_split(labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """``(train_idx, test_idx)``, sorted: per class, a seeded permutation of its images with
    ``round(test_fraction * n_c)`` of them (at least 1 when the class has 2 or more) held out."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = 0 if len(idx) < 2 else max(1, int(round(test_fraction * len(idx))))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def standardise(train: torch.Tensor, *others: torch.Tensor):
    """z-scores with the train rows' mean and std (population; a constant column stays 0)."""
    mu, sd = train.mean(0), train.std(0, unbiased=False)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    return tuple((x - mu) / sd for x in (train,) + others)


def logistic_probe(features: np.ndarray, labels: np.ndarray, train_idx: np.ndarray, test_idx: np.ndarray,
                   *, max_iter: int = 200, device="cpu") -> Dict[str, float]:
    """Train/test accuracy of a multinomial logistic regression on the standardised features.

    Loss: mean cross-entropy + ``||W||^2 / (2 N_train)`` (scikit-learn's ``C = 1``; the bias is
    not penalised), minimised by L-BFGS (strong Wolfe) in float64 from zero weights.
    """
    x = torch.as_tensor(np.array(features), dtype=torch.float64, device=device)
    y = torch.as_tensor(np.array(labels), dtype=torch.int64, device=device)
    _, classes = torch.unique(y, return_inverse=True)  # labels need not be 0..C-1
    n_cls = int(classes.max()) + 1
    tr, te = torch.as_tensor(train_idx, device=device), torch.as_tensor(test_idx, device=device)
    xtr, xte = standardise(x[tr], x[te])
    w = torch.zeros(x.shape[1], n_cls, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.zeros(n_cls, dtype=torch.float64, device=device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")
    l2 = 0.5 / len(tr)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, classes[tr]) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        acc_tr = float(((xtr @ w + b).argmax(1) == classes[tr]).double().mean())
        acc_te = float(((xte @ w + b).argmax(1) == classes[te]).double().mean()) if len(te) else float("nan")
    return {"accuracy": acc_te, "train_accuracy": acc_tr}


@torch.no_grad()
def encode_pairs(encoder, ds, indices: np.ndarray, batch_size: int = 64, device="cpu",
                 progress: Optional[Callable[[int], None]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(fine-tuned tokens, frozen SSL tokens), both float32 (N, D), for ``indices`` of ``ds``."""
    tuned, frozen = [], []
    for i in range(0, len(indices), batch_size):
        idx = indices[i: i + batch_size]
        z, zf = encoder.forward_pair(ds.get_batch(idx)["image"].to(device))
        tuned.append(z.cpu().numpy())
        frozen.append(zf.cpu().numpy())
        if progress is not None:
            progress(len(idx))
    return np.concatenate(tuned), np.concatenate(frozen)


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = (a64 * b64).sum(1) / np.maximum(np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1), 1e-12)
    return float(cos.mean())


def probe_run(ckpt, data, *, limit: Optional[int] = None, test_fraction: float = 0.2, seed: int = 0,
              batch_size: int = 64, device="cpu", progress=None) -> dict:
    """Linear probes of a tokenizer run's fine-tuned token and of its frozen SSL token on the
    labelled images of a prepared dataset (the first ``limit``), on one seeded stratified split.
    ``progress(description, total) -> advance(k)`` as in :mod:`reptok.evaluate.commands`."""
    from .. import run as rundir
    from ..data.dataset import PreparedDataset
    from ..pipeline import Pipeline

    t0 = time.perf_counter()
    if not 0 < test_fraction < 1:
        raise InputError(f"--test-fraction {test_fraction}: must be in (0, 1)")
    if batch_size < 1 or (limit is not None and limit < 1):
        raise InputError("--batch-size and --limit must be >= 1")
    cfg = rundir.read_run_config(Path(ckpt))["config"]
    ds = PreparedDataset(data)
    if ds.resolution != cfg.image_size:
        raise InputError(f"--data {data}: images are {ds.resolution}px but the tokenizer works at "
                         f"{cfg.image_size}px; prepare the data with --resolution {cfg.image_size}")
    n = len(ds) if limit is None else min(limit, len(ds))
    labels = np.asarray(ds.labels[:n])
    keep = np.flatnonzero(labels >= 0)
    classes = np.unique(labels[keep])
    if len(classes) < 2:
        raise InputError(f"--data {data}: the probe needs class labels of at least 2 classes "
                         f"(found {len(classes)} among the first {n} images)")
    train_idx, test_idx = stratified_split(labels[keep], test_fraction, seed)
    pipe = Pipeline.from_run(ckpt, device, components=("encoder",))
    if pipe.encoder is None:
        raise InputError(f"--ckpt {ckpt}: needs a tokenizer (an encoder)")
    advance = progress("encoding (fine-tuned + frozen token)", len(keep)) if progress else None
    tuned, frozen = encode_pairs(pipe.encoder, ds, keep, batch_size, pipe.device, advance)
    rows = {name: logistic_probe(f, labels[keep], train_idx, test_idx, device=pipe.device)
            for name, f in (("fine-tuned", tuned), ("frozen SSL", frozen))}
    test_counts = np.unique(labels[keep][test_idx], return_counts=True)[1]
    return {
        "rows": [{"token": name, **{k: round(v, 6) for k, v in r.items()}} for name, r in rows.items()],
        "mean_cosine": round(_mean_cosine(tuned, frozen), 6),
        "chance": round(float(test_counts.max() / test_counts.sum()), 6),
        "classes": int(len(classes)), "n": int(len(keep)), "n_train": int(len(train_idx)),
        "n_test": int(len(test_idx)), "test_fraction": test_fraction, "seed": seed,
        "probe": "multinomial logistic regression, standardised features (train mean/std), L2 C=1, L-BFGS float64",
        "encoder": cfg.encoder.model, "token_dim": int(tuned.shape[1]),
        "ckpt": str(ckpt), "data": str(data), "reptok_version": __version__,
        "seconds": round(time.perf_counter() - t0, 2),
    }

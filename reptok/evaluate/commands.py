"""``reptok eval`` orchestration: choose the feature extractor, open the sets, compute, report.

* :func:`resolve_features` -- pick ``inception`` (the FID Inception weights are located here,
  before any work, so a missing file fails fast with :class:`InceptionWeightsMissing`) or
  ``judge`` (the offline builtin-shapes classifier); :func:`build_extractor` then loads it.
* :func:`open_image_set` -- :func:`~reptok.evaluate.inputs.load_images` plus reptok prepared
  datasets (``reptok data prep`` output, images stored CHW).
* :func:`eval_gen` -- FID / IS / precision / recall of a sample set against a reference set or an
  ADM reference batch with precomputed ``mu``/``sigma``.
* :func:`eval_recon` -- PSNR / SSIM / rFID of a tokenizer's reconstructions of a dataset.

Both return a JSON-ready dict; :func:`write_results` stores it atomically. ``progress`` is an
optional ``progress(description, total) -> advance(k)`` factory (the CLI passes rich bars).
"""

from __future__ import annotations

import json
import os
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import torch

from .. import __version__
from .. import run as rundir
from ..pipeline import Pipeline
from ..io import atomic_write_text, file_sha256
from ..errors import InputError
from ..hub import hub_origin
from .inception import FIDInceptionV3, find_fid_inception_weights, load_fid_inception
from .inputs import EvalInputError, FeatureStream, ImageSet, feature_chunk, load_images, load_reference_stats
from .metrics import (ADM_IS_SPLIT_SIZE, IS_RULES, PR_DISTANCES, STRICT_FP32_DOC, feature_stats,
                      frechet_distance, inception_score, precision_recall, psnr, ssim)

__all__ = [
    "FEATURES",
    "FeatureChoice",
    "Rules",
    "build_extractor",
    "eval_gen",
    "eval_recon",
    "open_image_set",
    "recon_results_path",
    "resolve_features",
    "results_path_for_samples",
    "write_results",
]

FEATURES = ("inception", "judge")
STANDARD_N = 50_000
IS_SPLITS = 10

Progress = Optional[Callable[[str, Optional[int]], Callable[[int], None]]]
PathLike = Union[str, os.PathLike]


def _noop(_k: int) -> None:
    pass


def _bar(progress: Progress, description: str, total: Optional[int]) -> Callable[[int], None]:
    return progress(description, total) if progress is not None else _noop


# ----------------------------------------------------------------------------- feature extractor
@dataclass
class FeatureChoice:
    """A resolved ``--features`` choice: ``name`` and, for inception, the weights file."""

    name: str
    weights: Optional[str] = None


def resolve_features(features: str = "inception", inception_weights: Optional[PathLike] = None,
                     *, download: bool = True) -> FeatureChoice:
    """Validate ``--features`` and locate the Inception weights (no model is loaded).

    Call this before any expensive work: a missing weights file raises
    :class:`~reptok.evaluate.inception.InceptionWeightsMissing` (an InputError, exit 2) whose
    message says where to download the file.
    """
    name = str(features).strip().lower()
    if name not in FEATURES:
        raise InputError(f"--features {features!r}: choose one of {', '.join(FEATURES)}")
    if name == "judge":
        if inception_weights is not None:
            raise InputError("--inception-weights only applies to --features inception")
        return FeatureChoice("judge")
    path = find_fid_inception_weights(None if inception_weights is None else str(inception_weights),
                                      download=download)
    return FeatureChoice("inception", path)


def build_extractor(choice: FeatureChoice, device: str = "cpu", progress: Progress = None):
    """Load the extractor of a :class:`FeatureChoice` (a ``FeatureExtractor``)."""
    if choice.name == "inception":
        try:
            return load_fid_inception(choice.weights, device=device, download=False)
        except InputError:
            raise
        except ValueError as e:  # not an FID Inception state dict
            raise InputError(f"--inception-weights: {e}") from None
    from ..shapes.judge import load_judge

    state = {"advance": None, "done": 0}

    def judge_progress(step: int, total: int) -> None:
        if state["advance"] is None:
            state["advance"] = _bar(progress, "training the judge (once, then cached)", total)
        state["advance"](step - state["done"])
        state["done"] = step

    return load_judge(device, progress=judge_progress)


def _feature_dim(extractor) -> int:
    if isinstance(getattr(extractor, "model", None), FIDInceptionV3):
        return FIDInceptionV3.FEATURE_DIM
    net = getattr(extractor, "net", None)
    if net is not None and hasattr(net, "head"):
        return int(net.head.in_features)
    out = extractor(np.zeros((1, 32, 32, 3), np.uint8))["features"]
    return int(np.asarray(out).reshape(1, -1).shape[1])


def _features_doc(extractor) -> Dict[str, str]:
    return {"name": extractor.name, "description": extractor.describe()}


# ----------------------------------------------------------------------------- inputs
def open_image_set(path: PathLike, limit: Optional[int] = None, batch_size: int = 100) -> ImageSet:
    """An image set for evaluation (see :func:`~reptok.evaluate.inputs.load_images`)."""
    if limit is not None and limit < 1:
        raise EvalInputError(f"--limit must be >= 1, got {limit}")
    return load_images(os.path.expanduser(str(path)), limit=limit, batch_size=batch_size)


def _npz_has_images(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return "arr_0.npy" in zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return True  # let load_images report the problem


# ----------------------------------------------------------------------------- results files
def results_path_for_samples(samples: PathLike) -> Path:
    """``<folder>/eval.json`` for a folder, ``<stem>.eval.json`` beside a file (samples.npz ->
    samples.eval.json)."""
    p = Path(samples)
    return p / "eval.json" if p.is_dir() else p.with_name(p.stem + ".eval.json")


def recon_results_path(ckpt: PathLike) -> Path:
    """``RUN/eval_recon.json``; for a run fetched from the Hub (a cache snapshot, not ours to write)
    ``eval_recon-OWNER--NAME.json`` in the working directory."""
    origin = hub_origin(Path(ckpt).resolve())
    if origin is not None:
        return Path.cwd() / f"eval_recon-{origin.split('@')[0].replace('/', '--')}.json"
    return Path(ckpt) / "eval_recon.json"


def write_results(path: PathLike, results: dict) -> Path:
    """Write results JSON atomically; returns the path."""
    path = Path(path)
    atomic_write_text(path, json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    return path


# ----------------------------------------------------------------------------- helpers
def _extract(extractor, image_set: ImageSet, progress: Progress, description: str):
    stream = FeatureStream(extractor)
    advance = _bar(progress, description, len(image_set))
    for batch in image_set:
        stream.add(batch)
        advance(len(batch))
    return stream.result()


@dataclass
class Rules:
    """How the numbers are computed: the Inception Score parts (``is_rule``, a key of
    :data:`~reptok.evaluate.metrics.IS_RULES`) and the precision/recall distances
    (``pr_distances``, a key of :data:`~reptok.evaluate.metrics.PR_DISTANCES`)."""

    is_rule: str = "adm"
    pr_distances: str = "adm"

    def check(self) -> "Rules":
        if self.is_rule not in IS_RULES:
            raise InputError(f"--is-rule {self.is_rule!r}: choose one of {' | '.join(IS_RULES)}")
        if self.pr_distances not in PR_DISTANCES:
            raise InputError(f"--pr-distances {self.pr_distances!r}: choose one of {' | '.join(PR_DISTANCES)}")
        return self


def _protocol(extractor, rules: Rules, batch_size: int) -> dict:
    """What a result needs to be compared with another: the rules, the tool, the extractor's
    weights (sha256 of the file), the batch sizes and the numerics."""
    weights = getattr(extractor, "weights_path", None) or getattr(extractor, "path", None)
    return {
        "is_rule": rules.is_rule, "is_rule_doc": IS_RULES[rules.is_rule],
        "pr_distances": rules.pr_distances, "pr_distances_doc": PR_DISTANCES[rules.pr_distances],
        "tool": f"reptok {__version__}",
        "features_weights": None if weights is None else str(weights),
        "features_weights_sha256": None if weights is None or not os.path.isfile(weights) else file_sha256(weights),
        "batch_size": batch_size,
        "feature_batch": feature_chunk(extractor),
        "numerics": STRICT_FP32_DOC if extractor.name == "inception" else "float32",
        "torch": torch.__version__,
    }


def _scores(fake_feats, fake_logits, ref_feats, fake_stats, ref_stats, extractor, k, device,
            notes: List[str], progress, rules: Rules) -> dict:
    """FID, Inception Score and precision/recall, the result keys both commands share."""
    fid = _fid(*fake_stats, *ref_stats, notes, progress)
    is_mean, is_std, splits = _is(fake_logits, extractor, notes, rules.is_rule)
    precision, recall = _pr(ref_feats, fake_feats, k, device, notes, rules.pr_distances)
    return {
        "fid": _round(fid),
        "inception_score": _round(is_mean),
        "inception_score_std": _round(is_std),
        "is_splits": splits,
        "precision": _round(precision),
        "recall": _round(recall),
        "k": k,
        "features": _features_doc(extractor),
    }


def _fid(mu1, sigma1, mu2, sigma2, notes: List[str], progress: Progress = None) -> float:
    # scipy's sqrtm of the D x D product dominates for small sets (2048-d: tens of CPU seconds).
    done = _bar(progress, f"FID ({len(mu1)}x{len(mu1)} matrix square root)", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = frechet_distance(mu1, sigma1, mu2, sigma2)
    done(1)
    if any("singular product" in str(w.message) for w in caught):
        notes.append("FID: singular covariance product (fewer images than feature dimensions); "
                     "1e-6 was added to the covariance diagonals, as the ADM evaluator does")
    return value


def _is(logits: Optional[np.ndarray], extractor, notes: List[str], rule: str = "adm"):
    """(mean, std, number of parts) by ``rule``: ``adm`` chunks of 5,000, ``splits10`` 10 splits."""
    if logits is None or len(logits) < 1:
        notes.append("Inception Score: the feature extractor gives no logits; reported as null")
        return None, None, None
    n = len(logits)
    if rule == "adm":
        mean, std = inception_score(logits)
        parts = -(-n // ADM_IS_SPLIT_SIZE)
    else:
        parts = min(IS_SPLITS, n)
        mean, std = inception_score(logits, splits=parts)
        if parts != IS_SPLITS:
            notes.append(f"Inception Score over {parts} splits (fewer images than {IS_SPLITS})")
    if extractor.name == "judge":
        notes.append(f"Inception Score computed over the judge's {logits.shape[1]} classes (at most "
                     f"{logits.shape[1]}); not comparable with Inception-network IS")
    return mean, std, parts


def _pr(ref_feats, fake_feats, k: int, device: str, notes: List[str], distances: str = "adm"):
    if ref_feats is None:
        notes.append("precision/recall need reference features: the --ref .npz holds only mu/sigma "
                     "(no arr_0 images), so they are reported as null")
        return None, None
    if min(len(ref_feats), len(fake_feats)) <= k:
        notes.append(f"precision/recall need more than k={k} images in each set "
                     f"({len(ref_feats)} reference, {len(fake_feats)} samples); reported as null")
        return None, None
    return precision_recall(ref_feats, fake_feats, k=k, device=device, distances=distances)


def _protocol_notes(extractor, n: int, notes: List[str], rules: Rules = Rules()) -> None:
    if extractor.name == "inception" and n != STANDARD_N:
        if rules.is_rule == "adm":
            parts = -(-n // ADM_IS_SPLIT_SIZE)
            how = (f"over {parts} chunk(s) of up to {ADM_IS_SPLIT_SIZE:,}, as the ADM evaluator computes it "
                   "at any N")
        else:
            how = f"over {min(IS_SPLITS, n)} in-order splits (the ADM evaluator would use chunks of 5,000)"
        notes.append(f"{n} images: the standard protocol uses {STANDARD_N:,}. FID is biased upward for "
                     f"fewer images; the Inception Score depends on the images per part ({how}); compare "
                     "numbers only at equal counts and equal rules")
    if extractor.name == "judge":
        notes.append("features from the builtin-shapes judge: meaningful for builtin:shapes data "
                     "only and not comparable with Inception FID")


def _round(x, nd: int = 6):
    return None if x is None else float(round(float(x), nd))


# ----------------------------------------------------------------------------- eval gen
def _check_stats_dim(ref, ref_stats: dict, extractor) -> None:
    dim = _feature_dim(extractor)
    if ref_stats["mu"].shape[0] != dim:
        raise EvalInputError(
            f"--ref {ref}: its mu/sigma are {ref_stats['mu'].shape[0]}-d but the {extractor.name} "
            f"features are {dim}-d; they were computed with another feature extractor "
            f"(ADM reference batches need --features inception)")


def _size_mismatch_note(sample_set: ImageSet, ref_set: ImageSet, extractor) -> str:
    size = "299x299 (TF bilinear)" if extractor.name == "inception" else "32x32 (antialiased)"
    return (f"samples are {sample_set.height}x{sample_set.width}, the reference "
            f"{ref_set.height}x{ref_set.width}: both are resized to {size} by the feature "
            "extractor, but FID is normally reported at matching resolutions")


def eval_gen(
    samples: PathLike,
    ref: PathLike,
    *,
    features: str = "inception",
    inception_weights: Optional[PathLike] = None,
    batch_size: int = 100,
    k: int = 3,
    limit: Optional[int] = None,
    device: str = "cpu",
    progress: Progress = None,
    extractor=None,
    rules: Rules = Rules(),
) -> dict:
    """FID, Inception Score and precision/recall (k-NN, ``k``) of ``samples`` against ``ref``.

    samples / ref: a PNG folder, an ADM ``.npz`` (``arr_0`` uint8 (N, H, W, 3)), or a prepared
    dataset; ``ref`` may also be an ADM reference batch with ``mu``/``sigma`` (FID then uses
    them; precision/recall need its ``arr_0`` images and are null without them). ``limit``
    keeps the first N images of each set (precomputed statistics are used as they are).
    ``extractor`` overrides ``features`` (a ready FeatureExtractor; for tests / library use).
    ``rules``: how IS and the precision/recall distances are computed (default: as ADM).
    ``batch_size`` is the loading batch only: features do not depend on it (``FeatureStream``).
    """
    t0 = time.perf_counter()
    rules.check()
    if k < 1:
        raise InputError(f"--k must be >= 1, got {k}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    notes: List[str] = []
    # 1. cheap input checks (headers only)
    sample_set = open_image_set(samples, limit, batch_size)
    ref_str = os.path.expanduser(str(ref))
    ref_stats = load_reference_stats(ref_str)
    ref_set = None
    if ref_stats is None or _npz_has_images(ref_str):
        ref_set = open_image_set(ref_str, limit, batch_size)
    # 2. the feature extractor: weights located before any work
    if extractor is None:
        choice = resolve_features(features, inception_weights)
        extractor = build_extractor(choice, device, progress)
    if ref_stats is not None:
        _check_stats_dim(ref, ref_stats, extractor)
    # 3. features
    fake_feats, fake_logits = _extract(extractor, sample_set, progress, "sample features")
    if len(fake_feats) < 2:
        raise EvalInputError(f"--samples {samples}: need at least 2 images, got {len(fake_feats)}")
    ref_feats = None
    if ref_set is not None:
        ref_feats, _ = _extract(extractor, ref_set, progress, "reference features")
        if len(ref_feats) < 2 and ref_stats is None:
            raise EvalInputError(f"--ref {ref}: need at least 2 images, got {len(ref_feats)}")
    # 4. metrics
    if ref_stats is not None:
        mu_r, sigma_r = ref_stats["mu"], ref_stats["sigma"]
        notes.append("FID against the precomputed mu/sigma of the reference batch"
                     + (" (from the TF Inception graph; our PyTorch port agrees up to small numerical "
                        "differences)" if extractor.name == "inception" else ""))
    else:
        mu_r, sigma_r = feature_stats(ref_feats)
    scores = _scores(fake_feats, fake_logits, ref_feats, feature_stats(fake_feats), (mu_r, sigma_r), extractor, k,
                     device, notes, progress, rules)
    if ref_set is not None and (ref_set.height, ref_set.width) != (sample_set.height, sample_set.width):
        notes.append(_size_mismatch_note(sample_set, ref_set, extractor))
    _protocol_notes(extractor, len(fake_feats), notes, rules)
    return {
        **scores,
        "protocol": _protocol(extractor, rules, batch_size),
        "n_samples": int(len(fake_feats)),
        "n_ref": None if ref_feats is None else int(len(ref_feats)),
        "samples": {"path": str(samples), "kind": sample_set.kind,
                    "size": [sample_set.height, sample_set.width]},
        "ref": {"path": str(ref), "kind": "stats" if ref_set is None else ref_set.kind,
                "size": None if ref_set is None else [ref_set.height, ref_set.width],
                "fid_stats": "precomputed mu/sigma" if ref_stats is not None else "computed from images"},
        "notes": notes,
        "reptok_version": __version__,
        "seconds": round(time.perf_counter() - t0, 2),
    }


# ----------------------------------------------------------------------------- eval recon
def _check_recon_args(batch_size: int, limit: Optional[int], decoder_steps: Optional[int],
                      solver: Optional[str]) -> None:
    from .. import flow

    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    if decoder_steps is not None and decoder_steps < 1:
        raise InputError(f"--decoder-steps must be >= 1, got {decoder_steps}")
    if solver is not None and solver not in flow.SOLVERS:
        raise InputError(f"--solver {solver!r}: choose one of {', '.join(flow.SOLVERS)}")


def _recon_inputs(ckpt: PathLike, data: PathLike, limit: Optional[int]):
    """The tokenizer run's config document, the prepared dataset (at the tokenizer's resolution)
    and how many of its images to reconstruct (at least 2)."""
    from ..data.dataset import PreparedDataset

    doc = rundir.read_run_config(Path(ckpt))
    cfg = doc["config"]
    ds = PreparedDataset(data)
    if ds.resolution != cfg.image_size:
        raise InputError(f"--data {data}: images are {ds.resolution}px but the tokenizer works at "
                         f"{cfg.image_size}px; prepare the data with --resolution {cfg.image_size}")
    n = len(ds) if limit is None else min(len(ds), limit)
    if n < 2:
        raise EvalInputError(f"--data {data}: need at least 2 images, got {n}")
    return doc, ds, n


def _finite_mean_psnr(p: np.ndarray, notes: List[str]) -> float:
    """Mean PSNR over the finite values (an exact reconstruction is inf), noting how many were not."""
    if np.isinf(p).any():
        notes.append(f"{int(np.isinf(p).sum())} reconstruction(s) identical to the original (PSNR inf); "
                     "the mean PSNR is over the finite values")
    return float(p[np.isfinite(p)].mean()) if np.isfinite(p).any() else float("inf")


def _reconstruct_all(pipe, ds, n: int, batch_size: int, seed: int, steps: int, solver: str, extractor, progress):
    """Reconstruct the first ``n`` images of ``ds``: per-image PSNR and SSIM (uint8), and the
    extractor's feature streams of the originals and of the reconstructions."""
    psnrs, ssims = [], []
    real, fake = FeatureStream(extractor), FeatureStream(extractor)
    advance = _bar(progress, f"reconstructing ({steps} decoder steps)", n)
    for i in range(0, n, batch_size):
        idx = list(range(i, min(i + batch_size, n)))
        x = ds.get_batch(idx)["image"]
        b = pipe.reconstruct(x, seed, start=idx[0], steps=steps, solver=solver, output="np")
        a = ds.get_uint8(idx)
        psnrs.append(psnr(a, b))
        ssims.append(ssim(a, b))
        real.add(a)
        fake.add(b)
        advance(len(idx))
    return np.concatenate(psnrs), np.concatenate(ssims), real, fake


def eval_recon(
    ckpt: PathLike,
    data: PathLike,
    *,
    limit: Optional[int] = None,
    decoder_steps: Optional[int] = None,
    solver: Optional[str] = None,
    batch_size: int = 32,
    seed: int = 0,
    k: int = 3,
    features: str = "inception",
    inception_weights: Optional[PathLike] = None,
    device: str = "cpu",
    progress: Progress = None,
    extractor=None,
    fast: bool = True,
    rules: Rules = Rules(),
) -> dict:
    """Reconstruct the first ``limit`` images of a prepared dataset (in order) with the
    tokenizer of ``ckpt`` (image -> token -> decoder) and report PSNR, SSIM (uint8, per image,
    averaged) and rFID (reconstructions vs originals), plus IS of the reconstructions and
    precision/recall against the originals. Decoder noise comes from (seed, image index).
    ``fast``: the fast path of ``reptok.backends.apply_fast_path`` (bf16 + CUDA graphs on CUDA;
    a no-op on a CPU); False = torch eager fp32. ``rules``: as :func:`eval_gen`.
    """
    t0 = time.perf_counter()
    rules.check()
    _check_recon_args(batch_size, limit, decoder_steps, solver)
    # 1. cheap checks: run config, dataset metadata, resolution
    doc, ds, n = _recon_inputs(ckpt, data, limit)
    cfg = doc["config"]
    steps = int(decoder_steps or cfg.sampling.decoder_steps)
    solver = solver or cfg.sampling.decoder_solver
    # 2. the feature extractor's weights, before any reconstruction work
    choice = None
    if extractor is None:
        choice = resolve_features(features, inception_weights)
    # 3. models
    from ..backends import apply_fast_path, describe_fast_path

    pipe = Pipeline.from_run(ckpt, device, components=("encoder", "decoder", "vae"))
    if pipe.encoder is None or pipe.decoder is None:
        raise InputError(f"--ckpt {ckpt}: needs a tokenizer (encoder + decoder)")
    pipe = apply_fast_path(pipe, fast=fast)
    if extractor is None:
        extractor = build_extractor(choice, device, progress)
    notes: List[str] = []
    trained_on = doc.get("data")
    if trained_on and Path(trained_on).resolve() == Path(data).expanduser().resolve():
        notes.append("--data is the dataset this tokenizer was trained on: these are training-set "
                     "reconstructions; use a held-out split (e.g. ImageNet val) for reportable numbers")
    # 4. reconstruct and measure, batch by batch
    p, s, real, fake = _reconstruct_all(pipe, ds, n, batch_size, seed, steps, solver, extractor, progress)
    real_feats, _ = real.result()
    fake_feats, fake_logits = fake.result()
    psnr_mean = _finite_mean_psnr(p, notes)
    scores = _scores(fake_feats, fake_logits, real_feats, feature_stats(fake_feats), feature_stats(real_feats),
                     extractor, k, device, notes, progress, rules)
    _protocol_notes(extractor, n, notes, rules)

    return {
        "psnr": _round(psnr_mean),
        "ssim": _round(float(s.mean())),
        "rfid": scores["fid"],
        "n": n,
        **scores,
        "n_samples": n,
        "n_ref": n,
        "decoder_steps": steps,
        "solver": solver,
        "fast_path": describe_fast_path(pipe.fast_path),
        "protocol": _protocol(extractor, rules, batch_size),
        "seed": seed,
        "ckpt": str(ckpt),
        "data": str(data),
        "resolution": ds.resolution,
        "notes": notes,
        "reptok_version": __version__,
        "seconds": round(time.perf_counter() - t0, 2),
    }

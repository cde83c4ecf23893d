"""Token extraction: every image of a prepared dataset -> its latent token (stage a -> stage b).

Output: ``tokens.npy`` float32 (N, D) in dataset order, ``tokens.labels.npy`` int64 (N,) and the
sidecar ``tokens.json`` (provenance, token mean/std, class names). Captions, when the dataset
has them, go to ``tokens.captions.json``. Everything is written atomically; under torchrun each
rank encodes a contiguous shard and rank 0 assembles one result identical to a 1-process run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .io import atomic_save, atomic_write_text
from .errors import InputError
from .dist import DistInfo, barrier, shard_range
from .outputs import check_tokens_output, sidecar_paths


def _save_npy(path: Path, arr: np.ndarray) -> None:
    atomic_save(path, lambda tmp: np.save(open(tmp, "wb"), arr))


def extract_tokens(pipe, data: Path, out: Path, batch_size: int = 64, info: DistInfo = DistInfo(),
                   progress=None, limit: Optional[int] = None, overwrite: bool = False) -> dict:
    """Encode every image of ``data`` with ``pipe.encoder``; returns the sidecar dict.
    ``progress(k)`` is called after each batch of k images (of this rank)."""
    from .data.dataset import PreparedDataset

    out = Path(out)
    check_tokens_output(out, overwrite)
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: must be >= 1")
    if limit is not None and limit < 1:
        raise InputError(f"--limit {limit}: must be >= 1")
    ds = PreparedDataset(data)
    if ds.resolution != pipe.cfg.image_size:
        raise InputError(f"{data}: images are {ds.resolution}px but the tokenizer was trained on "
                         f"{pipe.cfg.image_size}px images; prepare the data with --resolution {pipe.cfg.image_size}")
    n = len(ds) if limit is None else min(limit, len(ds))
    mine = shard_range(n, info)
    dev = pipe.device
    parts = []
    for s in range(mine.start, mine.stop, batch_size):
        idx = list(range(s, min(s + batch_size, mine.stop)))
        images = torch.as_tensor(ds.get_batch(idx)["image"]).to(dev)
        parts.append(pipe.encode(images).cpu().numpy().astype(np.float32))
        if progress is not None:
            progress(len(idx))
    d = pipe.cfg.encoder.dim
    local = np.concatenate(parts) if parts else np.zeros((0, d), np.float32)
    paths = sidecar_paths(out)
    if info.enabled:
        # Each rank writes its shard; rank 0 concatenates them in rank order.
        _save_npy(Path(f"{out}.rank{info.rank}.npy"), local)
        barrier()
        if not info.is_main:
            barrier()
            return json.loads(paths["meta"].read_text())
        shards = [Path(f"{out}.rank{r}.npy") for r in range(info.world_size)]
        tokens = np.concatenate([np.load(p) for p in shards])
    else:
        tokens = local
    labels = np.asarray(ds.labels[:n], dtype=np.int64)
    meta = {
        "format": "reptok-tokens/1",
        "count": int(n),
        "dim": int(d),
        "checkpoint": str(Path(pipe.run_dir).resolve()) if pipe.run_dir else None,
        "dataset": str(Path(data).resolve()),
        "labels_file": paths["labels"].name,
        "num_classes": int(ds.num_classes),
        "class_names": ds.class_names,
        "mean": tokens.mean(0).astype(np.float64).tolist() if n else [0.0] * d,
        "std": tokens.std(0).astype(np.float64).tolist() if n else [1.0] * d,
    }
    _save_npy(paths["tokens"], tokens.astype(np.float32))
    _save_npy(paths["labels"], labels)
    if getattr(ds, "has_captions", False):
        meta["captions_file"] = paths["captions"].name
        atomic_write_text(paths["captions"], json.dumps(ds.captions(list(range(n)))))
    atomic_write_text(paths["meta"], json.dumps(meta, indent=1) + "\n")
    if info.enabled:
        for p in shards:
            p.unlink(missing_ok=True)
        barrier()
    return meta


def load_tokens(path: Path) -> dict:
    """Read tokens.npy and its sidecars: dict(tokens (N,D), labels (N,), meta, captions or None)."""
    paths = sidecar_paths(Path(path))
    if not paths["tokens"].exists():
        raise InputError(f"{path}: no such tokens file; run 'reptok extract' first")
    if not paths["meta"].exists():
        raise InputError(f"{path}: its sidecar {paths['meta'].name} is missing; re-run 'reptok extract'")
    meta = json.loads(paths["meta"].read_text())
    try:
        tokens = np.load(paths["tokens"], mmap_mode="r")
    except ValueError as e:
        raise InputError(f"{path}: unreadable tokens file ({e})") from None
    if tokens.ndim != 2 or tokens.shape[0] != meta["count"]:
        raise InputError(f"{path}: expected ({meta['count']}, D) tokens, found shape {tokens.shape}")
    labels = np.load(paths["labels"]) if paths["labels"].exists() else np.full(len(tokens), -1, np.int64)
    captions = json.loads(paths["captions"].read_text()) if paths["captions"].exists() else None
    return {"tokens": tokens, "labels": labels, "meta": meta, "captions": captions}

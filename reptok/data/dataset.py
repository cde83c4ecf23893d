"""Reading a prepared dataset (the output of ``reptok data prep``) fast.

The image column is stored as raw uint8 (3, R, R) arrays in memory-mapped Arrow files. We build
one zero-copy numpy view per Arrow chunk over the mapped file, so ``ds[i]`` and
``ds.get_batch(indices)`` are a page-cache read plus a dtype conversion: no decoding, no per-row
Python formatting. (If a file's layout ever differs, we fall back to ``with_format('numpy')``.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import InputError
from .prep import FORMAT, META_FILE, SKIPPED_FILE

# The latent cache of ``reptok data cache-latents`` (written and read by ``latents.py``).
CACHE_DIR = "latents"
CACHE_META = "latents.json"


def read_meta(path: Union[str, Path]) -> dict:
    """The ``reptok_data.json`` of a prepared dataset; InputError if ``path`` is not one."""
    p = Path(path).expanduser()
    meta_path = p / META_FILE
    if not p.is_dir() or not meta_path.exists():
        raise InputError(f"{path}: not a prepared dataset (no {META_FILE}); run 'reptok data prep SOURCE --out {path}' first")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{meta_path}: corrupt metadata ({e.msg} at line {e.lineno})") from None
    fmt = meta.get("format")
    if fmt != FORMAT:
        raise InputError(f"{meta_path}: unknown dataset format {fmt!r} (expected {FORMAT}); re-run 'reptok data prep'")
    if meta.get("image_layout") != "CHW":
        raise InputError(f"{meta_path}: written by an older reptok (image layout {meta.get('image_layout', 'HWC')!r}); "
                         f"re-run 'reptok data prep'")
    return meta


def _chunk_views(column, shape) -> Optional[List[np.ndarray]]:
    """Zero-copy numpy views (n_chunk, *shape) over an ArrayND extension column, or None."""
    views = []
    try:
        for chunk in column.chunks:
            storage = getattr(chunk, "storage", chunk)
            if storage.null_count:
                return None
            flat = storage
            for _ in range(len(shape)):
                flat = flat.flatten()  # honours the chunk's offset; no copy for list arrays
            arr = flat.to_numpy(zero_copy_only=True)
            if arr.size != len(chunk) * int(np.prod(shape)):
                return None
            views.append(arr.reshape((len(chunk),) + tuple(shape)))
    except Exception:  # noqa: BLE001 - any surprise in the layout: use the slow, safe path
        return None
    return views


class _ColumnReader:
    """Fast row gather over a fixed-shape array column of a datasets.Dataset."""

    def __init__(self, ds, name: str, shape: Sequence[int], dtype):
        self.name = name
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.views = _chunk_views(ds.data.column(name), self.shape)
        self._ds = ds
        if self.views is not None:
            lengths = np.array([len(v) for v in self.views], np.int64)
            self.starts = np.concatenate([[0], np.cumsum(lengths)])
        else:
            self._fmt = ds.with_format("numpy", columns=[name])

    def get(self, indices: np.ndarray) -> np.ndarray:
        if self.views is None:
            return np.asarray(self._fmt[indices][self.name], dtype=self.dtype).reshape((len(indices),) + self.shape)
        out = np.empty((len(indices),) + self.shape, self.dtype)
        chunk = np.searchsorted(self.starts, indices, side="right") - 1
        if len(self.views) == 1:
            out[:] = self.views[0][indices]
            return out
        # Gather per chunk (training batches are random, so typically a few rows per chunk).
        order = np.argsort(chunk, kind="stable")
        sc = chunk[order]
        bounds = np.flatnonzero(np.diff(sc)) + 1
        for grp in np.split(order, bounds):
            c = chunk[grp[0]]
            out[grp] = self.views[c][indices[grp] - self.starts[c]]
        return out


class PreparedDataset(torch.utils.data.Dataset):
    """A prepared dataset directory as a ``torch.utils.data.Dataset``.

    ``ds[i]`` -> ``dict(image=float32 (3, R, R) in [-1, 1], label=int64 tensor (), index=int)``
    (VAE latents live apart, in the latent cache: ``LatentCache.of(ds.path)``).
    ``ds.get_batch(indices)`` -> the same keys batched: image (B, 3, R, R), label (B,), index (B,)
    — one vectorised gather; what training loops that sample indices in bulk should use.
    """

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path).expanduser()
        self.meta = read_meta(self.path)
        self._open()

    def _open(self) -> None:
        import datasets

        try:
            ds = datasets.load_from_disk(str(self.path))
        except Exception as e:  # noqa: BLE001 - corrupt/missing arrow files
            raise InputError(f"{self.path}: unreadable prepared dataset ({type(e).__name__}: {e}); re-run 'reptok data prep'") from None
        if "image" not in ds.column_names or "label" not in ds.column_names:
            raise InputError(f"{self.path}: not a prepared dataset (columns {ds.column_names}); run 'reptok data prep' first")
        self._ds = ds
        r = int(self.meta["resolution"])
        self._images = _ColumnReader(ds, "image", (3, r, r), np.uint8)  # CHW on disk
        self._labels = np.asarray(ds.data.column("label").to_numpy(), np.int64)

    # Views over a memory map do not pickle; DataLoader workers with spawn re-open the files.
    def __getstate__(self):
        return {"path": self.path, "meta": self.meta}

    def __setstate__(self, state):
        self.path, self.meta = state["path"], state["meta"]
        self._open()

    def __len__(self) -> int:
        return len(self._labels)

    # ------------------------------------------------------------------ properties
    @property
    def resolution(self) -> int:
        return int(self.meta["resolution"])

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes", 0))

    @property
    def class_names(self) -> List[str]:
        return list(self.meta.get("class_names") or [])

    @property
    def has_captions(self) -> bool:
        return bool(self.meta.get("has_captions"))

    @property
    def labels(self) -> np.ndarray:
        """int64 (N,) labels of every image (-1 = unlabelled)."""
        return self._labels

    @property
    def hf_dataset(self):
        """The underlying ``datasets.Dataset``."""
        return self._ds

    # ------------------------------------------------------------------ access
    def _indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for a dataset of {n} images")
        return np.where(idx < 0, idx + n, idx)

    def get_uint8_chw(self, indices) -> np.ndarray:
        """Raw images as stored, uint8 (B, 3, R, R): what the training loader ships to the device."""
        return self._images.get(self._indices(indices))

    def get_uint8(self, indices) -> np.ndarray:
        """Raw images, uint8 (B, R, R, 3) (for FID reference statistics, previews)."""
        return np.ascontiguousarray(self._images.get(self._indices(indices)).transpose(0, 2, 3, 1))

    def get_batch(self, indices) -> Dict[str, torch.Tensor]:
        """``dict(image=float32 (B,3,R,R) in [-1,1], label=int64 (B,), index=int64 (B,))``."""
        idx = self._indices(indices)
        raw = torch.from_numpy(self._images.get(idx))  # already channels first
        image = raw.float().div_(127.5).sub_(1.0)
        out = {"image": image, "label": torch.from_numpy(self._labels[idx]), "index": torch.from_numpy(idx)}
        return out

    def __getitem__(self, i: int) -> Dict[str, Any]:
        i = int(i)
        b = self.get_batch([i])
        item = {k: v[0] for k, v in b.items() if k != "index"}
        item["index"] = i if i >= 0 else i + len(self)
        return item

    def captions(self, indices) -> List[str]:
        """Captions of the given images ("" where none)."""
        idx = self._indices(indices)
        col = self._ds.data.column("caption")
        return [c or "" for c in col.take(idx).to_pylist()]


def dataset_info(path: Union[str, Path]) -> Dict[str, Any]:
    """Summary of a prepared dataset for ``reptok data info``: the metadata plus on-disk size,
    per-class counts and the number of unlabelled images."""
    ds = PreparedDataset(path)
    meta = dict(ds.meta)
    labels = ds.labels
    counts = np.bincount(labels[labels >= 0], minlength=ds.num_classes) if ds.num_classes else np.zeros(0, np.int64)
    size = sum(f.stat().st_size for f in ds.path.iterdir() if f.is_file())
    skipped_file = ds.path / SKIPPED_FILE
    cache_meta = ds.path / CACHE_DIR / CACHE_META
    return {
        **meta,
        "path": str(ds.path),
        "count": len(ds),
        "size_bytes": int(size),
        "class_counts": [int(c) for c in counts],
        "unlabelled": int((labels < 0).sum()),
        "latent_cache": json.loads(cache_meta.read_text()) if cache_meta.is_file() else None,
        "skipped_report": str(skipped_file) if skipped_file.exists() else None,
    }

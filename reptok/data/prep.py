"""``reptok data prep``: turn an image folder, a Hugging Face dataset or ``builtin:shapes`` into a
prepared dataset that training memory-maps.

Output directory (a Hugging Face dataset, ``datasets.load_from_disk`` reads it)::

    data-00000-of-0000N.arrow  columns: image   uint8 (3, R, R)  (datasets Array3D, raw pixels, CHW)
                                        label   int64            (-1 when unlabelled)
                                        caption string           ("" when none)
    state.json, dataset_info.json      what ``save_to_disk`` writes
    reptok_data.json                   our metadata (format, resolution, classes, source, ...)
    skipped.txt                        one line per skipped input: ``<where>\\t<reason>``

Pixels are stored raw, not as PNG/JPEG, so an epoch is a memory-mapped read with no decoding.
They are stored channels-first (3, R, R): datasets stores an ArrayND as nested variable-size
lists with an int32 offset per innermost list, so (R, R, 3) would carry R*R offsets per image
(4 bytes per 3 bytes of pixels: 2.3x the file size at 256 px) while (3, R, R) carries 3R (1.5%
at 256 px). CHW is also what the models take. ``PreparedDataset.get_uint8`` returns HWC.
Images are centre-cropped and resized the ADM/DiT way (:func:`reptok.images.center_crop_arr`).

Memory stays bounded for ImageNet-size inputs: images are decoded in a thread pool over a bounded
window and appended to Arrow shards (~500 MB each) as they arrive; only the file list is O(N).
Everything is written into a temporary directory beside OUT that is renamed onto OUT at the very
end, so an interrupted prep leaves nothing half-written behind.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .. import __version__
from ..errors import InputError
from ..io import atomic_dir
from ..outputs import check_new_output
from ..images import IMAGE_EXTENSIONS, center_crop_arr, load_image
from ..shapes import render as _shapes

FORMAT = "reptok-data/1"
META_FILE = "reptok_data.json"
SKIPPED_FILE = "skipped.txt"
BUILTIN_PREFIX = "builtin:"
DEFAULT_SHAPES_COUNT = 12000
DEFAULT_RESOLUTION = 256
DEFAULT_BUILTIN_RESOLUTION = 32
_SHARD_BYTES = 500 * 2**20  # like save_to_disk's default max_shard_size

# Column names we recognise when a Hugging Face dataset does not say (by feature type) which
# column is which.
_IMAGE_NAMES = ("image", "img", "images", "picture", "photo", "png", "jpg", "jpeg", "pixel_values")
_LABEL_NAMES = ("label", "labels", "class", "class_id", "target", "cls", "fine_label")
_CAPTION_NAMES = ("caption", "captions", "text", "prompt", "sentence", "sentences", "description", "txt")

ProgressFn = Callable[[int, int], None]


class _Record:
    """One input: ``key`` names it in the skipped report; ``payload`` is what ``decode`` reads."""

    __slots__ = ("key", "payload", "label", "caption")

    def __init__(self, key: str, payload: Any, label: int, caption: Optional[str] = None):
        self.key, self.payload, self.label, self.caption = key, payload, label, caption


class _Source:
    """A resolved SOURCE: records to decode and what we know about the labels."""

    def __init__(self, kind: str, records: Iterable[_Record], total: int,
                 decode: Callable[[_Record, int], Tuple[np.ndarray, str]],
                 class_names: Optional[List[str]], pre_skipped: Sequence[Tuple[str, str]] = (),
                 extra: Optional[dict] = None):
        self.kind = kind
        self.records = records
        self.total = total
        self.decode = decode
        self.class_names = class_names  # None: unknown (derive from labels); []: unlabelled
        self.pre_skipped = list(pre_skipped)
        self.extra = extra or {}


# ----------------------------------------------------------------------------- builtin
def _builtin_source(source: str, resolution: int, limit: Optional[int], seed: int) -> _Source:
    spec = source[len(BUILTIN_PREFIX):]
    name, _, count = spec.partition(":")
    if name != "shapes":
        raise InputError(f"{source}: unknown builtin dataset; available: builtin:shapes[:N]")
    try:
        n = int(count) if count else DEFAULT_SHAPES_COUNT
    except ValueError:
        raise InputError(f"{source}: the count after 'builtin:shapes:' must be an integer") from None
    if n < 1:
        raise InputError(f"{source}: the count must be >= 1")
    if limit is not None:
        n = min(n, limit)

    def records() -> Iterator[_Record]:
        for i in range(n):
            yield _Record(f"shapes[{i}]", i, i % _shapes.NUM_CLASSES)

    def decode(rec: _Record, res: int) -> Tuple[np.ndarray, str]:
        # Image i has its own RNG stream, so decoding in a thread pool stays deterministic.
        img, caption, _ = _shapes.render_shape(np.random.default_rng([seed, rec.payload]), rec.label, res)
        return img, caption

    return _Source("builtin", records(), n, decode, list(_shapes.CLASS_NAMES),
                   extra={"shapes_version": _shapes.SHAPES_VERSION})


# ----------------------------------------------------------------------------- image folder
def _scan_dir(root: str) -> Tuple[List[str], set]:
    """Image files (sorted, recursive, hidden entries skipped) and the set of ``.txt`` paths."""
    images: List[str] = []
    texts: set = set()
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                subdirs.append(e.path)
            elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                images.append(e.path)
            elif e.name.endswith(".txt"):
                texts.add(e.path)
        stack.extend(reversed(subdirs))
    images.sort()
    return images, texts


def _subset(n: int, limit: Optional[int], seed: int) -> Optional[np.ndarray]:
    """Indices of a seeded random subset of size ``limit`` (in input order), or None for all.
    Random rather than the first N so a limited class-folder prep still covers every class."""
    if limit is None or limit >= n:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def _decode_file(rec: _Record, res: int) -> Tuple[np.ndarray, str]:
    path, caption_path = rec.payload
    arr = load_image(path, res)
    caption = ""
    if caption_path is not None:
        with open(caption_path, encoding="utf-8", errors="replace") as f:
            caption = f.read().strip()
    return arr, caption


def _folder_source(root: Path, limit: Optional[int], seed: int) -> _Source:
    entries = sorted((e for e in os.scandir(root) if not e.name.startswith(".")), key=lambda e: e.name)
    classes: List[Tuple[str, List[str]]] = []
    texts: set = set()
    for e in entries:
        if e.is_dir():
            files, t = _scan_dir(e.path)
            texts |= t
            if files:  # an empty sub-folder is not a class (e.g. a stray output folder)
                classes.append((e.name, files))
    top_files = [e.path for e in entries if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS]
    texts |= {e.path for e in entries if e.is_file() and e.name.endswith(".txt")}
    pre_skipped: List[Tuple[str, str]] = []
    if classes:
        class_names = [name for name, _ in classes]
        files = [(p, label) for label, (_, fs) in enumerate(classes) for p in fs]
        pre_skipped = [(os.path.relpath(p, root), "outside the class sub-folders") for p in top_files]
    else:
        class_names = []
        files = [(p, -1) for p in sorted(top_files)]
    if not files:
        raise InputError(f"{root}: no image files found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    idx = _subset(len(files), limit, seed)
    chosen = files if idx is None else [files[i] for i in idx]

    def records() -> Iterator[_Record]:
        for path, label in chosen:
            cap = os.path.splitext(path)[0] + ".txt"
            yield _Record(os.path.relpath(path, root), (path, cap if cap in texts else None), label)

    return _Source("folder", records(), len(chosen), _decode_file, class_names, pre_skipped,
                   extra={"labelled": bool(classes)})


# ----------------------------------------------------------------------------- Hugging Face
def _is_saved_dataset(p: Path) -> bool:
    return any((p / f).exists() for f in ("state.json", "dataset_dict.json"))


def _load_hf(source: str, split: Optional[str]):
    import datasets

    p = Path(source).expanduser()
    try:
        if p.is_dir() and _is_saved_dataset(p):
            obj = datasets.load_from_disk(str(p))
        else:
            # A hub name, or a local folder of data files (parquet, csv, ...): the real loader.
            obj = datasets.load_dataset(str(p) if p.exists() else source, split=split)
    except InputError:
        raise
    except Exception as e:  # datasets raises many types (offline, not found, bad files)
        hint = ""
        if "ConnectionError" in type(e).__name__ or "reach" in str(e):
            hint = "; no network? pass a local folder or saved dataset, or set HF_HUB_OFFLINE=1 to use the local cache"
        raise InputError(f"{source}: could not load the dataset ({type(e).__name__}: {e}){hint}") from None
    if isinstance(obj, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        names = list(obj)
        if split is not None:
            if split not in obj:
                raise InputError(f"{source}: no split {split!r}; available: {', '.join(names)}")
            obj = obj[split]
            chosen = split
        else:
            chosen = "train" if "train" in obj else names[0]
            obj = obj[chosen]
        return obj, chosen
    return obj, split


def _kind(feature) -> str:
    return type(feature).__name__


def _is_str_feature(f) -> bool:
    if _kind(f) == "Value":
        return f.dtype in ("string", "large_string")
    if _kind(f) in ("List", "Sequence", "LargeList"):
        inner = getattr(f, "feature", None)
        return inner is not None and _kind(inner) == "Value" and inner.dtype in ("string", "large_string")
    return False


def _pick_column(features, explicit: Optional[str], what: str, option: str, auto) -> Optional[str]:
    if explicit is not None:
        if explicit.lower() == "none" and what != "image":
            return None
        if explicit not in features:
            raise InputError(f"{option} {explicit!r}: no such column; columns: {', '.join(features)}")
        return explicit
    return auto()


def _detect_columns(features, image_column, label_column, caption_column) -> Tuple[str, Optional[str], Optional[str]]:
    def auto_image():
        for name, f in features.items():
            if _kind(f) == "Image":
                return name
        for name, f in features.items():
            if _kind(f) == "Array3D" and f.shape[-1] in (1, 3, 4):
                return name
        for name in _IMAGE_NAMES:
            if name in features and (_kind(features[name]) == "Value" and features[name].dtype in ("string", "binary", "large_binary")):
                return name
        return None

    def auto_label():
        for name, f in features.items():
            if _kind(f) == "ClassLabel":
                return name
        for name in _LABEL_NAMES:
            if name in features and _kind(features[name]) == "Value" and "int" in features[name].dtype:
                return name
        return None

    def auto_caption():
        for name in _CAPTION_NAMES:
            if name in features and _is_str_feature(features[name]):
                return name
        return None

    image = _pick_column(features, image_column, "image", "--image-column", auto_image)
    if image is None:
        raise InputError(f"no image column found among {', '.join(features)}; pass --image-column NAME")
    label = _pick_column(features, label_column, "label", "--label-column", auto_label)
    caption = _pick_column(features, caption_column, "caption", "--caption-column", auto_caption)
    return image, label, caption


def _decode_hf_image(value: Any, res: int) -> np.ndarray:
    if value is None:
        raise ValueError("missing image")
    if isinstance(value, dict):  # datasets Image(decode=False): {"bytes": ..., "path": ...}
        if value.get("bytes") is not None:
            with Image.open(io.BytesIO(value["bytes"])) as im:
                im.load()
                return center_crop_arr(im, res)
        if value.get("path"):
            return load_image(value["path"], res)
        raise ValueError("image has neither bytes nor path")
    if isinstance(value, (bytes, bytearray)):
        with Image.open(io.BytesIO(value)) as im:
            im.load()
            return center_crop_arr(im, res)
    if isinstance(value, str):
        return load_image(value, res)
    if isinstance(value, Image.Image):
        value.load()
        return center_crop_arr(value, res)
    arr = np.asarray(value)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"array image of shape {arr.shape}; expected (H, W, 3)")
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return center_crop_arr(Image.fromarray(arr[..., :3]), res)


def _hf_source(source: str, split: Optional[str], limit: Optional[int], seed: int,
               image_column: Optional[str], label_column: Optional[str], caption_column: Optional[str]) -> _Source:
    import datasets

    ds, chosen_split = _load_hf(source, split)
    features = ds.features
    img_col, lab_col, cap_col = _detect_columns(features, image_column, label_column, caption_column)
    class_names: Optional[List[str]] = []
    if lab_col is not None:
        lf = features[lab_col]
        if _kind(lf) == "ClassLabel":
            class_names = list(lf.names)
        elif _kind(lf) == "Value" and "int" in lf.dtype:
            class_names = None  # integer labels without names: derived from the max label
        else:
            raise InputError(f"--label-column {lab_col!r}: expected integer or ClassLabel, got {lf}")
    if cap_col is not None and not _is_str_feature(features[cap_col]):
        raise InputError(f"--caption-column {cap_col!r}: expected a string column, got {features[cap_col]}")
    if _kind(features[img_col]) == "Image":
        # Decode ourselves so that one corrupt image is skipped instead of failing the iteration.
        ds = ds.cast_column(img_col, datasets.Image(decode=False))
    cols = [c for c in (img_col, lab_col, cap_col) if c is not None]
    ds = ds.select_columns(cols)
    if _kind(features[img_col]).startswith("Array"):
        ds = ds.with_format("numpy", columns=[img_col], output_all_columns=True)
    idx = _subset(len(ds), limit, seed)
    if idx is not None:
        ds = ds.select(idx)
    rows = idx if idx is not None else range(len(ds))

    def records() -> Iterator[_Record]:
        pos = 0
        for batch in ds.iter(batch_size=256):
            n = len(batch[img_col])
            for j in range(n):
                row = int(rows[pos + j])
                label = -1
                if lab_col is not None and batch[lab_col][j] is not None:
                    label = int(batch[lab_col][j])
                caption = ""
                if cap_col is not None:
                    c = batch[cap_col][j]
                    if isinstance(c, (list, tuple, np.ndarray)):  # e.g. COCO: several captions
                        c = c[0] if len(c) else ""
                    caption = "" if c is None else str(c).strip()
                yield _Record(f"row {row}", batch[img_col][j], label, caption)
            pos += n

    def decode(rec: _Record, res: int) -> Tuple[np.ndarray, str]:
        return _decode_hf_image(rec.payload, res), rec.caption or ""

    return _Source("huggingface", records(), len(ds), decode, class_names,
                   extra={"split": chosen_split, "columns": {"image": img_col, "label": lab_col, "caption": cap_col}})


# ----------------------------------------------------------------------------- writing
class _ShardWriter:
    """Appends batches to ``data-*.arrow`` shards in ``directory``; ``finish`` makes the directory
    loadable by ``datasets.load_from_disk`` (the same files ``save_to_disk`` writes, written
    once, instead of a cache copy followed by a second full copy)."""

    def __init__(self, directory: Path, resolution: int):
        self.dir = directory
        self.res = resolution
        self.features = None
        self.writer = None
        self.shards: List[Path] = []
        self.rows_in_shard = 0
        self.count = 0
        self.rows_per_shard = 1

    def _make_features(self):
        import datasets

        feats = {
            "image": datasets.Array3D(shape=(3, self.res, self.res), dtype="uint8"),
            "label": datasets.Value("int64"),
            "caption": datasets.Value("string"),
        }
        row_bytes = self.res * self.res * 3
        self.rows_per_shard = max(1, _SHARD_BYTES // row_bytes)
        return datasets.Features(feats)

    def write(self, images: np.ndarray, labels: np.ndarray, captions: List[str]):
        from datasets.arrow_writer import ArrowWriter

        if self.features is None:
            self.features = self._make_features()
        start = 0
        while start < len(images):
            if self.writer is None or self.rows_in_shard >= self.rows_per_shard:
                self._close_shard()
                path = self.dir / f"shard-{len(self.shards):05d}.arrow.tmp"
                self.shards.append(path)
                self.writer = ArrowWriter(features=self.features, path=str(path))
                self.rows_in_shard = 0
            take = min(len(images) - start, self.rows_per_shard - self.rows_in_shard)
            sl = slice(start, start + take)
            # HWC -> CHW (see the module docstring for why the file layout is channels-first)
            batch = {"image": np.ascontiguousarray(images[sl].transpose(0, 3, 1, 2)), "label": labels[sl],
                     "caption": captions[sl]}
            self.writer.write_batch(batch)
            self.rows_in_shard += take
            self.count += take
            start += take

    def _close_shard(self):
        if self.writer is not None:
            self.writer.finalize()
            self.writer.close()
            self.writer = None

    def abort(self):
        try:
            if self.writer is not None:
                self.writer.close()
        finally:
            self.writer = None

    def finish(self) -> None:
        import datasets

        self._close_shard()
        n = len(self.shards)
        names = []
        for i, path in enumerate(self.shards):
            name = f"data-{i:05d}-of-{n:05d}.arrow"
            os.replace(path, self.dir / name)
            names.append(name)
        # state.json / dataset_info.json: let this datasets version write them for a one-row
        # dataset with the same features, then point them at our shards. Robust to the exact
        # fields a version expects, and costs one row.
        first = datasets.Dataset.from_file(str(self.dir / names[0]))
        one = datasets.Dataset.from_dict(first[:1], features=self.features)  # in memory: no cache file
        scratch = Path(tempfile.mkdtemp(prefix=".scratch-", dir=self.dir))
        try:
            one.save_to_disk(str(scratch))
            state = json.loads((scratch / "state.json").read_text())
            info = json.loads((scratch / "dataset_info.json").read_text())
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        state["_data_files"] = [{"filename": name} for name in names]
        (self.dir / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        (self.dir / "dataset_info.json").write_text(json.dumps(info, indent=2, sort_keys=True))


def _ordered_map(fn, items: Iterable, workers: int, window: int) -> Iterator:
    """``map(fn, items)`` in input order on a thread pool, with at most ``window`` in flight (a
    plain ``Executor.map`` would submit the whole ImageNet file list at once)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    ex = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reptok-prep")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(ex.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        ex.shutdown(wait=True, cancel_futures=True)


def _resolve_out(out: Path, overwrite: bool, source: str) -> None:
    check_new_output(out, overwrite, folder=True)
    src = Path(source).expanduser()
    if src.exists():
        s, o = src.resolve(), out.resolve()
        if s == o or o in s.parents:
            raise InputError(f"--out {out}: would replace the source {source}; choose another folder")


@contextmanager
def _quiet_datasets():
    """Silence datasets' own tqdm bars (loading, casting, saving) while we show ours."""
    try:
        from datasets.utils import logging as dlog
    except ImportError:  # pragma: no cover
        yield
        return
    was_enabled = dlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            dlog.enable_progress_bar()


def prepare(
    source: str,
    out,
    resolution: Optional[int] = None,
    limit: Optional[int] = None,
    split: Optional[str] = None,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    caption_column: Optional[str] = None,
    seed: int = 0,
    progress: Optional[ProgressFn] = None,
    overwrite: bool = False,
    batch_size: int = 256,
    workers: Optional[int] = None,
) -> Dict[str, Any]:
    """Prepare SOURCE into the dataset directory ``out`` and return a summary dict.

    SOURCE: ``builtin:shapes`` or ``builtin:shapes:N`` (N images, default 12000); a local image
    folder (one sub-folder per class gives labels, class names are the sorted sub-folder names;
    a flat folder is unlabelled, label -1; ``name.txt`` beside ``name.jpg`` is its caption); a
    saved ``datasets`` directory (``load_from_disk``); or a Hugging Face dataset name / local
    data folder (``load_dataset(source, split=split)``; default split "train").

    resolution: output side R (default 32 for builtin, 256 otherwise). limit: keep at most N
    inputs (builtin: the first N; otherwise a random subset drawn with ``seed``, kept in input
    order, so every class is represented). seed: builtin generation seed / subset seed.
    *_column: Hugging Face column names (default: detected by feature type, then by name;
    "none" disables label/caption). progress(done, total) is called after each batch.
    workers: decoding threads. (VAE latents are cached apart, by ``reptok data cache-latents``:
    ``reptok/data/latents.py``.)

    Unreadable or truncated images are skipped and listed in ``skipped.txt``; InputError (exit
    code 2) if none is usable. The summary is the ``reptok_data.json`` metadata plus ``out``,
    ``seconds`` and ``images_per_s``.
    """
    with _quiet_datasets():
        return _prepare(
            source, out, resolution, limit, split, image_column, label_column, caption_column, seed,
            progress, overwrite, batch_size, workers,
        )


def _prepare(source, out, resolution, limit, split, image_column, label_column, caption_column, seed,
             progress, overwrite, batch_size, workers) -> Dict[str, Any]:
    t0 = time.perf_counter()
    source = str(source)
    out = Path(out).expanduser()
    builtin = source.startswith(BUILTIN_PREFIX)
    res = int(resolution) if resolution is not None else (DEFAULT_BUILTIN_RESOLUTION if builtin else DEFAULT_RESOLUTION)
    if res < 1:
        raise InputError(f"--resolution {res}: must be a positive number of pixels")
    if limit is not None and int(limit) < 1:
        raise InputError(f"--limit {limit}: must be >= 1")
    if batch_size < 1:
        raise InputError(f"batch size {batch_size}: must be >= 1")
    _resolve_out(out, overwrite, source)
    src = _open_source(source, res, limit, split, image_column, label_column, caption_column, seed)

    workers = min(8, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    with atomic_dir(out, overwrite) as tmp:  # Ctrl-C, a failure or "nothing usable": nothing half-written
        writer = _ShardWriter(tmp, res)
        try:
            stats = _write_shards(source, src, writer, res, batch_size, workers, progress)
        except BaseException:
            writer.abort()
            raise
        meta = _meta(source, src, res, seed, limit, writer.count, stats)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        (tmp / SKIPPED_FILE).write_text("".join(f"{k}\t{r}\n" for k, r in stats["skipped"]))
    seconds = time.perf_counter() - t0
    return {**meta, "out": str(out), "seconds": round(seconds, 3),
            "images_per_s": round(writer.count / max(seconds, 1e-9), 1)}


def _open_source(source: str, res, limit, split, image_column, label_column, caption_column, seed) -> "_Source":
    """``builtin:...`` | a folder of images | a saved / Hub dataset."""
    if source.startswith(BUILTIN_PREFIX):
        return _builtin_source(source, res, limit, seed)
    p = Path(source).expanduser()
    if p.is_dir() and not _is_saved_dataset(p) and _has_images(p):
        return _folder_source(p, limit, seed)
    if p.exists() or not source.startswith(("/", "./", "../", "~")):
        return _hf_source(source, split, limit, seed, image_column, label_column, caption_column)
    raise InputError(f"{source}: no such folder (and not a builtin: or Hugging Face dataset name)")


def _decode_one(src: "_Source", rec: _Record, res: int):
    """``(rec, pixels, caption, None)``, or ``(rec, None, "", why)`` for an undecodable input."""
    try:
        arr, caption = src.decode(rec, res)
        return rec, arr, caption, None
    except Exception as e:  # noqa: BLE001 - any undecodable input is skipped, not fatal
        msg = str(e)
        if isinstance(e, InputError):
            # load_image's message starts with the path; the report has it already.
            msg = msg.split(": ", 1)[-1]
        elif not msg:
            msg = type(e).__name__
        return rec, None, "", msg


def _write_shards(source: str, src: "_Source", writer: "_ShardWriter", res: int, batch_size: int,
                  workers: int, progress) -> Dict[str, Any]:
    """Decode every record (``workers`` threads, in order) into ``writer``'s shards, ``batch_size``
    at a time; the skipped records and what the metadata needs. InputError if nothing was usable."""
    skipped: List[Tuple[str, str]] = list(src.pre_skipped)
    n_bad, max_label, has_captions, done = 0, -1, False, 0
    imgs: List[np.ndarray] = []
    labels: List[int] = []
    caps: List[str] = []
    results = _ordered_map(lambda rec: _decode_one(src, rec, res), src.records, workers,
                           window=max(2 * batch_size, 4 * workers))
    try:
        for rec, arr, caption, err in results:
            done += 1
            if err is not None:
                skipped.append((rec.key, err))
                n_bad += 1
            else:
                imgs.append(arr)
                labels.append(rec.label)
                caps.append(caption)
                has_captions = has_captions or bool(caption)
                max_label = max(max_label, rec.label)
            if len(imgs) >= batch_size:
                writer.write(np.stack(imgs), np.asarray(labels, np.int64), caps)
                imgs, labels, caps = [], [], []
            if progress is not None and (done % batch_size == 0 or done == src.total):
                progress(done, src.total)
        if imgs:
            writer.write(np.stack(imgs), np.asarray(labels, np.int64), caps)
    except BaseException:
        results.close()  # stop the decoding threads at once on Ctrl-C / errors
        raise
    if writer.count == 0:
        examples = "; ".join(f"{k}: {r}" for k, r in skipped[:3])
        raise InputError(
            f"{source}: no usable images ({n_bad} of {done} unreadable"
            + (f", e.g. {examples}" if examples else "") + ")"
        )
    writer.finish()
    return {"skipped": skipped, "unreadable": n_bad, "max_label": max_label, "has_captions": has_captions}


def _meta(source: str, src: "_Source", res: int, seed, limit, count: int, stats: Dict[str, Any]) -> Dict[str, Any]:
    class_names = src.class_names
    if class_names is None:  # integer labels without names
        class_names = [str(i) for i in range(stats["max_label"] + 1)]
    return {
        "format": FORMAT,
        "source": source,
        "source_kind": src.kind,
        "resolution": res,
        "count": count,
        "num_classes": len(class_names),
        "class_names": class_names,
        "has_captions": stats["has_captions"],
        "skipped": len(stats["skipped"]),
        "unreadable": stats["unreadable"],
        "seed": seed,
        "limit": limit,
        "crop": "adm-center-crop",
        "image_layout": "CHW",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **src.extra,
        "reptok_version": __version__,
    }


def _has_images(root: Path, max_depth: int = 3) -> bool:
    """True if ``root`` holds an image file within ``max_depth`` levels (stops at the first one):
    tells an image folder from a folder of parquet/csv files meant for ``load_dataset``."""
    stack = [(str(root), 0)]
    while stack:
        d, depth = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                        return True
                    if e.is_dir() and depth < max_depth:
                        stack.append((e.path, depth + 1))
        except OSError:
            continue
    return False

"""Image sets for evaluation: PNG/JPG folders, ADM ``.npz`` batches, prepared datasets.

Every source yields uint8 (B, H, W, 3) numpy batches in a deterministic order, so sample and
reference sets can be fed straight to a :class:`~reptok.evaluate.inception.FeatureExtractor`.
Problems with the input are :class:`EvalInputError` with a one-line message, raised before any
feature extraction where the check is cheap (existence, emptiness, npz shape/dtype, image sizes
of a folder).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..errors import InputError
from ..images import IMAGE_EXTENSIONS
from .metrics import feature_stats

__all__ = [
    "DEFAULT_FEATURE_CHUNK",
    "EvalInputError",
    "FeatureStream",
    "IMAGE_EXTENSIONS",
    "ImageSet",
    "compute_stats",
    "feature_chunk",
    "images_to_uint8",
    "load_images",
    "load_reference_stats",
]

_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class EvalInputError(InputError):
    """A sample or reference set cannot be used (missing, empty, wrong shape/dtype, mixed sizes)."""


@dataclass
class ImageSet:
    """A loaded image source: iterate it for uint8 (B, H, W, 3) batches; ``len()`` is the count.

    kind: ``"folder"``, ``"npz"`` or ``"dataset"``; n: number of images (after ``limit``);
    height/width: the common image size.
    """

    path: str
    kind: str
    n: int
    height: int
    width: int
    batch_size: int = 100
    _batches: Callable[[int], Iterator[np.ndarray]] = field(repr=False, default=None)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.batches()

    def batches(self, batch_size: Optional[int] = None) -> Iterator[np.ndarray]:
        """uint8 (b, H, W, 3) batches, b <= batch_size, in the source's order."""
        bs = int(batch_size or self.batch_size)
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {bs}")
        return self._batches(bs)

    def describe(self) -> str:
        return f"{self.kind} {self.path}: {self.n} images {self.height}x{self.width}"


# ----------------------------------------------------------------------------- npz (ADM)
def _npy_header(f) -> Tuple[Tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return np.lib.format._read_array_header(f, version)  # (3, 0): utf-8 header, same layout


def _check_image_array(shape, dtype, what: str) -> None:
    if len(shape) != 4 or shape[-1] != 3 or np.dtype(dtype) != np.uint8:
        raise EvalInputError(
            f"{what} must be uint8 images of shape (N, H, W, 3), got {np.dtype(dtype)} {tuple(shape)}"
        )


def _load_npz(path: str, limit: Optional[int], batch_size: int) -> ImageSet:
    # Read only the .npy header of arr_0 so a 50K x 256 x 256 x 3 file is validated without
    # loading ~10 GB, then stream it batch by batch (as the ADM evaluator does).
    try:
        with zipfile.ZipFile(path) as zf:
            if "arr_0.npy" not in zf.namelist():
                keys = ", ".join(n[:-4] for n in zf.namelist() if n.endswith(".npy")) or "none"
                raise EvalInputError(f"{path}: no 'arr_0' array of images (arrays: {keys})")
            with zf.open("arr_0.npy") as f:
                shape, fortran, dtype = _npy_header(f)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        if isinstance(e, EvalInputError):
            raise
        raise EvalInputError(f"{path}: not a readable .npz file ({e})") from e
    _check_image_array(shape, dtype, f"{path}: arr_0")
    n_all, h, w, _ = shape
    n = n_all if limit is None else min(n_all, limit)
    if n == 0:
        raise EvalInputError(f"{path}: arr_0 holds no images")
    if fortran:
        # Rare (np.save of a Fortran-ordered array): fall back to loading the whole array.
        def batches(bs: int) -> Iterator[np.ndarray]:
            arr = np.ascontiguousarray(np.load(path)["arr_0"][:n])
            for i in range(0, n, bs):
                yield arr[i : i + bs]
    else:
        def batches(bs: int) -> Iterator[np.ndarray]:
            per_image = h * w * 3
            with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
                _npy_header(f)
                for i in range(0, n, bs):
                    b = min(bs, n - i)
                    buf = f.read(b * per_image)
                    if len(buf) != b * per_image:
                        raise EvalInputError(f"{path}: arr_0 is truncated at image {i}")
                    yield np.frombuffer(buf, dtype=np.uint8).reshape(b, h, w, 3)

    return ImageSet(path, "npz", n, h, w, batch_size, batches)


def load_reference_stats(path: str) -> Optional[Dict[str, np.ndarray]]:
    """Precomputed ``mu`` (D,) / ``sigma`` (D, D) of an ADM reference batch ``.npz``, as float64.

    Returns None when ``path`` is not an ``.npz`` or holds no ``mu``/``sigma`` (then compute
    the statistics from its images). Note: ADM's reference statistics come from the TensorFlow
    Inception graph; our PyTorch port reproduces them up to small numerical differences.
    """
    if not (os.path.isfile(path) and path.lower().endswith(".npz")):
        return None
    try:
        with np.load(path) as z:
            if "mu" not in z.files or "sigma" not in z.files:
                return None
            mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise EvalInputError(f"{path}: not a readable .npz file ({e})") from e
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise EvalInputError(
            f"{path}: reference statistics must be mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}"
        )
    return {"mu": mu, "sigma": sigma}


# ----------------------------------------------------------------------------- image folder
def _pil_to_rgb(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _load_folder(path: str, limit: Optional[int], batch_size: int) -> ImageSet:
    from PIL import Image

    files: List[str] = []
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files.extend(
            os.path.join(root, nm)
            for nm in names
            if nm.lower().endswith(IMAGE_EXTENSIONS) and not nm.startswith(".")
        )
    # Sorted by path relative to the root: deterministic order across machines.
    files.sort(key=lambda p: os.path.relpath(p, path))
    if limit is not None:
        files = files[:limit]
    if not files:
        raise EvalInputError(
            f"{path}: no images found (expected {', '.join(IMAGE_EXTENSIONS)} files, searched recursively)"
        )
    # Headers only (PIL opens lazily): a mixed-size or unreadable set fails before any work.
    sizes: Dict[Tuple[int, int], str] = {}
    for fp in files:
        try:
            with Image.open(fp) as im:
                sizes.setdefault(im.size, fp)
        except Exception as e:  # PIL raises several types for broken files
            raise EvalInputError(f"{fp}: cannot read image ({e})") from e
        if len(sizes) > 1:
            (s1, f1), (s2, f2) = list(sizes.items())[:2]
            raise EvalInputError(
                f"{path}: mixed image sizes ({s1[0]}x{s1[1]} in {f1}, {s2[0]}x{s2[1]} in {f2}); "
                "resize or crop them to one size first"
            )
    (w, h), = sizes.keys()

    def batches(bs: int) -> Iterator[np.ndarray]:
        for i in range(0, len(files), bs):
            out = []
            for fp in files[i : i + bs]:
                with Image.open(fp) as im:
                    out.append(_pil_to_rgb(im))
            yield np.stack(out)

    return ImageSet(path, "folder", len(files), h, w, batch_size, batches)


# ----------------------------------------------------------------------------- datasets dir
def _image_column(ds) -> str:
    import datasets

    if "image" in ds.column_names:
        return "image"
    for name, feat in ds.features.items():
        if isinstance(feat, datasets.Image):
            return name
    raise EvalInputError(
        f"dataset has no image column (columns: {', '.join(ds.column_names)}); expected 'image'"
    )


def _as_rgb_array(x, where: str) -> np.ndarray:
    if hasattr(x, "convert"):  # PIL image (datasets.Image feature, decoded)
        return _pil_to_rgb(x)
    a = np.asarray(x)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3:
        raise EvalInputError(
            f"{where}: expected an RGB image or uint8 (H, W, 3) array, got {a.dtype} {a.shape}"
        )
    return a


def _load_dataset(path: str, limit: Optional[int], batch_size: int) -> ImageSet:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # corrupted / incompatible directory
        raise EvalInputError(f"{path}: cannot load the dataset ({e})") from e
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.keys())
        if len(splits) != 1:
            raise EvalInputError(
                f"{path}: dataset has splits {', '.join(splits)}; pass {os.path.join(path, '<split>')}"
            )
        ds = ds[splits[0]]
    col = _image_column(ds)
    n = len(ds) if limit is None else min(len(ds), limit)
    if n == 0:
        raise EvalInputError(f"{path}: the dataset holds no images")
    ds = ds.select_columns([col])
    first = _as_rgb_array(ds[0][col], f"{path}[0]")
    h, w = first.shape[:2]

    def batches(bs: int) -> Iterator[np.ndarray]:
        for i in range(0, n, bs):
            rows = ds[i : min(i + bs, n)][col]
            out = []
            for j, x in enumerate(rows):
                a = _as_rgb_array(x, f"{path}[{i + j}]")
                if a.shape[:2] != (h, w):
                    raise EvalInputError(
                        f"{path}: mixed image sizes ({w}x{h} at index 0, {a.shape[1]}x{a.shape[0]} "
                        f"at index {i + j}); resize or crop them to one size first"
                    )
                out.append(a)
            yield np.stack(out)

    return ImageSet(path, "dataset", n, h, w, batch_size, batches)


# ----------------------------------------------------------------------------- entry points
def load_images(path: str, limit: Optional[int] = None, batch_size: int = 100) -> ImageSet:
    """Open an image set for evaluation.

    path: a folder of PNG/JPG images (recursive, sorted by relative path), an ADM ``.npz``
    (``arr_0``: uint8 (N, H, W, 3); other arrays such as labels or ``mu``/``sigma`` are
    ignored here), or a directory written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a
    ``DatasetDict`` with one split -- pass ``DIR/<split>`` for several; column ``image``, else
    the first ``datasets.Image`` column). ``limit`` keeps the first ``limit`` images.

    Returns an :class:`ImageSet` (iterable of uint8 (B, H, W, 3) batches, ``len`` = count).
    Raises :class:`EvalInputError` for a missing path, an empty set, a wrong shape/dtype or
    mixed image sizes.
    """
    path = os.path.expanduser(str(path))
    if limit is not None and limit < 1:
        raise EvalInputError(f"limit must be >= 1, got {limit}")
    if not os.path.exists(path):
        raise EvalInputError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        if path.lower().endswith(".npz"):
            return _load_npz(path, limit, batch_size)
        raise EvalInputError(
            f"{path}: unsupported file; expected an ADM .npz (arr_0), a folder of images, "
            "or a dataset directory saved with save_to_disk"
        )
    if os.path.isfile(os.path.join(path, "reptok_data.json")):
        return _load_prepared(path, limit, batch_size)
    if any(os.path.isfile(os.path.join(path, m)) for m in _HF_MARKERS):
        return _load_dataset(path, limit, batch_size)
    return _load_folder(path, limit, batch_size)


def _load_prepared(path: str, limit: Optional[int], batch_size: int) -> "ImageSet":
    """A ``reptok data prep`` dataset (stored channels-first), read through PreparedDataset."""
    from ..data.dataset import PreparedDataset

    ds = PreparedDataset(path)
    n = len(ds) if limit is None else min(len(ds), limit)
    if n == 0:
        raise EvalInputError(f"{path}: the prepared dataset holds no images")
    r = ds.resolution

    def batches(bs: int):
        for i in range(0, n, bs):
            yield ds.get_uint8(np.arange(i, min(i + bs, n)))

    return ImageSet(str(path), "prepared", n, r, r, batch_size, batches)


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """reptok images, float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3) numpy
    (:func:`reptok.images.tensor_to_uint8`)."""
    from ..images import tensor_to_uint8

    return tensor_to_uint8(images)


DEFAULT_FEATURE_CHUNK = 64


def feature_chunk(extractor) -> int:
    """How many images the extractor runs at once: its ``chunk`` attribute (the FID Inception:
    1 on a CPU, 100 on CUDA), else :data:`DEFAULT_FEATURE_CHUNK`."""
    return int(getattr(extractor, "chunk", None) or DEFAULT_FEATURE_CHUNK)


def _as_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, np.float32)


class FeatureStream:
    """Features (and logits) of one image set, computed in fixed chunks of the whole stream.

    Images arrive in batches of any size (``add``); the extractor always sees
    :func:`feature_chunk` images, cut from the concatenated stream, the last chunk padded with
    black images whose outputs are dropped. So every image is computed with the same
    companions and batch shape whatever the loader's batch size: kernels (cuDNN, GEMMs) choose
    their algorithm and reduction order by shape, which otherwise moves features and logits in
    the last bits (measured on a CPU: logits differ by 6e-7 between batch shapes).
    """

    def __init__(self, extractor) -> None:
        self.extractor = extractor
        self.chunk = feature_chunk(extractor)
        self._pending: List[np.ndarray] = []
        self._features: List[np.ndarray] = []
        self._logits: Optional[List[np.ndarray]] = []

    def add(self, images) -> None:
        """uint8 (B, H, W, 3) images (numpy or torch)."""
        images = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        self._pending.append(images)
        if sum(len(p) for p in self._pending) >= self.chunk:
            buf = np.concatenate(self._pending)
            full = len(buf) // self.chunk * self.chunk
            for i in range(0, full, self.chunk):
                self._run(buf[i: i + self.chunk])
            self._pending = [buf[full:]] if full < len(buf) else []

    def _run(self, images: np.ndarray) -> None:
        n = len(images)
        if n < self.chunk:  # the stream's last chunk: pad to the fixed shape
            images = np.concatenate([images, np.zeros((self.chunk - n,) + images.shape[1:], images.dtype)])
        out = self.extractor(np.ascontiguousarray(images))
        f = _as_np(out["features"])[:n]
        self._features.append(f.reshape(n, -1))
        lg = out.get("logits")
        if lg is None:
            self._logits = None
        elif self._logits is not None:
            self._logits.append(_as_np(lg)[:n])

    def result(self) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """``(features (N, F) float32, logits (N, K) float32 or None)``."""
        if self._pending:
            self._run(np.concatenate(self._pending))
            self._pending = []
        if not self._features:
            raise EvalInputError("no images to compute features on")
        logits = np.concatenate(self._logits) if self._logits else None
        return np.concatenate(self._features), logits


def compute_stats(
    extractor,
    batches: Iterable[np.ndarray],
    *,
    progress: Optional[Callable[[int], None]] = None,
) -> Dict[str, object]:
    """Run a feature extractor over uint8 batches (in a :class:`FeatureStream`) and collect FID
    statistics.

    extractor: a :class:`~reptok.evaluate.inception.FeatureExtractor`; batches: iterable of
    uint8 (B, H, W, 3) (e.g. an :class:`ImageSet`); progress: called with each batch's size.
    Returns ``{"mu": (F,) float64, "sigma": (F, F) float64, "features": (N, F) float32,
    "logits": (N, K) float32 or None, "n": N}``.
    """
    stream = FeatureStream(extractor)
    for batch in batches:
        stream.add(batch)
        if progress is not None:
            progress(len(batch))
    try:
        features, logits = stream.result()
    except EvalInputError:
        raise EvalInputError("no images to compute statistics on") from None
    if features.shape[0] < 2:
        raise EvalInputError(f"need at least 2 images for feature statistics, got {features.shape[0]}")
    mu, sigma = feature_stats(features)
    return {
        "mu": mu,
        "sigma": sigma,
        "features": features,
        "logits": logits,
        "n": int(features.shape[0]),
    }

"""The SD-VAE latent cache of a prepared dataset (``reptok data cache-latents``).

Stage (a) needs the frozen VAE's posterior of every training image on every step; computing it
once saves the encoder's ~273 GFLOPs per 256 px image per step. The cache lives next to the
Arrow files:

```
DATA/latents/moments.npy   float16 (N, V, 2C, h, w): [mean, logvar] (diffusers latent_dist.parameters);
                           V = 2 with flips: view 1 is the mirror image's posterior (not a mirrored latent)
DATA/latents/latents.json  {"vae": ..., "subfolder": ..., "resolution": R, "flips": bool, "shape": [...]}
```

Writing goes to ``DATA/latents.partial/`` (a preallocated memmap plus one marker file per finished
chunk, so an interrupted run resumes where it stopped; the data starts on a page boundary and a
chunk fills whole pages, so ranks never share a page); under torchrun each rank encodes its
contiguous share of the chunks still to do. When every chunk is done, rank 0 writes the metadata and renames
the directory into place: a cache either exists complete or not at all.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import shutil
import struct
import time
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from .. import io
from ..errors import InputError
from .dataset import CACHE_DIR, CACHE_META, PreparedDataset



PARTIAL_DIR = "latents.partial"
MOMENTS = "moments.npy"
CHUNK = 256  # images per resumable unit


def vae_identity(source: str, subfolder: Optional[str] = None) -> dict:
    """What identifies a VAE for the cache: a local directory by its absolute path, else the hub id."""
    p = Path(str(source)).expanduser()
    return {"vae": str(p.resolve()) if p.exists() else str(source), "subfolder": subfolder or None}


def load_vae(source: str, subfolder: Optional[str] = None):
    """The frozen ``LatentVAE`` of a hub id or diffusers directory, sized from its own config."""
    from ..config import VAEConfig
    from ..models.vae import LatentVAE

    if source in ("none", "", None):
        raise InputError("--vae none is pixel space: there are no latents to cache")
    cfg = VAEConfig(source=source, subfolder=subfolder)
    module = LatentVAE._load(cfg, None)
    c = module.config
    cfg.latent_channels, cfg.downsample = int(c.latent_channels), 2 ** (len(c.block_out_channels) - 1)
    return LatentVAE(cfg, module=module)


class LatentCache:
    """Read side: ``cache.get(indices)`` -> float16 (B, V, 2C, h, w) from the memory map."""

    def __init__(self, data: Union[str, Path]):
        self.dir = Path(data) / CACHE_DIR
        try:
            self.meta = json.loads((self.dir / CACHE_META).read_text())
            self.moments = np.load(self.dir / MOMENTS, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise InputError(f"{self.dir}: unreadable latent cache ({e}); delete it and re-run "
                             f"'reptok data cache-latents'") from None

    # A memory map pickles as a full copy: DataLoader workers started with spawn re-open it.
    def __getstate__(self):
        return {"dir": self.dir}

    def __setstate__(self, state):
        self.__init__(state["dir"].parent)

    @staticmethod
    def exists(data: Union[str, Path]) -> bool:
        return (Path(data) / CACHE_DIR / CACHE_META).is_file()

    @classmethod
    def of(cls, data: Union[str, Path]) -> Optional["LatentCache"]:
        """The ``reptok data cache-latents`` cache of the prepared dataset ``data``, or None."""
        return cls(data) if cls.exists(data) else None

    @property
    def flips(self) -> bool:
        return bool(self.meta.get("flips"))

    def __len__(self) -> int:
        return int(self.moments.shape[0])

    def get(self, indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, np.int64)
        order = np.argsort(idx)  # sorted reads are kinder to the page cache
        out = np.empty((len(idx),) + self.moments.shape[1:], np.float16)
        out[order] = self.moments[idx[order]]
        return out

    def check(self, source: str, subfolder: Optional[str], resolution: int, moment_shape, hflip: bool) -> None:
        """InputError unless this cache was made by the run's VAE at its resolution (and has the
        mirrored views when the run flips)."""
        want = vae_identity(source, subfolder)
        have = {"vae": self.meta.get("vae"), "subfolder": self.meta.get("subfolder")}
        if have != want or int(self.meta.get("resolution", -1)) != int(resolution):
            raise InputError(
                f"{self.dir}: latent cache made with VAE {have['vae']!r} at {self.meta.get('resolution')} px, but this "
                f"run uses {want['vae']!r} at {resolution} px; re-run 'reptok data cache-latents --vae ...' "
                f"with the run's VAE (it replaces the cache) or train with the cache's VAE")
        if tuple(self.moments.shape[2:]) != tuple(moment_shape):
            raise InputError(f"{self.dir}: cached moments are {tuple(self.moments.shape[2:])} per image, the "
                             f"run's VAE gives {tuple(moment_shape)}; re-run 'reptok data cache-latents'")
        if hflip and not self.flips:
            raise InputError(f"{self.dir}: the cache has no mirrored images but the run uses --hflip; "
                             f"re-run 'reptok data cache-latents' with --hflip, or train with --no-hflip")


def cache_latents(
    data: Union[str, Path], vae, identity: dict, *, flips: bool = True, batch_size: Optional[int] = None,
    device: str = "cpu", info=None, overwrite: bool = False, chunk: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None, precision: str = "auto",
    workers: Optional[int] = None,
) -> dict:
    """Encode every image of the prepared dataset ``data`` with ``vae`` (a ``LatentVAE``) into
    ``data/latents``; ``identity`` is ``vae_identity(...)`` of it. Resumable in units of ``chunk``
    images (default ``CHUNK``, rounded up so a unit fills whole memory pages); the units still to
    do are split evenly across ranks.

    On CUDA: the VAE under ``precision`` autocast ("auto": bf16; the moments are stored float16
    either way), images read by ``workers`` loader processes into pinned memory, both views in one
    forward pass, and the moments copied back asynchronously (written while the next batch runs).
    ``batch_size``: images per pass (default 64 on CUDA, 32 elsewhere)."""
    from ..dist import DistInfo, barrier
    from ..train.loop import amp_dtype_for

    info = info or DistInfo()
    amp = amp_dtype_for(precision, device)
    cuda = torch.device(device).type == "cuda"
    batch_size = batch_size or (64 if cuda else 32)
    ds = PreparedDataset(data)
    root = Path(data)
    final, partial = root / CACHE_DIR, root / PARTIAL_DIR
    n, res = len(ds), ds.resolution
    c, h, w = vae.latent_shape(res)
    shape = (n, 2 if flips else 1, 2 * c, h, w)
    meta = {**identity, "resolution": res, "flips": bool(flips), "shape": list(shape), "count": n}
    if final.exists() and not overwrite:
        old = json.loads((final / CACHE_META).read_text()) if (final / CACHE_META).exists() else {}
        if all(old.get(k) == v for k, v in meta.items()):
            return {**meta, "out": str(final), "encoded": 0, "skipped": n, "seconds": 0.0, "images_per_s": 0.0}
        raise InputError(f"{final} holds a cache made with VAE {old.get('vae')!r} at {old.get('resolution')} px "
                         f"(flips {old.get('flips')}); pass --overwrite to replace it")
    chunk = int(chunk or CHUNK)
    if chunk < 1:
        raise InputError(f"chunk size {chunk}: expected 1 or more")
    chunk = page_chunk(chunk, int(np.prod(shape[1:])) * 2)
    # Rank 0 sets up (or validates) the partial directory; the others wait for it.
    if info.is_main:
        pmeta = partial / CACHE_META
        if partial.exists() and (not pmeta.exists() or json.loads(pmeta.read_text()) != meta):
            shutil.rmtree(partial)  # a half-written cache of another VAE / shape: start over
        if not partial.exists():
            partial.mkdir(parents=True)
            (partial / "done").mkdir()
            create_aligned_npy(partial / MOMENTS, shape)
            io.atomic_write_text(pmeta, json.dumps(meta))
    barrier()
    chunks = list(range(0, n, chunk))
    done = {s for s in chunks if (partial / "done" / str(s)).exists()}
    barrier()  # every rank has listed the markers before any rank adds one
    todo = share_of_remaining(chunks, done, info)
    t0 = time.perf_counter()
    mm = np.load(partial / MOMENTS, mmap_mode="r+")
    vae.to(device)
    total = sum(min(n, t + chunk) - t for t in todo)
    encoded = _encode_chunks(ds, vae, mm, todo, chunk, batch_size, flips, device, amp, workers, partial / "done",
                             lambda k: progress(k, total) if progress is not None else None)
    del mm
    barrier()
    if info.is_main:
        missing = [s for s in chunks if not (partial / "done" / str(s)).exists()]
        if missing:
            raise RuntimeError(f"{partial}: {len(missing)} chunks were not written; re-run to resume")
        shutil.rmtree(partial / "done")
        if final.exists():  # --overwrite: drop the old cache only now that the new one is whole
            shutil.rmtree(final)
        partial.rename(final)
    barrier()
    seconds = time.perf_counter() - t0
    skipped = sum(min(n, t + chunk) - t for t in done) if info.is_main else 0
    return {**meta, "out": str(final), "encoded": encoded, "skipped": skipped,
            "seconds": round(seconds, 2), "images_per_s": round(encoded / max(seconds, 1e-9), 2)}


def share_of_remaining(chunks: list, done: set, info) -> list:
    """This rank's contiguous share of the chunks not done yet. (A static share of all chunks
    would leave a resumed run unbalanced: a rank whose share was finished idles at the final
    barrier while another encodes its whole share.)"""
    left = [s for s in chunks if s not in done]
    per = (len(left) + info.world_size - 1) // info.world_size
    return left[info.rank * per:(info.rank + 1) * per]


def page_chunk(chunk: int, row_bytes: int, page: int = mmap.PAGESIZE) -> int:
    """``chunk`` rounded up so that ``chunk`` rows fill whole pages: with the data starting on a
    page boundary (``create_aligned_npy``) no two chunks, and so no two ranks, write to one page
    (on a network filesystem neighbouring writes to a shared page can undo each other)."""
    step = page // math.gcd(page, row_bytes)
    return -(-chunk // step) * step


def create_aligned_npy(path: Path, shape, dtype=np.float16, page: int = mmap.PAGESIZE) -> None:
    """A zero-filled ``.npy`` whose data starts at byte ``page`` (the header padded with spaces,
    as the format allows), for ``np.load(mmap_mode=...)``."""
    text = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                 "shape": tuple(int(x) for x in shape)}).encode("latin1")
    version, size = ((1, 0), "<H") if page - 10 <= 0xFFFF else ((2, 0), "<I")
    hlen = page - 8 - struct.calcsize(size)
    head = b"\x93NUMPY" + bytes(version) + struct.pack(size, hlen) + text.ljust(hlen - 1) + b"\n"
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(page + int(np.prod(shape)) * np.dtype(dtype).itemsize)


class _Images(torch.utils.data.Dataset):
    """uint8 (B, 3, R, R) of a list of indices (picklable, for loader workers)."""

    def __init__(self, ds):
        self.ds = ds

    def __getitem__(self, idx):
        return torch.from_numpy(self.ds.get_uint8_chw(idx))


def _encode_chunks(ds, vae, mm, todo, chunk, batch_size, flips, device, amp, workers, done_dir, progress) -> int:
    """Encode the chunks ``todo`` into ``mm``; a chunk's marker is written after its rows are
    flushed. One batch in flight: batch k+1 is queued on the device before batch k is written."""
    from ..train.feed import default_workers

    n, cuda = len(mm), torch.device(device).type == "cuda"
    plan = [(s, list(range(b, min(n, s + chunk, b + batch_size))))
            for s in todo for b in range(s, min(n, s + chunk), batch_size)]
    workers = (default_workers() if cuda else 0) if workers is None else workers
    loader = torch.utils.data.DataLoader(_Images(ds), batch_size=None, sampler=[idx for _, idx in plan],
                                         num_workers=workers, pin_memory=cuda)
    left = {s: sum(1 for t, _ in plan if t == s) for s in todo}
    encoded, pending = 0, None

    def write(s, idx, fetch):
        nonlocal encoded
        mm[idx[0]:idx[-1] + 1] = fetch()
        encoded += len(idx)
        progress(encoded)
        left[s] -= 1
        if left[s] == 0:
            mm.flush()
            (done_dir / str(s)).touch()  # after the flush: a marker means the rows are on disk

    with torch.no_grad():
        for (s, idx), img in zip(plan, loader):
            x = img.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
            views = torch.cat([x, x.flip(-1)]) if flips else x
            with torch.autocast(torch.device(device).type, dtype=amp) if amp else contextlib.nullcontext():
                m = vae.encode_moments(views)
            m = m.float().unflatten(0, (-1, len(idx))).transpose(0, 1).to(torch.float16)  # (B, V, 2C, h, w)
            fetch = _fetch(m)
            if pending is not None:
                write(*pending)
            pending = (s, idx, fetch)
        if pending is not None:
            write(*pending)
    return encoded


def _fetch(t: torch.Tensor) -> Callable[[], np.ndarray]:
    """Start copying ``t`` to the host (CUDA: into pinned memory behind an event, no sync now)."""
    if t.device.type != "cuda":
        arr = t.numpy()
        return lambda: arr
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    ev = torch.cuda.Event()
    ev.record()
    return lambda: (ev.synchronize(), host.numpy())[1]

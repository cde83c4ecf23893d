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
chunk, so an interrupted run resumes where it stopped); under torchrun each rank encodes its
contiguous share of the chunks. When every chunk is done, rank 0 writes the metadata and renames
the directory into place: a cache either exists complete or not at all.
"""

from __future__ import annotations

import json
import shutil
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
                             f"re-run 'reptok data cache-latents' with --flips, or train with --no-hflip")


def cache_latents(
    data: Union[str, Path], vae, identity: dict, *, flips: bool = True, batch_size: int = 32,
    device: str = "cpu", info=None, overwrite: bool = False, chunk: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> dict:
    """Encode every image of the prepared dataset ``data`` with ``vae`` (a ``LatentVAE``) into
    ``data/latents``; ``identity`` is ``vae_identity(...)`` of it. Resumable in units of ``chunk``
    images (default ``CHUNK``); the chunks are split across ranks."""
    from ..dist import DistInfo, barrier

    info = info or DistInfo()
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
    # Rank 0 sets up (or validates) the partial directory; the others wait for it.
    if info.is_main:
        pmeta = partial / CACHE_META
        if partial.exists() and (not pmeta.exists() or json.loads(pmeta.read_text()) != meta):
            shutil.rmtree(partial)  # a half-written cache of another VAE / shape: start over
        if not partial.exists():
            partial.mkdir(parents=True)
            (partial / "done").mkdir()
            np.lib.format.open_memmap(partial / MOMENTS, mode="w+", dtype=np.float16, shape=shape).flush()
            io.atomic_write_text(pmeta, json.dumps(meta))
    barrier()
    mm = np.load(partial / MOMENTS, mmap_mode="r+")
    chunk = int(chunk or CHUNK)
    if chunk < 1:
        raise InputError(f"chunk size {chunk}: expected 1 or more")
    chunks = list(range(0, n, chunk))
    per = (len(chunks) + info.world_size - 1) // info.world_size
    mine = chunks[info.rank * per:(info.rank + 1) * per]
    todo = [s for s in mine if not (partial / "done" / str(s)).exists()]
    t0, encoded = time.perf_counter(), 0
    vae.to(device)
    with torch.no_grad():
        for s in todo:
            e = min(n, s + chunk)
            for b in range(s, e, batch_size):
                idx = list(range(b, min(e, b + batch_size)))
                img = torch.from_numpy(ds.get_uint8_chw(idx)).to(device).float().div_(127.5).sub_(1.0)
                views = [img, img.flip(-1)] if flips else [img]
                for v, x in enumerate(views):
                    mm[b:b + len(idx), v] = vae.encode_moments(x).float().cpu().numpy().astype(np.float16)
                encoded += len(idx)
                if progress is not None:
                    progress(encoded, sum(min(n, t + chunk) - t for t in todo))
            mm.flush()
            (partial / "done" / str(s)).touch()  # after the flush: a marker means the rows are on disk
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
    return {**meta, "out": str(final), "encoded": encoded, "skipped": sum(min(n, t + chunk) - t for t in mine if t not in todo),
            "seconds": round(seconds, 2), "images_per_s": round(encoded / max(seconds, 1e-9), 2)}

"""Output safety, in one place for every command that writes a result.

- :func:`check_new_output`: an output file (or folder) that exists is refused (InputError, exit
  2: "exists; pass --overwrite") unless ``overwrite``; the folder it goes into must be writable.
  Checked before any work.
- PNG folders of ``reptok sample`` carry a manifest, :data:`MANIFEST` (the checkpoint, the
  sha256 of its weights files, and every setting that changes the pixels: seed, CFG scale and
  interval, steps, solver, decoder steps, backend, precision, classes / prompts, images per
  class). A folder whose manifest matches exactly is resumed (existing PNGs are skipped), which
  is shard-safe: ``--start`` / ``--count`` are not in the manifest, so shards of one job share
  it. A mismatch is exit 2 naming the first differing setting; a non-empty folder without a
  manifest is refused unless ``overwrite``.
- Each command's own output check, run before any work: :func:`check_tokens_output` (``reptok
  tokens``: a .npy and its sidecars), :func:`check_run_output` (the training stages: a run
  folder, new or resumed) and :func:`check_sample_output` (``reptok sample``: .npz, .png grid or
  PNG folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from . import io
from . import run as rundir
from .errors import InputError

MANIFEST = ".reptok-sample.json"
MANIFEST_FORMAT = "reptok-sample/1"
PROBE_PREFIX = ".reptok-probe-"


def check_writable_parent(out: Path, option: str = "--out", folder: bool = False) -> None:
    """The nearest existing folder above ``out`` (or ``out`` itself if ``folder`` and it exists)
    must be a folder where this user can create a file. Probed by creating (and removing) an empty
    file: permission bits do not stop root, yet /proc, read-only mounts and full inode tables do."""
    import tempfile

    out = Path(out)
    probe = out if folder else (out.parent if str(out.parent) else Path("."))
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{option} {out}: {probe} is not a writable folder")
    before = probe.stat()
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=PROBE_PREFIX)
    except OSError as e:
        raise InputError(f"{option} {out}: cannot create files in {probe} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(tmp)
    with contextlib.suppress(OSError):  # a refused command leaves the folder as it found it, mtime too
        os.utime(probe, ns=(before.st_atime_ns, before.st_mtime_ns))


def check_new_output(out: Path, overwrite: bool = False, option: str = "--out", folder: bool = False) -> None:
    """Refuse an existing output without ``overwrite`` (and any output that cannot be written).
    ``folder``: ``out`` is a folder (it must be one if it exists; an empty one is fine)."""
    out = Path(out)
    check_writable_parent(out, option)
    if not out.exists():
        return
    if folder:
        if not out.is_dir():
            raise InputError(f"{option} {out}: exists and is not a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise InputError(f"{option} {out}: {out} is not a writable folder")
        if any(out.iterdir()) and not overwrite:
            raise InputError(f"{option} {out}: the folder exists and is not empty; pass --overwrite")
        return
    if out.is_dir():
        raise InputError(f"{option} {out}: exists and is a folder")
    if not overwrite:
        raise InputError(f"{option} {out}: exists; pass --overwrite")


def clear_folder(out: Path) -> None:
    """``--overwrite`` of a folder output: its files go (the folder itself stays)."""
    for p in Path(out).iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


# ----------------------------------------------------------------------------- weights identity
def weights_hash(run: Path) -> str:
    """sha256 over the run's weights files (ema.safetensors, model.safetensors, in that order,
    those present), read in full every time: nothing cached, so a retrained run never matches
    an old folder by accident."""
    h = hashlib.sha256()
    found = False
    for name in ("ema.safetensors", "model.safetensors"):
        p = Path(run) / name
        if not p.exists():
            continue
        found = True
        h.update(name.encode() + b"\0")
        io.hash_file(h, p)
    return h.hexdigest() if found else ""


# ----------------------------------------------------------------------------- PNG folder manifest
def sample_manifest(ckpt: Path, **settings) -> dict:
    """The manifest of a PNG folder: the checkpoint, its weights hash and ``settings`` (every
    option that changes the pixels; not --start/--count, which only pick the shard)."""
    return {"format": MANIFEST_FORMAT, "checkpoint": str(Path(ckpt).resolve()),
            "weights_sha256": weights_hash(ckpt), **{k: _plain(v) for k, v in settings.items()}}


def _plain(v):
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def _transient(name: str) -> bool:
    """A file another writer has in flight (io's atomic temp files, the writability probe): a shard
    started at the same moment as another one must not take the folder for a foreign one."""
    return name.startswith(PROBE_PREFIX) or (name.startswith(".") and name.endswith(".tmp"))


def prepare_png_folder(out: Path, manifest: dict, overwrite: bool = False, write: bool = True) -> bool:
    """Check (and, with ``write``, create) a PNG folder for ``manifest`` before any sampling.

    Returns True when the folder resumes a matching job (its PNGs are kept and skipped). A new
    or empty folder gets the manifest (atomically); a matching one is reused; a mismatching one,
    or a non-empty one without a manifest, is InputError unless ``overwrite`` (then it is
    emptied and starts afresh)."""
    out = Path(out)
    check_writable_parent(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    path = out / MANIFEST
    resume = False
    if out.exists() and any(not _transient(p.name) for p in out.iterdir()):
        if overwrite:
            if write:
                clear_folder(out)
        elif not path.exists():
            raise InputError(f"--out {out}: the folder holds files but no {MANIFEST} (not a reptok sample folder, "
                             f"or from an older version); pass --overwrite or choose another folder")
        else:
            try:
                old = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                raise InputError(f"--out {out}: {MANIFEST} is unreadable; pass --overwrite") from None
            for key in sorted(set(old) | set(manifest)):
                if old.get(key) != manifest.get(key):
                    raise InputError(f"--out {out}: holds samples with {key}={_short(old.get(key))}, not "
                                     f"{_short(manifest.get(key))}; pass --overwrite or choose another folder")
            resume = True
    if write and not resume:
        out.mkdir(parents=True, exist_ok=True)
        io.atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return resume


def _short(v) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."


# ----------------------------------------------------------------------------- each command's output
def sidecar_paths(out: Path) -> dict:
    """The files ``reptok tokens`` writes for ``out`` (tokens.npy): the tokens and their sidecars."""
    out = Path(out)
    stem = out.with_suffix("")
    return {"tokens": out, "labels": Path(f"{stem}.labels.npy"), "meta": Path(f"{stem}.json"),
            "captions": Path(f"{stem}.captions.json")}


def check_tokens_output(out: Path, overwrite: bool = False) -> None:
    """Before any work: ``out`` ends in .npy, its folder exists and is writable, and neither it
    nor a sidecar exists unless ``overwrite`` (a generator run may point at these tokens)."""
    out = Path(out)
    if out.suffix != ".npy":
        raise InputError(f"--out {out}: the tokens file must end in .npy")
    if not out.parent.exists():
        raise InputError(f"--out {out}: folder {out.parent} does not exist")
    check_writable_parent(out)
    for p in sidecar_paths(out).values():
        check_new_output(p, overwrite)


def has_checkpoint(out: Path) -> bool:
    """A run directory holds a run once a checkpoint is written; a folder with only config.json
    (a start that failed before its first checkpoint) counts as empty: a fresh start replaces it."""
    out = Path(out)
    return (out / rundir.TRAIN_STATE).exists() or (out / rundir.MODEL).exists()


def check_run_output(out: Path, resume: bool) -> None:
    """``--out`` checked before any work: a folder (or a path that can become one) that this
    user can write; with ``resume`` a run with a checkpoint, without it no run yet."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    check_writable_parent(out, folder=True)
    if resume and not (out / rundir.TRAIN_STATE).exists():
        raise InputError(f"{out}: nothing to resume (no {rundir.TRAIN_STATE}); drop --resume to start fresh")
    if not resume and has_checkpoint(out):
        raise InputError(f"{out} already holds a run; pass --resume to continue it or choose another --out")


def sample_output_kind(out: Path) -> str:
    s = Path(out).suffix.lower()
    return "npz" if s == ".npz" else "grid" if s == ".png" else "folder"


def check_sample_output(out: Path) -> str:
    """Fail before any work if OUT cannot be written."""
    out = Path(out)
    kind = sample_output_kind(out)
    if kind == "folder" and out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    check_writable_parent(out, folder=kind == "folder")
    return kind

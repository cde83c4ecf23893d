"""File primitives: atomic writes of files and folders, JSON reading, tensor files.

Everything reptok writes goes through here, so three promises hold everywhere:
- **atomic**: a file or folder appears complete or not at all (temp beside it + one rename), so a
  Ctrl-C, a crash or a concurrent reader never sees half an output;
- **umask**: the result has the permissions the user's umask gives a plain ``open()`` /
  ``mkdir()`` (``tempfile`` alone would leave 0600 files and 0700 folders, unreadable for the team
  on a shared cluster);
- **one-line errors**: unreadable inputs raise :class:`~reptok.errors.InputError` naming the file.

This module imports nothing from reptok but ``errors``: image writing, the judge, extraction,
sampling, export and the run format all use it without pulling in each other.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional

import torch

from .errors import InputError


# ----------------------------------------------------------------------------- permissions
def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _apply_umask(path: Path, is_dir: bool) -> None:
    os.chmod(path, (0o777 if is_dir else 0o666) & ~current_umask())


# ----------------------------------------------------------------------------- atomic files
def atomic_save(path: Path, writer: Callable[[str], None]) -> None:
    """``writer(tmp_path)`` writes a file; it is renamed onto ``path`` only if it succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer(tmp)
        _apply_umask(Path(tmp), is_dir=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_save(path, write)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


# ----------------------------------------------------------------------------- atomic folders
@contextmanager
def atomic_dir(out: Path, overwrite: bool = False, what: str = "--out") -> Iterator[Path]:
    """Yield an empty temp folder beside ``out``; on success it becomes ``out`` in one rename.

    A non-empty ``out`` is refused (one line naming ``what``) unless ``overwrite``; then the old
    folder is replaced only once the new content is complete, so a failure never leaves a
    half-written or a lost folder behind. On any exception the temp folder is removed.
    """
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise InputError(f"{what} {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{what} {out}: folder is not empty; pass --overwrite to replace it")
    tmp = temp_dir_beside(out)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


def temp_dir_beside(out: Path) -> Path:
    """A new empty folder next to ``out`` (same filesystem, so a rename publishes it), with the
    permissions the umask gives a plain ``mkdir``."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    _apply_umask(tmp, is_dir=True)
    return tmp


def replace_dir(src: Path, out: Path) -> None:
    """Rename the finished folder ``src`` onto ``out``, removing an old ``out`` only afterwards."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "d")
    os.replace(src, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- JSON and tensors
def read_json(path: Path, what: str = "file") -> dict:
    """A JSON object from ``path``, or a one-line InputError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such {what}")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: corrupt {what}, not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: corrupt {what}, expected a JSON object")
    return doc


def save_tensors(path: Path, tensors: Dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    """A safetensors file, atomically; metadata values are stringified (the format's rule)."""
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_save(path, lambda tmp: save_file(flat, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()}))


def load_tensors(path: Path, what: str = "weights file") -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such {what}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise InputError(f"{path}: unreadable {what} ({e})") from None


# ----------------------------------------------------------------------------- identity
def hash_file(h, path: Path):
    """Feed a file's bytes to the hash object ``h`` in 16 MiB pieces (never the whole file in
    memory: weights files are GBs); returns ``h``."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, as hex."""
    return hash_file(hashlib.sha256(), path).hexdigest()

"""reptok.io: atomic files and folders that follow the user's umask."""

import os
import stat

import pytest

from reptok.errors import InputError
from reptok.io import atomic_dir, atomic_write_text, read_json


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask  # the test sets its mask; the old one comes back afterwards
    os.umask(old)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)])
def test_outputs_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    atomic_write_text(tmp_path / "a.json", '{"x": 1}')
    assert mode(tmp_path / "a.json") == file_mode and read_json(tmp_path / "a.json") == {"x": 1}
    with atomic_dir(tmp_path / "out") as tmp:
        atomic_write_text(tmp / "f.txt", "hi")
    assert mode(tmp_path / "out") == dir_mode and mode(tmp_path / "out" / "f.txt") == file_mode


def test_atomic_dir_leaves_nothing_on_failure_and_refuses_non_empty(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == []  # no out, no temp folder
    with atomic_dir(out) as tmp:
        (tmp / "v1").write_text("1")
    with pytest.raises(InputError, match="not empty; pass --overwrite"):
        with atomic_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(out, overwrite=True) as tmp:
            raise RuntimeError("boom")
    assert os.listdir(out) == ["v1"]  # the old folder is kept when the new one fails
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "v2").write_text("2")
    assert os.listdir(out) == ["v2"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_prepared_dataset_follows_the_umask(tmp_path, umask):
    from reptok.data import prepare

    umask(0o022)
    out = tmp_path / "shapes"
    prepare("builtin:shapes:16", out, resolution=16)
    assert mode(out) == 0o755
    assert all(mode(f) == 0o644 for f in out.iterdir() if f.is_file())

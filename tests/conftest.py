import os

# Two CPU cores on CI: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Judge weights and other caches go to a per-session temp dir, never ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "reptok-cache"
    monkeypatch.setenv("REPTOK_CACHE", str(cache))
    yield

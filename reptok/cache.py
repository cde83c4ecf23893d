"""Where reptok keeps what it trains on demand (the builtin:shapes judge and SSL encoder):
``$REPTOK_CACHE``, else ``$XDG_CACHE_HOME/reptok``, else ``~/.cache/reptok``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    if os.environ.get("REPTOK_CACHE"):
        return Path(os.environ["REPTOK_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "reptok"

"""Runs on the Hugging Face Hub: ``hf://OWNER/NAME[@REVISION]`` -> a local run folder.

Every place that reads a run passes its argument through :func:`resolve_run` (the CLI's run
options, ``Pipeline.from_run``, a generator's ``tokenizer_run``), so a repo id works wherever a
folder does. The download is ``huggingface_hub.snapshot_download``, unchanged: it honours
``HF_HOME`` / ``HF_HUB_CACHE`` (where the cache is), ``HF_HUB_OFFLINE=1`` (cache only, no
network) and ``HF_TOKEN``, and returns the cached snapshot folder, which is then read like any run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Tuple, Union

from .errors import InputError

SCHEME = "hf://"
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
# The cache layout huggingface_hub writes: .../models--OWNER--NAME/snapshots/<commit>[/subfolder]
_CACHED = re.compile(r"models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})(?:/(?P<sub>.+))?$")


def is_hub_spec(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(SCHEME)


def parse_spec(spec: str) -> Tuple[str, Optional[str]]:
    """``hf://OWNER/NAME[@REVISION]`` -> (repo id, revision or None); InputError otherwise."""
    body = spec[len(SCHEME):]
    repo, _, revision = body.partition("@")
    if not _REPO.fullmatch(repo) or (revision == "" and "@" in body):
        raise InputError(f"{spec!r}: expected hf://OWNER/NAME or hf://OWNER/NAME@REVISION")
    return repo, revision or None


def resolve_run(spec: Union[str, Path]) -> Path:
    """A run folder for ``spec``: a local path as given, or the cached snapshot of a Hub repo
    (downloaded first unless it is cached; with ``HF_HUB_OFFLINE=1`` only the cache is used)."""
    if not is_hub_spec(spec):
        return Path(spec)
    repo, revision = parse_spec(spec)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a dependency of reptok
        raise InputError(f"{spec}: loading from the Hub needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(repo_id=repo, revision=revision))
    except Exception as e:  # noqa: BLE001 - every Hub failure is a bad --ckpt for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(f"{spec}: cannot fetch the run from the Hugging Face Hub ({type(e).__name__}: {first}); "
                         f"check the repo id, your network or HF_TOKEN (offline: the run must be in the cache "
                         f"of HF_HOME)") from None


def hub_origin(path: Union[str, Path]) -> Optional[str]:
    """``OWNER/NAME@COMMIT`` (plus ``:SUBFOLDER``) when ``path`` is a folder of the Hub cache
    (a run fetched with :func:`resolve_run`), else None: how provenance names a Hub parent."""
    m = _CACHED.search(Path(path).as_posix())
    if m is None:
        return None
    sub = f":{m['sub']}" if m["sub"] else ""
    return f"{m['owner']}/{m['name']}@{m['commit']}{sub}"

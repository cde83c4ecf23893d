"""Evaluation results kept in the run they measure: ``RUN/eval/<name>.json``, with the protocol.

``reptok eval recon`` records into its ``--ckpt``; ``reptok eval gen`` into ``--run`` or the run a
PNG sample folder's manifest names. The model card (``export/hub.py``) cites every file here, so
each number travels with how it was made: the image count, the reference, the sampler, the
feature extractor (tool) and the rules the evaluation applied (its notes)::

    {"format": "reptok-eval/1", "kind": "recon" | "gen", "metrics": {...},
     "protocol": {"n", "reference", "sampler", "tool", "k", "rules"}, "results": <the full result JSON>}
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List, Optional

from ..io import atomic_write_text, read_json

FORMAT = "reptok-eval/1"
EVAL_DIR = "eval"
METRICS = ("fid", "inception_score", "inception_score_std", "precision", "recall", "psnr", "ssim", "rfid")
_SAMPLER_KEYS = ("seed", "steps", "cfg", "cfg_interval", "solver", "decoder_steps", "decoder_solver", "precision")


def _stem(path) -> str:
    p = Path(str(path).rstrip("/"))
    name = p.stem if p.suffix else p.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name) or "set"


def protocol(kind: str, results: dict, sampler: Optional[dict] = None) -> dict:
    """What a reader needs to compare the numbers: N, reference, sampler, tool, k, rules."""
    feats = results.get("features") or {}
    tool = {"features": feats.get("name"), "description": feats.get("description"),
            "reptok_version": results.get("reptok_version"),
            "evaluator": results.get("protocol")}  # IS / PR rules, weights sha256, batch sizes, numerics
    if kind == "recon":
        return {"n": results.get("n"), "reference": {"data": results.get("data"), "resolution": results.get("resolution")},
                "sampler": {"decoder_steps": results.get("decoder_steps"), "solver": results.get("solver"),
                            "seed": results.get("seed")},
                "tool": tool, "k": results.get("k"), "rules": list(results.get("notes") or [])}
    ref = results.get("ref") or {}
    return {"n": results.get("n_samples"),
            "reference": {"path": ref.get("path"), "kind": ref.get("kind"), "n": results.get("n_ref"),
                          "fid_stats": ref.get("fid_stats")},
            "sampler": sampler, "tool": tool, "k": results.get("k"), "rules": list(results.get("notes") or [])}


def sample_manifest_of(samples) -> Optional[dict]:
    """The manifest of a ``reptok sample`` PNG folder (None for other sample sets)."""
    from ..outputs import MANIFEST

    path = Path(samples) / MANIFEST
    return read_json(path, "sample manifest") if path.is_file() else None


def record_in_run(run, results: dict, kind: str, samples=None) -> Optional[Path]:
    """Write ``results`` of ``reptok eval <kind>`` into ``run``/eval/ with its protocol; returns
    the file, or None when ``run`` is a Hub snapshot (the cache is not ours to write).
    ``samples`` (eval gen): the sample set, whose PNG-folder manifest gives the sampler."""
    from ..hub import hub_origin

    run = Path(run)
    if hub_origin(run.resolve()) is not None:
        return None
    manifest = sample_manifest_of(samples) if samples is not None else None
    sampler = {k: manifest.get(k) for k in _SAMPLER_KEYS} if manifest else None
    name = f"recon-{_stem(results.get('data'))}" if kind == "recon" else f"gen-{_stem(samples)}"
    doc = {"format": FORMAT, "kind": kind, "metrics": {k: results[k] for k in METRICS if results.get(k) is not None},
           "protocol": protocol(kind, results, sampler), "results": results}
    path = run / EVAL_DIR / f"{name}.json"
    atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    return path


def run_of_samples(samples) -> Optional[Path]:
    """The run a PNG sample folder was made from (its manifest's checkpoint), if it still exists."""
    manifest = sample_manifest_of(samples) if samples is not None and Path(samples).is_dir() else None
    ckpt = (manifest or {}).get("checkpoint")
    return Path(ckpt) if ckpt and (Path(ckpt) / "config.json").is_file() else None


def read_run_evals(run) -> List[dict]:
    """Every ``RUN/eval/*.json`` of the current format, by file name, each with its ``file``."""
    out = []
    for path in sorted((Path(run) / EVAL_DIR).glob("*.json")):
        try:
            doc = read_json(path, "eval result")
        except Exception:  # noqa: BLE001 - a foreign file in eval/ is skipped, not fatal
            continue
        if isinstance(doc, dict) and doc.get("format") == FORMAT:
            out.append({**doc, "file": f"{EVAL_DIR}/{path.name}"})
    return out

"""Where a run's weights came from, and under which terms: the ``provenance`` record of config.json.

Written once, with the run's config (``run.write_run_config``), from the links the run already
records; each parent's own record is embedded, so the chain travels with the run (a moved or
deleted parent, an uploaded copy) and ``reptok info`` / the model card print it whole::

    {"format": "reptok-provenance/1", "kind": "tokenizer",
     "origin": {"how": "converted", "source": "reptok-xl-600k-ImageNet.ckpt", "sha256": ..., "converter": ...}
             | {"how": "init" | "distilled" | "copied", "parent": LINK}
             | {"how": "trained"} | {"how": "random"},
     "tokenizer": LINK,                    # generator runs: the run that decodes its tokens
     "licence": LICENCE}                   # when anything upstream is the authors' release
    LINK = {"run": "/abs/path", "hub": "OWNER/NAME@COMMIT" (a Hub snapshot), "provenance": {...} | null}

Runs written before this record existed get it derived on read from the same links
(``converted_from``, ``init``, ``distilled.teacher``, ``tokenizer_run``): old runs load unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

FORMAT = "reptok-provenance/1"
_MAX_DEPTH = 32  # a cycle of hand-edited links must not recurse forever

# The authors' terms, summarised in our own words (see ../shared/design/reptok.md): the licence
# file at ``link`` is the authoritative text.
OFFICIAL_LICENCE = {
    "name": "RepTok non-commercial research licence (LMU Munich)",
    "id": "reptok-lmu-non-commercial-research",
    "link": "https://github.com/CompVis/RepTok/blob/main/LICENSE",
    "attribution": (
        "Derived from the RepTok release of CompVis (LMU Munich), \"Adapting Self-Supervised "
        "Representations as a Latent Space for Efficient Generation\" (ICLR 2026). Use and sharing "
        "are allowed for personal, non-commercial scientific research only; every copy and every "
        "model derived from it must carry this attribution and pass on the same terms; publications "
        "that use it cite the paper; commercial use needs the authors' written permission. The "
        "licence file at the link is the binding text."),
}
OFFICIAL_FORMATS = ("official-lightning",)  # converted_from["format"] values of the authors' release


def converter_id(kind: str = "official") -> str:
    """What made a converted run: ``reptok 0.1.0 convert official``."""
    from . import __version__

    return f"reptok {__version__} convert {kind}"


def _link(ref, base: Optional[Path], depth: int) -> dict:
    """A parent run named by ``ref`` (absolute, or relative to ``base``) with its own record."""
    from .hub import hub_origin, is_hub_spec, parse_spec
    from .io import read_json

    if is_hub_spec(ref):  # named by repo id: not fetched here (writing a config needs no network)
        repo, rev = parse_spec(ref)
        return {"run": ref, "hub": f"{repo}@{rev or 'main'}", "provenance": None}
    cands = ([Path(base) / ref] if base is not None else []) + [Path(ref)]
    found = next((c for c in cands if (c / "config.json").is_file()), None)
    link = {"run": str(found.resolve() if found is not None else ref)}
    hub = hub_origin(link["run"])
    if hub:
        link["hub"] = hub
    link["provenance"] = None
    if found is not None and depth < _MAX_DEPTH:
        try:
            link["provenance"] = of(found, read_json(found / "config.json", "config"), depth + 1)
        except Exception:  # noqa: BLE001 - an unreadable parent leaves a gap, not a failure
            pass
    return link


def derive(run: Optional[Path], doc: dict, depth: int = 0) -> dict:
    """The provenance record of the run whose config document is ``doc`` (its links resolved
    against ``run``, the folder, when given)."""
    kind = doc.get("kind")
    conv = doc.get("converted_from")
    if conv:
        origin = {"how": "converted", "source": conv.get("source"), "sha256": conv.get("sha256"),
                  "converter": conv.get("converter") or "reptok convert (version not recorded)",
                  "format": conv.get("format")}
    elif doc.get("attached_from"):
        origin = {"how": "copied", "parent": _link(doc["attached_from"], run, depth)}
    elif kind == "tokenizer" and (doc.get("distilled") or {}).get("teacher"):
        origin = {"how": "distilled", "parent": _link(doc["distilled"]["teacher"], run, depth)}
    elif doc.get("init"):
        origin = {"how": "init", "parent": _link(doc["init"], run, depth)}
    elif str(doc.get("note") or "").startswith("random weights"):
        origin = {"how": "random"}
    else:
        origin = {"how": "trained"}
    rec = {"format": FORMAT, "kind": kind, "origin": origin}
    if doc.get("tokenizer_run"):
        rec["tokenizer"] = _link(doc["tokenizer_run"], run, depth)
    lic = licence_of(rec)
    if lic:
        rec["licence"] = lic
    return rec


def of(run: Optional[Path], doc: dict, depth: int = 0) -> dict:
    """A run's provenance: its stored record, or one derived from its links (older runs)."""
    rec = doc.get("provenance")
    return rec if isinstance(rec, dict) and rec.get("format") == FORMAT else derive(run, doc, depth)


def parents(rec: dict) -> List[dict]:
    """The links of a record: the origin's parent, then the tokenizer."""
    out = [rec["origin"]["parent"]] if "parent" in rec.get("origin", {}) else []
    return out + ([rec["tokenizer"]] if rec.get("tokenizer") else [])


def licence_of(rec: Optional[dict]) -> Optional[dict]:
    """The upstream licence of a record: the authors' terms when the chain reaches their release."""
    if not rec:
        return None
    if rec.get("licence"):
        return rec["licence"]
    origin = rec.get("origin", {})
    if origin.get("how") == "converted" and origin.get("format") in OFFICIAL_FORMATS:
        return OFFICIAL_LICENCE
    for link in parents(rec):
        lic = licence_of(link.get("provenance"))
        if lic:
            return lic
    return None


def hub_bases(rec: dict) -> List[str]:
    """Hub repo ids (OWNER/NAME) this run's weights started from: the model card's base_model."""
    out = []
    for link in parents(rec):
        if link.get("hub"):
            repo = link["hub"].split("@", 1)[0]
            if repo not in out:
                out.append(repo)
    return out


_HOW = {"init": "fine-tuned (--init) from", "distilled": "distilled from the teacher",
        "copied": "generator copied from"}


def describe(rec: dict) -> str:
    """One line: how this run's weights began."""
    o = rec.get("origin", {})
    if o.get("how") == "converted":
        sha = (o.get("sha256") or "not hashed")[:16]
        return f"converted from {o.get('source')} (sha256 {sha}..., {o.get('converter')})"
    if o.get("how") in _HOW:
        p = o["parent"]
        return f"{_HOW[o['how']]} {p.get('hub') or p['run']}"
    return "random weights (benchmark)" if o.get("how") == "random" else "trained from scratch"


def chain_lines(rec: dict, name: str = "this run", indent: int = 0) -> List[str]:
    """The whole chain as indented lines (``reptok info``, the model card)."""
    pad = "  " * indent
    lines = [f"{pad}{name} ({rec.get('kind')}): {describe(rec)}"]
    for label, link in ([("origin", rec["origin"]["parent"])] if "parent" in rec.get("origin", {}) else []) + \
            ([("tokenizer", rec["tokenizer"])] if rec.get("tokenizer") else []):
        where = link.get("hub") or link["run"]
        if label == "tokenizer":
            lines.append(f"{pad}  decodes with the tokenizer run {where}")
        deeper = indent + (2 if label == "tokenizer" else 1)
        if link.get("provenance"):
            lines += chain_lines(link["provenance"], where, deeper)
        else:
            lines.append(f"{'  ' * deeper}{where}: not found (its provenance is unknown)")
    return lines


def notice_lines(rec: dict) -> List[str]:
    """The licence notice of a run derived from the authors' release (empty otherwise)."""
    lic = licence_of(rec)
    if not lic:
        return []
    return [f"licence: {lic['name']} (read it at {lic['link']})", f"attribution: {lic['attribution']}"]

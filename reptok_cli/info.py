"""``reptok info``: parameters and GFLOPs per component of a preset or a run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from reptok.presets import DEFAULT_PRESET
from reptok.run import resolve_config, read_run_config

from .common import app, emit_json, handle_errors
from .options import json_option, run_path


@app.command("info", epilog="Examples:\n\n  reptok info --preset xl\n\n  reptok info --ckpt runs/tok --json")
@handle_errors
def info(
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help=f"A named config (tiny, small, base, large, xl; default {DEFAULT_PRESET}, as train)."),
    ckpt: Optional[Path] = typer.Option(None, "--ckpt", parser=run_path,
                                        help="A run directory (its config.json) or hf://OWNER/NAME[@REVISION]."),
    json_out: bool = json_option(),
):
    """Parameter counts and forward GFLOPs per component (computed on the meta device)."""
    from reptok.info import model_report
    from reptok.presets import list_presets

    cfg = resolve_config(preset=preset or (None if ckpt else DEFAULT_PRESET), ckpt=ckpt)
    rows = model_report(cfg)
    distilled = _distilled(ckpt)
    run = _run_summary(ckpt)
    if json_out:
        emit_json({"preset": cfg.preset, "components": rows, "presets": list_presets(),
                   **({"distilled": distilled} if distilled else {}), **({"run": run} if run else {})})
        return
    if run:
        for key in ("kind", "step", "last_loss", "parent", "weights_sha256"):
            Console().print(f"{key}: {run[key]}", highlight=False, soft_wrap=True)
        _print_provenance(run["provenance"], ckpt)
    t = Table(title=f"reptok {cfg.preset or ckpt} ({cfg.image_size}px)")
    for col in ("component", "params", "trainable", "GFLOPs / call", "note"):
        t.add_column(col, justify="right" if col in ("params", "trainable", "GFLOPs / call") else "left")
    for r in rows:
        t.add_row(r["component"], f"{r['params']:,}", f"{r['trainable']:,}", f"{r['gflops']:.3f}", r["note"])
    Console().print(t)
    if distilled:
        Console().print(f"distilled: a {distilled['student_steps']}-step decoder from the teacher {distilled['teacher']} "
                        f"({distilled['teacher_steps']} steps, method {distilled['method']})", highlight=False, soft_wrap=True)


def _distilled(ckpt: Optional[str]) -> Optional[dict]:
    """The ``distilled`` record of a run made by ``reptok train distill`` (or a generator run
    attached to one), else None."""
    if not ckpt:
        return None


    return read_run_config(Path(ckpt)).get("distilled")


def _run_summary(ckpt: Optional[str]) -> Optional[dict]:
    """What a run is: kind, last checkpoint step, last logged loss, parent run (a generator's
    tokenizer_run, a distilled student's teacher, the --init run), sha256 of its weights."""
    if not ckpt:
        return None

    from reptok.outputs import weights_hash
    from reptok.train.start import checkpoint_step, last_loss

    from reptok import provenance

    doc = read_run_config(Path(ckpt))
    parent = doc.get("tokenizer_run") or (doc.get("distilled") or {}).get("teacher") or doc.get("init")
    prov = provenance.of(Path(ckpt), doc)
    return {"kind": doc["kind"], "step": checkpoint_step(Path(ckpt)), "last_loss": last_loss(Path(ckpt)),
            "parent": parent, "weights_sha256": weights_hash(Path(ckpt)) or None,
            "provenance": prov, "licence": provenance.licence_of(prov)}


def _print_provenance(prov: dict, ckpt) -> None:
    """The provenance chain, then the licence notice of a run derived from the authors' release."""
    from reptok import provenance

    out = Console()
    out.print("provenance:", highlight=False)
    for line in provenance.chain_lines(prov, str(ckpt), indent=1):
        out.print(line, highlight=False, soft_wrap=True, markup=False)
    for line in provenance.notice_lines(prov):
        out.print(line, highlight=False, soft_wrap=True, markup=False)

"""``reptok info``: parameters and GFLOPs per component of a preset or a run."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .common import app, emit_json, handle_errors
from .options import resolve_config


@app.command("info", epilog="Examples:\n\n  reptok info --preset xl\n\n  reptok info --ckpt runs/tok --json")
@handle_errors
def info(
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="A named config (tiny, small, base, large, xl)."),
    ckpt: Optional[str] = typer.Option(None, "--ckpt", help="A run directory (its config.json)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
):
    """Parameter counts and forward GFLOPs per component (computed on the meta device)."""
    from reptok.info import model_report
    from reptok.presets import list_presets

    cfg = resolve_config(preset=preset or (None if ckpt else "xl"), ckpt=ckpt)
    rows = model_report(cfg)
    distilled = _distilled(ckpt)
    if json_out:
        emit_json({"preset": cfg.preset, "components": rows, "presets": list_presets(),
                   **({"distilled": distilled} if distilled else {})})
        return
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
    from pathlib import Path

    from reptok.run import read_run_config

    return read_run_config(Path(ckpt)).get("distilled")

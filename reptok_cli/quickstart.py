"""``reptok quickstart``: the whole pipeline on builtin:shapes, on a CPU, in minutes."""

from __future__ import annotations

from pathlib import Path

import typer

from reptok.presets import DEFAULT_PRESET

from .common import app, emit_json, err, handle_errors, parse_device
from .options import device_option, json_option, quiet_option


@app.command("quickstart", epilog="Example:\n\n  reptok quickstart --out quickstart_out")
@handle_errors
def quickstart(
    out: Path = typer.Option(Path("quickstart_out"), "--out", help="Folder for the data, runs, samples and report."),
    preset: str = typer.Option(DEFAULT_PRESET, "--preset", help="Model sizes (small: the CPU demo; tiny: a smoke run)."),
    images: int = typer.Option(None, "--images", help="builtin:shapes images to prepare."),
    recon_steps: int = typer.Option(None, "--recon-steps"),
    gen_steps: int = typer.Option(None, "--gen-steps"),
    eval_per_class: int = typer.Option(None, "--eval-per-class", help="Samples per class judged for accuracy."),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    device: str = device_option(),
    json_out: bool = json_option(),
    quiet: bool = quiet_option(),
):
    """builtin:shapes -> train recon -> extract -> train gen -> samples + report (offline, CPU)."""
    from rich.table import Table

    from reptok.shapes.quickstart import QuickstartPlan, run_quickstart

    plan = QuickstartPlan(preset=preset, seed=seed)
    for k, v in dict(images=images, recon_steps=recon_steps, gen_steps=gen_steps, eval_per_class=eval_per_class).items():
        if v is not None:
            setattr(plan, k, v)
    # Stage lines and progress bars go to stderr, with or without --json (stdout stays the one
    # JSON line); -q silences both.
    log = (lambda m: None) if quiet else (lambda m: err.print(m, highlight=False, markup=False, soft_wrap=True))
    report = run_quickstart(out, plan, device=parse_device(device), progress=not quiet, log=log, overwrite=overwrite)
    if json_out:
        emit_json(report)
        return
    t = Table(title="reptok quickstart")
    t.add_column("result")
    t.add_column("value", justify="right")
    t.add_row("reconstruction PSNR (dB)", f"{report['recon_psnr_db']:.2f}")
    t.add_row("class accuracy of samples", f"{report['class_accuracy']:.1%}")
    t.add_row("judge accuracy on real images", f"{report['judge_accuracy_on_real']:.1%}")
    for k, v in report["seconds"].items():
        t.add_row(f"time: {k} (s)", f"{v}")
    t.add_row("time: total (s)", f"{report['total_seconds']}")
    from rich.console import Console

    out_console = Console(soft_wrap=True)
    out_console.print(t)  # the result, with where it is: stdout (-q leaves stderr empty)
    out_console.print(f"samples: {report['files']['samples_grid']}\nreport: {out / 'report.md'}", highlight=False)

"""``reptok export onnx`` / ``trt``: graphs and engines for fast inference; ``reptok export hub``: a run for the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import app, emit_json, err, handle_errors, result_console
from .options import json_option, run_path

export_app = typer.Typer(help="Export the networks to ONNX graphs or TensorRT engines, or a run to a Hugging Face Hub folder.",
                         no_args_is_help=True)
app.add_typer(export_app, name="export")

IO = "Input / output"
G = "Graphs"
E = "Engines"


@export_app.command("onnx", epilog=(
    "Examples:\n\n  reptok export onnx --ckpt runs/gen --out engines/onnx\n\n"
    "  reptok export onnx --ckpt runs/gen --out engines/onnx --components generator,decoder,vae,encoder --overwrite\n\n"
    "  reptok sample --ckpt runs/gen --backend onnx --engine engines/onnx --class 88 -n 16 --out s.npz\n\n"
    "CFG is not inside the generator graph: the shared sampler batches the null-class and class rows of a step into one call."))
@handle_errors
def onnx(
    ckpt: Path = typer.Option(..., "--ckpt", parser=run_path, help="A run directory (generator, tokenizer or converted run).", rich_help_panel=IO),
    out: Path = typer.Option(..., "--out", help="Folder to write (graphs + manifest.json).", rich_help_panel=IO),
    components: str = typer.Option("generator,decoder,vae", "--components",
                                   help="Comma list of generator, decoder, vae, encoder.", rich_help_panel=G),
    opset: int = typer.Option(17, "--opset", help="ONNX opset (13-20).", rich_help_panel=G),
    dtype: str = typer.Option("fp32", "--weights-dtype", help="fp32 | fp16: how the graphs store their weights, and so compute (I/O stays fp32).", rich_help_panel=G),
    atol: Optional[float] = typer.Option(None, "--atol", help="Verification tolerance, x max(1, max|ref|) (fp32 1e-3, fp16 3e-2).", rich_help_panel=G),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the ONNX Runtime vs torch check.", rich_help_panel=G),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT.", rich_help_panel=IO),
    json_out: bool = json_option(IO),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No log lines on stderr.", rich_help_panel=IO),
):
    """Export one ONNX graph per network call, verified against torch with ONNX Runtime."""
    from export.onnx import export_onnx

    log = (lambda m: None) if quiet else (lambda m: err.print(m, highlight=False))
    manifest = export_onnx(ckpt, out, components=components, opset=opset, dtype=dtype, atol=atol,
                           overwrite=overwrite, verify=not no_verify, log=log)
    if json_out:
        manifest = dict(manifest)
        if "generator" in manifest:  # keep the line short: statistics are in the file
            manifest["generator"] = {k: v for k, v in manifest["generator"].items() if k not in ("token_mean", "token_std")}
        emit_json(manifest)
    else:
        for comp, why in manifest["skipped"].items():
            err.print(f"[yellow]skipped[/] {comp}: {why}", highlight=False)
        result_console().print(f"[green]wrote[/] {manifest['out']}: {', '.join(g['file'] for g in manifest['graphs'].values())}")


@export_app.command("trt", epilog=(
    "Examples:\n\n  reptok export trt --onnx engines/onnx --out engines/trt-fp16\n\n"
    "  reptok export trt --onnx engines/onnx --out engines/trt-bf16 --trt-precision bf16 --max-batch 128 --timing-cache trt.cache\n\n"
    "  reptok sample --ckpt runs/gen --backend trt --engine engines/trt-fp16 --class all -n 50 --out s.npz\n\n"
    "Needs a CUDA GPU and tensorrt>=10. The generator's profile is doubled (CFG batches two rows per image)."))
@handle_errors
def trt(
    onnx_dir: Path = typer.Option(..., "--onnx", help="The ONNX folder written by 'reptok export onnx'.", rich_help_panel=IO),
    out: Path = typer.Option(..., "--out", help="Folder to write (*.plan, engines.json, manifest.json).", rich_help_panel=IO),
    precision: str = typer.Option("fp16", "--trt-precision", help="TensorRT builder precision: fp16 | bf16 | fp32 (norm statistics stay fp32).", rich_help_panel=E),
    min_batch: int = typer.Option(1, "--min-batch", rich_help_panel=E),
    opt_batch: int = typer.Option(8, "--opt-batch", help="The batch TensorRT tunes for.", rich_help_panel=E),
    max_batch: int = typer.Option(64, "--max-batch", help="Largest sampling batch (the generator gets 2x).", rich_help_panel=E),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="Read if present, written after the build.", rich_help_panel=E),
    workspace_gb: Optional[float] = typer.Option(None, "--workspace-gb", help="Builder workspace limit.", rich_help_panel=E),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT.", rich_help_panel=IO),
    json_out: bool = json_option(IO),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No log lines on stderr.", rich_help_panel=IO),
):
    """Build TensorRT engines (one optimisation profile over the batch axis) from ONNX graphs."""
    from export.runtime import require_trt

    require_trt()  # exit 2 at once on a machine without CUDA / TensorRT
    from export.trt import build_engines

    log = (lambda m: None) if quiet else (lambda m: err.print(m, highlight=False))
    sidecar = build_engines(onnx_dir, out, precision=precision, min_batch=min_batch, opt_batch=opt_batch,
                            max_batch=max_batch, timing_cache=timing_cache, workspace_gb=workspace_gb,
                            overwrite=overwrite, log=log)
    if json_out:
        emit_json(sidecar)
    else:
        result_console().print(f"[green]wrote[/] {sidecar['out']}: {', '.join(e['file'] for e in sidecar['engines'].values())} "
                  f"(TensorRT {sidecar['tensorrt']}, {sidecar['gpu']}, {precision})")


@export_app.command("hub", epilog=(
    "Examples:\n\n  reptok export hub runs/gen --out hub/gen --repo-id me/reptok-shapes\n\n"
    "  hf upload me/reptok-shapes hub/gen .\n\n"
    "  reptok sample --ckpt hf://me/reptok-shapes --class 0 -n 4 --out s/\n\n"
    "  reptok export hub runs/ft-tok --out hub/ft --include-training-state   # others can train --init from it"))
@handle_errors
def hub(
    run: Path = typer.Argument(..., parser=run_path, help="A run directory (or hf://OWNER/NAME)."),
    out: Path = typer.Option(..., "--out", help="Folder to write (upload it with 'hf upload').", rich_help_panel=IO),
    include_training_state: bool = typer.Option(False, "--include-training-state",
                                                help="Add model.safetensors (the raw weights train --init starts from).",
                                                rich_help_panel=IO),
    repo_id: Optional[str] = typer.Option(None, "--repo-id", help="OWNER/NAME it will be uploaded to (used in the card's examples).",
                                          rich_help_panel=IO),
    license: Optional[str] = typer.Option(None, "--license", help="Licence id for the card (runs not derived from the "
                                          "authors' release; derived runs carry theirs).", rich_help_panel=IO),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT.", rich_help_panel=IO),
    json_out: bool = json_option(IO),
):
    """A run as a Hugging Face Hub folder: weights, config, model card (provenance, licence, evals)."""
    from export.hub import export_hub

    summary = export_hub(run, out, include_training_state=include_training_state, repo_id=repo_id, license=license,
                         overwrite=overwrite)
    if json_out:
        emit_json(summary)
    else:
        result_console().print(f"[green]wrote[/] {summary['out']}: {', '.join(summary['files'])}", highlight=False)

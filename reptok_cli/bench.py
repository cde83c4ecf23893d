"""``reptok bench``: latency and images/s per stage for torch / ONNX Runtime / TensorRT."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import app, emit_json, err, handle_errors, parse_device
from .options import device_option, json_option, run_path

W = "What to run"
H = "How"


@app.command("bench", epilog=(
    "Examples:\n\n  reptok bench --preset small --backend torch,onnx --batch-sizes 1,8\n\n"
    "  reptok bench --ckpt runs/gen --backend torch,onnx,trt --batch-sizes 1,8,64 --precision bf16 --compile --cuda-graphs\n\n"
    "  reptok bench --preset tiny --backend torch,onnx --batch-sizes 1,2 --iters 2 --json\n\n"
    "Stages: generator / decoder = one network call (NFE), vae = one decode, end_to_end = sampling B images. "
    "ms: the median of --iters timed calls (min-max beside it). "
    "max_abs_err: vs torch eager fp32 on the same inputs; vs_torch: throughput / torch eager.\n\n"
    "  reptok bench --preset xl --train recon,gen --batch-sizes 64 --device cuda --precision bf16   # training: model alone vs loader-fed"))
@handle_errors
def bench(
    ckpt: Optional[Path] = typer.Option(None, "--ckpt", parser=run_path, help="A run directory.", rich_help_panel=W),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="A preset with random weights (tiny, small, ..., xl).", rich_help_panel=W),
    backend: str = typer.Option("torch", "--backend", help="Comma list of torch, onnx, trt.", rich_help_panel=W),
    batch_sizes: str = typer.Option("1,8", "--batch-sizes", help="Comma list, e.g. 1,8,64.", rich_help_panel=W),
    stages: str = typer.Option("generator,decoder,vae,end_to_end", "--stages", help="Subset of the stages.", rich_help_panel=W),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="End-to-end generator steps (default: the run's).", rich_help_panel=W),
    decoder_steps: Optional[int] = typer.Option(None, "--decoder-steps", min=1, help="End-to-end decoder steps (default: the run's).", rich_help_panel=W),
    train: Optional[str] = typer.Option(
        None, "--train", help="Time training instead (recon, gen or both, with --preset): the model alone on one synthetic "
        "batch vs loader-fed, --iters steps at the first --batch-sizes entry, with TFLOP/s and MFU.", rich_help_panel=W),
    warmup: int = typer.Option(2, "--warmup", min=0, help="Untimed calls first (compile, autotune).", rich_help_panel=H),
    iters: int = typer.Option(5, "--iters", min=1, help="Timed calls (median reported, with min-max).", rich_help_panel=H),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch and ONNX Runtime (default: torch's, i.e. OMP_NUM_THREADS).", rich_help_panel=H),
    compile_: bool = typer.Option(False, "--compile", help="Add torch.compile rows.", rich_help_panel=H),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="Add CUDA-graph rows (torch, CUDA only).", rich_help_panel=H),
    device: str = device_option(H),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 | fp16: the numeric format of compute (torch autocast, ONNX graph dtype, TensorRT builder precision).", rich_help_panel=H),
    engine: Optional[List[Path]] = typer.Option(
        None, "--engine", help="Reuse an export of --ckpt: an ONNX folder and/or a TensorRT folder (repeatable; "
        "the kind is read from the folder).", rich_help_panel=H),
    json_out: bool = json_option(W),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No log lines on stderr.", rich_help_panel=W),
):
    """Time each stage per backend and batch size (warm-up excluded) and print a table."""
    from export.bench import run_bench
    from reptok.bench import STAGES
    from reptok.errors import InputError

    onnx_dir, trt_dir = _split_engines(engine or [])
    stage_list = [s.strip() for s in stages.split(",") if s.strip()]
    bad = [s for s in stage_list if s not in STAGES]
    if bad:
        raise InputError(f"--stages {bad[0]!r}: choose from {', '.join(STAGES)}")
    log = (lambda m: None) if quiet else (lambda m: err.print(m, highlight=False))
    if train is not None:
        return _train_bench(train, preset, ckpt, batch_sizes, iters, device, precision, json_out, log)
    report = run_bench(ckpt=ckpt, preset=preset, backends=backend, batch_sizes=batch_sizes, steps=steps,
                       decoder_steps=decoder_steps,
                       warmup=warmup, iters=iters, compile=compile_, cuda_graphs=cuda_graphs,
                       device=parse_device(device), precision=precision, onnx_dir=onnx_dir, trt_dir=trt_dir,
                       stages=stage_list, threads=threads, log=log)
    if json_out:
        emit_json(report)
        return
    print_table(report, notes=not quiet)


def _train_bench(train, preset, ckpt, batch_sizes, iters, device, precision, json_out, log) -> None:
    from reptok.bench import parse_batch_sizes
    from reptok.errors import InputError
    from reptok.train.throughput import train_throughput

    if preset is None or ckpt is not None:
        raise InputError("--train times a preset with random weights: pass --preset NAME (not --ckpt)")
    stages = [s.strip() for s in train.split(",") if s.strip()]
    report = train_throughput(preset, stages, steps=iters, batch_size=parse_batch_sizes(batch_sizes)[0],
                              device=parse_device(device), precision=precision, log=log)
    if json_out:
        emit_json(report)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"reptok bench --train: {preset} on {report['device']} ({report['precision']})")
    for col in ("stage", "mode", "batch", "img/s", "TFLOP/s", "MFU"):
        t.add_column(col, justify="left" if col in ("stage", "mode") else "right")
    for r in report["rows"]:
        t.add_row(r["stage"], r["mode"], str(r["batch"]), f"{r['images_per_s']:.1f}", f"{r['tflops']:.3g}",
                  f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "no MFU")
    Console().print(t)
    for n in report["notes"]:
        log(f"[yellow]note:[/] {n}")  # -q: the table alone


def print_table(report: dict, notes: bool = True) -> None:
    from rich.console import Console
    from rich.table import Table

    what = report.get("preset") or report.get("ckpt")
    t = Table(title=f"reptok bench: {what} on {report['device']} ({report['threads']} threads)")
    num = ("batch", "ms", "min-max ms", "img/s", "TFLOP/s", "MFU", "vs torch", "max err")
    for col in ("backend", "prec", "stage", "batch", "ms", "min-max ms", "img/s", "TFLOP/s", "MFU", "vs torch", "max err", "note"):
        t.add_column(col, justify="right" if col in num else "left", no_wrap=col in ("backend", "stage"))
    short = {"CPUExecutionProvider": "ort-cpu", "CUDAExecutionProvider": "ort-cuda", "TensorRT": "trt"}
    for r in report["rows"]:
        name = short.get(r["provider"], r["backend"]) if r["backend"] in ("onnx", "trt") else r["backend"]
        t.add_row(name, r["precision"], r["stage"], str(r["batch"]), f"{r['latency_ms']:.2f}",
                  f"{r['latency_min_ms']:.2f}-{r['latency_max_ms']:.2f}", f"{r['images_per_s']:.1f}", f"{r['tflops']:.3g}",
                  f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "no MFU", f"{r['vs_torch']:.2f}x" if r["vs_torch"] else "",
                  f"{r['max_abs_err']:.1e}" if r["max_abs_err"] is not None else "", r["note"])
    Console().print(t)
    for n in report["notes"] if notes else ():
        err.print(f"[yellow]note:[/] {n}", highlight=False)


def _split_engines(folders):
    """--engine folders -> (ONNX folder, TensorRT folder): a folder with the TensorRT sidecar
    holds engines, any other one ONNX graphs; two of a kind is exit 2."""
    from export.runtime import SIDECAR
    from reptok.errors import InputError

    found = {"onnx": None, "trt": None}
    for f in folders:
        if not Path(f).is_dir():
            raise InputError(f"--engine {f}: no such folder (written by 'reptok export onnx|trt')")
        kind = "trt" if (Path(f) / SIDECAR).is_file() else "onnx"
        if found[kind] is not None:
            raise InputError(f"--engine {f}: a second {kind} folder (already {found[kind]})")
        found[kind] = Path(f)
    return found["onnx"], found["trt"]

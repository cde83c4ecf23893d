"""``reptok sample``: class- or text-conditional generation to PNGs, a grid or an ADM .npz."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import app, emit_json, err, handle_errors, init_ranks, parse_device, progress_bar
from .options import (check_choice, check_sampling, device_option, engine_option, json_option, overwrite_option,
                      quiet_option, run_path)

S = "Sampler"
J = "Job"


@app.command("sample", epilog=(
    "Examples:\n\n  reptok sample --ckpt runs/gen --class 88 -n 64 --out samples/\n\n"
    "  reptok sample --ckpt runs/gen --class all -n 50 --out samples.npz     # 50K ImageNet protocol\n\n"
    "  for s in 0 1000 2000; do reptok sample --ckpt runs/gen --class all -n 3 --start $s --count 1000 --out shard_$s.npz; done\n\n"
    "  torchrun --nproc-per-node 8 -m reptok_cli sample --ckpt runs/gen --class all -n 50 --out samples.npz\n\n"
    "  reptok sample --ckpt runs/t2i --prompt \"a red circle\" --prompt \"a blue ring\" -n 4 --out t2i.npz\n\n"
    "  reptok sample --ckpt runs/t2i --prompts prompts.txt -n 8 --cfg 3 --out t2i/"))
@handle_errors
def sample(
    ckpt: Path = typer.Option(..., "--ckpt", parser=run_path, help="A generator run (or a converted official model).", rich_help_panel=J),
    out: Path = typer.Option(..., "--out", help="Folder of PNGs, a grid .png, or an ADM .npz.", rich_help_panel=J),
    classes: Optional[str] = typer.Option(None, "--class", "-c", help="An id, a list 1,5,9, a range 0-9, or all (default 0). Class runs only.", rich_help_panel=J),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", help="A text prompt (repeatable). Text-to-image runs only.", rich_help_panel=J),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts", help="A text file, one prompt a line. Text-to-image runs only.", rich_help_panel=J),
    n: int = typer.Option(1, "-n", "--per-class", "--per-prompt", min=1, help="Images per class (or per prompt).", rich_help_panel=J),
    start: int = typer.Option(0, "--start", help="First global image index of this shard.", rich_help_panel=J),
    count: Optional[int] = typer.Option(None, "--count", help="Images in this shard (default: to the end).", rich_help_panel=J),
    seed: int = typer.Option(0, "--seed", rich_help_panel=J),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="Decoder (and VAE) batch (default 64 on CUDA, 16 elsewhere).", rich_help_panel=J),
    gen_batch_size: Optional[int] = typer.Option(None, "--gen-batch-size", min=1, help="Generator batch (default: --batch-size).", rich_help_panel=J),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="CFG scale (default from the run, official 1.5).", rich_help_panel=S),
    cfg_interval: Optional[str] = typer.Option(None, "--cfg-interval", help="t_begin,t_end (official 0.3,0.9); 'none' = always.", rich_help_panel=S),
    steps: Optional[int] = typer.Option(None, "--steps", help="Generator steps (official 50).", rich_help_panel=S),
    decoder_steps: Optional[int] = typer.Option(None, "--decoder-steps", help="Decoder steps (official 50).", rich_help_panel=S),
    solver: Optional[str] = typer.Option(None, "--solver", help="euler | heun (both stages).", rich_help_panel=S),
    backend: str = typer.Option("auto", "--backend", help="auto | torch | onnx | trt (auto: onnx/trt with --engine, else torch).", rich_help_panel=S),
    engine: Optional[Path] = engine_option(S, "Exported engine folder for --backend onnx|trt."),
    device: str = device_option(S),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | bf16 | fp16 autocast (torch; default bf16 on CUDA, fp32 on CPU).", rich_help_panel=S),
    no_fast: bool = typer.Option(False, "--no-fast", help="Force torch eager fp32 (no bf16, no CUDA graphs).", rich_help_panel=S),
    compile_: bool = typer.Option(False, "--compile", help="Regional torch.compile (torch backend; opt-in).", rich_help_panel=S),
    cuda_graphs: Optional[bool] = typer.Option(None, "--cuda-graphs/--no-cuda-graphs", help="CUDA graphs (default: on with CUDA).", rich_help_panel=S),
    overwrite: bool = overwrite_option(J),
    json_out: bool = json_option(J),
    quiet: bool = quiet_option(J),
):
    """Generate images: generator (a class or a prompt) -> token -> decoder -> (VAE) -> pixels."""
    from export.runtime import load_sampling_pipeline
    from reptok.backends import PRECISIONS, describe_fast_path, resolve_backend
    from reptok.sample import default_batch_size, parse_cfg_interval, plan_sample_job, sample_to

    interval = parse_cfg_interval(cfg_interval) if cfg_interval is not None else None
    check_sampling(steps=steps, cfg=cfg, cfg_interval=interval,
                   decoder_steps=decoder_steps, solver=solver)
    check_choice("--precision", precision, tuple(PRECISIONS))
    dev = parse_device(device)
    job = plan_sample_job(
        ckpt, out, classes=classes, prompts=prompt or (), prompts_file=prompts_file, n=n, seed=seed, cfg=cfg,
        cfg_interval=cfg_interval, steps=steps, decoder_steps=decoder_steps, solver=solver,
        backend=resolve_backend(backend, engine), engine=engine, overwrite=overwrite,
        precision="fp32" if no_fast else (precision or ("bf16" if dev.startswith("cuda") else "fp32")))
    dev, info = init_ranks(dev)
    batch_size = batch_size or default_batch_size(dev)
    job.prepare_output(info)
    pipe = load_sampling_pipeline(ckpt, dev, backend=backend, engine=engine, precision=precision, fast=not no_fast,
                                  compile=compile_, cuda_graphs=cuda_graphs)
    if info.is_main and not quiet:  # stderr: stdout stays the result
        err.print(f"sampling with {describe_fast_path(pipe.fast_path)}", highlight=False)
    with progress_bar("sampling", job.images(start, count), enabled=info.is_main and not quiet) as advance:
        summary = sample_to(pipe, job.classes, n, out, seed=seed, start=start, count=count, batch_size=batch_size,
                            gen_batch_size=gen_batch_size, info=info, progress=advance, prompts=job.prompts,
                            **job.sampler)
    if info.is_main:
        summary["backend"] = pipe.fast_path["backend"]
        if json_out:
            emit_json(summary)
        else:
            typer.echo(f"wrote {summary['out']}: {summary['images']} images "
                       f"({summary['images_per_s']} img/s, {summary['fast_path']}, NFE per image: generator "
                       f"{summary['nfe']['generator']}, decoder {summary['nfe']['decoder']})")

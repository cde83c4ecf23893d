"""``reptok train distill`` (a K-step decoder from a tokenizer run) and ``reptok train attach``
(a generator run that decodes with another tokenizer run, e.g. the distilled student)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from reptok.run import resolve_config

from .common import emit_json, err, handle_errors, init_ranks, parse_device, result_console
from .options import check_choice, device_option, given_flags, json_option, option_names, quiet_option, run_path
from .train import MODEL, OPT, RUN, _train_overrides, train_app


@train_app.command("distill", epilog=(
    "Examples:\n\n  reptok train distill --ckpt runs/tok --out runs/tok-4step --student-steps 4\n\n"
    "  reptok train distill --ckpt runs/tok --out runs/tok-1step --student-steps 1 --teacher-steps 50 --method perflow\n\n"
    "  torchrun --nproc-per-node 8 -m reptok_cli train distill --ckpt runs/tok-xl --out runs/tok-xl-4 --student-steps 4\n\n"
    "  reptok train distill --ckpt runs/tok --out runs/tok-4step --student-steps 4 --resume --steps 2000"))
@handle_errors
def distill(
    ckpt: Path = typer.Option(..., "--ckpt", parser=run_path, help="The teacher: a tokenizer run (reptok train recon).", rich_help_panel=RUN),
    out: Path = typer.Option(..., "--out", help="The student run directory to create (or resume).", rich_help_panel=RUN),
    student_steps: Optional[int] = typer.Option(None, "--student-steps", "-k", help="K: the student's Euler steps (required for a new run).", rich_help_panel=MODEL),
    teacher_steps: Optional[int] = typer.Option(None, "--teacher-steps", help="The teacher's steps to reproduce (default: the teacher's decoder steps).", rich_help_panel=MODEL),
    method: Optional[str] = typer.Option(None, "--method", help="reflow (window starts, default) | perflow (points inside each window).", rich_help_panel=MODEL),
    data: Optional[Path] = typer.Option(None, "--data", help="A prepared dataset (default: the teacher's).", rich_help_panel=RUN),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (default 400).", rich_help_panel=OPT),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Global batch (split across ranks); x K student rows.", rich_help_panel=OPT),
    lr: Optional[float] = typer.Option(None, "--lr", help="Default: the teacher's lr (constant).", rich_help_panel=OPT),
    ema: Optional[float] = typer.Option(None, "--ema", help="EMA decay (default 0.99).", rich_help_panel=OPT),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", rich_help_panel=OPT),
    seed: Optional[int] = typer.Option(None, "--seed", rich_help_panel=OPT),
    ckpt_every: Optional[int] = typer.Option(None, "--ckpt-every", rich_help_panel=RUN),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's last checkpoint.", rich_help_panel=RUN),
    device: str = device_option(RUN),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 autocast on CUDA) | fp32 | bf16 | fp16", rich_help_panel=RUN),
    json_out: bool = json_option(RUN),
    quiet: bool = quiet_option(RUN),
):
    """Distil the tokenizer run's flow decoder into a K-step decoder (piecewise reflow, same architecture)."""
    from reptok.train.distill import distill_config, distill_defaults, train_distill

    dev = parse_device(device)
    over = _train_overrides(steps, batch_size, lr, seed, grad_accum, ckpt_every, None, ema)
    from reptok.train.loop import PRECISIONS
    from reptok.outputs import check_run_output, has_checkpoint

    check_choice("--precision", precision, PRECISIONS, allow_none=False)
    check_run_output(out, resume)
    with option_names(given_flags(over)):
        if resume and has_checkpoint(out):
            cfg = resolve_config(ckpt=str(out), overrides=over)
        else:
            if student_steps is None:
                from reptok.errors import InputError

                raise InputError("--student-steps K is required for a new distillation run")
            cfg = distill_config(ckpt, student_steps, {**distill_defaults(ckpt), **{k: v for k, v in over.items() if v is not None}})
    dev, info = init_ranks(dev)
    from reptok.backends import set_tf32

    set_tf32(dev, True)  # float32 matmuls (fp32 training, the ops autocast keeps in fp32) as TF32
    summary = train_distill(ckpt, out, cfg, student_steps=student_steps, teacher_steps=teacher_steps,
                            method=method, data=data, resume=resume,
                            device=dev, info=info, progress=not (json_out or quiet), precision=precision)
    if info.is_main:
        if json_out:
            emit_json(summary)
        else:
            d = summary["distilled"]
            result_console().print(f"[green]done[/] {summary['run']}: {d['student_steps']}-step student of {d['teacher']} "
                      f"({d['teacher_steps']} steps), loss {summary['last_loss']:.5f}, {summary['images_per_s']} img/s")


@train_app.command("attach", epilog=(
    "Example:\n\n  reptok train attach --generator runs/gen --tokenizer runs/tok-4step --out runs/gen-4step\n\n"
    "  reptok sample --ckpt runs/gen-4step --class all -n 8 --out grid.png     # 4 decoder steps"))
@handle_errors
def attach(
    generator: Path = typer.Option(..., "--generator", parser=run_path, help="A generator run (reptok train gen).", rich_help_panel=RUN),
    tokenizer: Path = typer.Option(..., "--tokenizer", parser=run_path, help="A tokenizer run with the same encoder, e.g. a distilled student.", rich_help_panel=RUN),
    out: Path = typer.Option(..., "--out", help="The new generator run directory.", rich_help_panel=RUN),
    json_out: bool = json_option(RUN),
):
    """Copy a generator run so that it decodes with another tokenizer run (same tokens) and its decoder steps."""
    from reptok.train.distill import attach_generator

    summary = attach_generator(generator, tokenizer, out)
    if json_out:
        emit_json(summary)
    else:
        result_console().print(f"[green]wrote[/] {summary['run']}: decodes with {summary['tokenizer_run']} "
                  f"({summary['decoder_steps']} steps)")

"""``reptok train recon`` (stage a) and ``reptok train gen`` (stage b)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from reptok.presets import DEFAULT_PRESET

from .common import app, emit_json, err, handle_errors, init_ranks, parse_device
from .options import device_option, given_flags, json_option, option_names, parse_set, quiet_option, run_path, check_choice

train_app = typer.Typer(help="Train the tokenizer (recon) or the generator (gen).", no_args_is_help=True)
app.add_typer(train_app, name="train")

OPT = "Optimisation"
MODEL = "Model"
RUN = "Run"


def _finish(summary: dict, info, json_out: bool, unit: str) -> None:
    """Print the summary (rank 0): the result on stdout; a run stopped by SIGTERM / SIGUSR1
    exits 128 + signal."""
    if info.is_main:
        if json_out:
            emit_json(summary)
        elif summary.get("preempted"):
            err.print(f"[yellow]stopped[/] {summary['run']} by {summary['preempted']} after step "
                      f"{summary['stopped_at']}: checkpoint written; continue with --resume")
        else:
            typer.echo(f"done {summary['run']}: loss {summary['last_loss']:.4f}, {summary['images_per_s']} {unit}")
    if summary.get("preempted"):
        raise typer.Exit(summary["exit_code"])


def _already_finished(out: Path, cfg, kind: str, resume: bool, json_out: bool) -> bool:
    """``--resume`` of a run that already reached its step count: say so, nothing to do (exit 0)."""
    from reptok.train.start import finished_summary

    done = finished_summary(out, cfg, kind) if resume else None
    if done is not None:
        _report_finished(done, json_out)
    return done is not None


def _note_schedule(out: Path, cfg, resume: bool) -> None:
    """--resume with another --steps on a schedule with a cool-down: one line saying what changes."""
    from reptok.dist import env_info
    from reptok.train.start import schedule_change

    notice = schedule_change(out, cfg) if resume else None
    if notice and env_info().is_main:
        err.print(notice, highlight=False, soft_wrap=True)


def _report_finished(done: dict, json_out: bool) -> None:
    if json_out:
        emit_json(done)
    else:
        err.print(f"{done['run']} is finished: step {done['step']} of {done['steps']}; nothing to do "
                  f"(raise --steps to train on)", highlight=False)


def _check_runtime(workers, precision, wandb) -> None:
    """Runtime options, checked before any work (and before the process group exists)."""
    from reptok.errors import InputError
    from reptok.train.logs import check_wandb
    from reptok.train.loop import PRECISIONS

    if workers is not None and workers < 0:
        raise InputError(f"--workers {workers}: expected 0 or more")

    check_choice("--precision", precision, PRECISIONS, allow_none=False)
    check_wandb(wandb)


def _train_overrides(steps, batch_size, lr, seed, grad_accum, ckpt_every, sample_every, ema) -> dict:
    return {"train.steps": steps, "train.batch_size": batch_size, "train.lr": lr, "train.seed": seed,
            "train.grad_accum": grad_accum, "train.ckpt_every": ckpt_every, "train.sample_every": sample_every,
            "train.ema": ema}


def _time_overrides(part: str, sampler, loc, scale) -> dict:
    """--time-sampler / --time-loc / --time-scale -> the stage's model config (decoder / generator)."""
    return {f"{part}.time_sampler": sampler, f"{part}.time_loc": loc, f"{part}.time_scale": scale}


TIME_HELP = "Training time sampler: logit_normal | uniform"
VAL_EVERY_HELP = "Validate every K steps and at the last (default 500; 0 = off)."
INIT_HELP = "Start from this run's raw weights (a converted official run or any reptok run), fresh optimizer."


@train_app.command("recon", epilog=(
    "Examples:\n\n  reptok train recon --data data/shapes --out runs/tok --preset small\n\n"
    "  torchrun --nproc-per-node 8 -m reptok_cli train recon --data data/in1k --out runs/tok-xl --preset xl\n\n"
    "  reptok train recon --data data/shapes --out runs/tok --resume --steps 3000\n\n"
    "  reptok train recon --data data/in1k --out runs/ft --init runs/official-xl --steps 10000   # continue the release"))
@handle_errors
def recon(
    data: Path = typer.Option(..., "--data", help="A prepared dataset (reptok data prep).", rich_help_panel=RUN),
    out: Path = typer.Option(..., "--out", help="The run directory to create (or resume).", rich_help_panel=RUN),
    preset: str = typer.Option(DEFAULT_PRESET, "--preset", "-p", help="tiny | small | base | large | xl", rich_help_panel=MODEL),
    config: Optional[Path] = typer.Option(None, "--config", help="A config JSON (overrides --preset).", rich_help_panel=MODEL),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="timm ViT name (DINOv2, MAE, CLIP).", rich_help_panel=MODEL),
    encoder_weights: Optional[str] = typer.Option(None, "--encoder-weights", help="hub | random | PATH to a weights file.", rich_help_panel=MODEL),
    vae: Optional[str] = typer.Option(None, "--vae", help="Hub id or local dir of a diffusers AutoencoderKL, or 'none' (pixel space).", rich_help_panel=MODEL),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Config override KEY=VALUE (e.g. decoder.depth=4).", rich_help_panel=MODEL),
    steps: Optional[int] = typer.Option(None, "--steps", rich_help_panel=OPT),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Global batch (split across ranks).", rich_help_panel=OPT),
    lr: Optional[float] = typer.Option(None, "--lr", rich_help_panel=OPT),
    cos_weight: Optional[float] = typer.Option(None, "--cos-weight", help="lambda of the cosine anchor.", rich_help_panel=OPT),
    token_lr_scale: Optional[float] = typer.Option(None, "--token-lr-scale", help="lr multiplier for the cls token (1 = the paper).", rich_help_panel=OPT),
    ema: Optional[float] = typer.Option(None, "--ema", help="EMA decay.", rich_help_panel=OPT),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", rich_help_panel=OPT),
    seed: Optional[int] = typer.Option(None, "--seed", rich_help_panel=OPT),
    freeze_token: bool = typer.Option(False, "--freeze-token", help="Baseline: keep the SSL cls token frozen.", rich_help_panel=OPT),
    time_sampler: Optional[str] = typer.Option(None, "--time-sampler", help=TIME_HELP + " (official: logit_normal).", rich_help_panel=OPT),
    time_loc: Optional[float] = typer.Option(None, "--time-loc", help="Logit-normal location (0; t = 0 is noise).", rich_help_panel=OPT),
    time_scale: Optional[float] = typer.Option(None, "--time-scale", help="Logit-normal scale (1).", rich_help_panel=OPT),
    init: Optional[Path] = typer.Option(None, "--init", parser=run_path, help=INIT_HELP, rich_help_panel=RUN),
    ckpt_every: Optional[int] = typer.Option(None, "--ckpt-every", rich_help_panel=RUN),
    sample_every: Optional[int] = typer.Option(None, "--sample-every", help="Reconstruction grid every K steps.", rich_help_panel=RUN),
    val_data: Optional[Path] = typer.Option(None, "--val-data", help="Held-out prepared dataset: validation flow loss, PSNR / SSIM, FID proxy (README: Validation).", rich_help_panel=RUN),
    val_every: Optional[int] = typer.Option(None, "--val-every", help=VAL_EVERY_HELP, rich_help_panel=RUN),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's last checkpoint.", rich_help_panel=RUN),
    device: str = device_option(RUN),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 autocast on CUDA) | fp32 | bf16 | fp16 (with loss scaling)", rich_help_panel=RUN),
    hflip: Optional[bool] = typer.Option(None, "--hflip/--no-hflip", help="Random horizontal flips, seeded per step (default: on for base/large/xl).", rich_help_panel=OPT),
    workers: Optional[int] = typer.Option(None, "--workers", help="Data loader processes per rank (default: min(8, CPUs / local ranks)).", rich_help_panel=RUN),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile each decoder and ViT block.", rich_help_panel=RUN),
    grad_checkpoint: bool = typer.Option(False, "--grad-checkpoint", help="Activation checkpointing of the decoder blocks (less memory, ~1/3 more compute).", rich_help_panel=RUN),
    no_tensorboard: bool = typer.Option(False, "--no-tensorboard", help="Do not write TensorBoard events to RUN/tensorboard.", rich_help_panel=RUN),
    wandb: Optional[str] = typer.Option(None, "--wandb", help="Also log to this Weights & Biases project (needs wandb).", rich_help_panel=RUN),
    json_out: bool = json_option(RUN),
    quiet: bool = quiet_option(RUN),
):
    """Stage (a): train the encoder's \\[cls] token and the flow decoder jointly."""
    from reptok.train.recon import train_recon
    from reptok.train.start import fresh_run_guard, recon_run_config

    dev = parse_device(device)
    over = _train_overrides(steps, batch_size, lr, seed, grad_accum, ckpt_every, sample_every, ema)
    over.update({"train.cos_weight": cos_weight, "train.token_lr_scale": token_lr_scale, "train.hflip": hflip,
                 "train.val_every": val_every})
    over.update(_time_overrides("decoder", time_sampler, time_loc, time_scale))
    _check_runtime(workers, precision, wandb)
    sets = parse_set(set_)
    flags = given_flags(over, sets)
    with option_names(flags):
        cfg = recon_run_config(out, {**over, **sets}, preset=preset, config=config, resume=resume, init=init,
                               encoder=encoder, encoder_weights=encoder_weights, vae=vae)
    if _already_finished(out, cfg, "tokenizer", resume, json_out):
        return
    _note_schedule(out, cfg, resume)
    dev, info = init_ranks(dev)  # after validation: a bad option fails every rank before any collective
    from reptok.backends import set_tf32

    set_tf32(dev, True)  # float32 matmuls (fp32 training, the ops autocast keeps in fp32) as TF32
    with fresh_run_guard(out, resume, info.is_main):
        summary = train_recon(data, out, cfg, resume=resume, freeze_token=freeze_token, device=dev, info=info,
                              progress=not (json_out or quiet), precision=precision, init=init, workers=workers,
                              compile=compile_, grad_checkpoint=grad_checkpoint, tensorboard=not no_tensorboard,
                              wandb=wandb, notify=None if quiet else (lambda line: err.print(line, highlight=False)),
                              val_data=val_data)
    _finish(summary, info, json_out, "img/s")


@train_app.command("gen", epilog=(
    "Examples:\n\n  reptok train gen --tokens tokens.npy --out runs/gen --preset small\n\n"
    "  torchrun --nproc-per-node 8 -m reptok_cli train gen --tokens in1k.npy --out runs/gen-xl --preset xl\n\n"
    "  reptok train gen --tokens tokens.npy --out runs/t2i --text-encoder tiny        # text-to-image, offline\n\n"
    "  reptok train gen --tokens coco.npy --out runs/t2i-b --preset base --text-encoder clip:ViT-B-32/openai\n\n"
    "  reptok train gen --tokens in1k.npy --out runs/gen-ft --init runs/official-xl   # continue the release"))
@handle_errors
def gen(
    tokens: Path = typer.Option(..., "--tokens", help="tokens.npy written by 'reptok extract'.", rich_help_panel=RUN),
    out: Path = typer.Option(..., "--out", help="The run directory to create (or resume).", rich_help_panel=RUN),
    preset: str = typer.Option(DEFAULT_PRESET, "--preset", "-p", help="Generator size: tiny | small | base | large | xl", rich_help_panel=MODEL),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Config override KEY=VALUE (e.g. generator.depth=4).", rich_help_panel=MODEL),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Default: from the tokens' dataset; 0 = unconditional.", rich_help_panel=MODEL),
    class_dropout: Optional[float] = typer.Option(None, "--class-dropout", help="Label dropout for CFG (0.1).", rich_help_panel=OPT),
    text_encoder: Optional[str] = typer.Option(
        None, "--text-encoder", help="Text-to-image on the tokens' captions with this frozen text encoder: tiny[:seed=1,width=48] "
        "(random, offline), clip:NAME/PRETRAINED (open_clip), open_clip:NAME:FILE, hf:NAME_OR_PATH (transformers).",
        rich_help_panel=MODEL),
    caption_dropout: Optional[float] = typer.Option(None, "--caption-dropout", help="Captions replaced by \"\" for CFG (0.1).", rich_help_panel=OPT),
    token_norm: Optional[str] = typer.Option(
        None, "--token-norm", help="Generator space: scalar (z / s, one s = the tokens' std; official scale_factor) "
        "| per_dim (per-dimension standardisation). Default: the preset's (scalar).", rich_help_panel=MODEL),
    time_sampler: Optional[str] = typer.Option(None, "--time-sampler", help=TIME_HELP + " (official: uniform).", rich_help_panel=OPT),
    time_loc: Optional[float] = typer.Option(None, "--time-loc", help="Logit-normal location (0; t = 0 is noise).", rich_help_panel=OPT),
    time_scale: Optional[float] = typer.Option(None, "--time-scale", help="Logit-normal scale (1).", rich_help_panel=OPT),
    steps: Optional[int] = typer.Option(None, "--steps", rich_help_panel=OPT),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", rich_help_panel=OPT),
    lr: Optional[float] = typer.Option(None, "--lr", rich_help_panel=OPT),
    ema: Optional[float] = typer.Option(None, "--ema", rich_help_panel=OPT),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", rich_help_panel=OPT),
    seed: Optional[int] = typer.Option(None, "--seed", rich_help_panel=OPT),
    ckpt_every: Optional[int] = typer.Option(None, "--ckpt-every", rich_help_panel=RUN),
    val_tokens: Optional[Path] = typer.Option(None, "--val-tokens", help="Held-out tokens (reptok extract of a held-out set): validation flow loss and token Fréchet distance.", rich_help_panel=RUN),
    val_every: Optional[int] = typer.Option(None, "--val-every", help=VAL_EVERY_HELP, rich_help_panel=RUN),
    resume: bool = typer.Option(False, "--resume", rich_help_panel=RUN),
    init: Optional[Path] = typer.Option(None, "--init", parser=run_path, help=INIT_HELP + " Keeps its token normalisation.", rich_help_panel=RUN),
    device: str = device_option(RUN),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 autocast on CUDA) | fp32 | bf16 | fp16 (with loss scaling)", rich_help_panel=RUN),
    workers: Optional[int] = typer.Option(None, "--workers", help="Data loader processes per rank (default 0: tokens are in memory).", rich_help_panel=RUN),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the generator.", rich_help_panel=RUN),
    no_tensorboard: bool = typer.Option(False, "--no-tensorboard", help="Do not write TensorBoard events to RUN/tensorboard.", rich_help_panel=RUN),
    wandb: Optional[str] = typer.Option(None, "--wandb", help="Also log to this Weights & Biases project (needs wandb).", rich_help_panel=RUN),
    json_out: bool = json_option(RUN),
    quiet: bool = quiet_option(RUN),
):
    """Stage (b): train the MLP-Mixer generator on extracted tokens (class labels, or captions with --text-encoder)."""
    from reptok.train.gen import gen_run_config, train_gen
    from reptok.train.start import fresh_run_guard

    dev = parse_device(device)
    over = _train_overrides(steps, batch_size, lr, seed, grad_accum, ckpt_every, None, ema)
    over.update({"generator.class_dropout": class_dropout, "generator.num_classes": num_classes,
                 "generator.text_encoder": text_encoder, "generator.caption_dropout": caption_dropout,
                 "generator.token_norm": token_norm, "train.val_every": val_every})
    over.update(_time_overrides("generator", time_sampler, time_loc, time_scale))
    _check_runtime(workers, precision, wandb)
    sets = parse_set(set_)
    with option_names(given_flags(over, sets)):
        cfg = gen_run_config(out, tokens, {**over, **sets}, preset=preset, resume=resume, init=init)
    if _already_finished(out, cfg, "generator", resume, json_out):
        return
    _note_schedule(out, cfg, resume)
    dev, info = init_ranks(dev)  # after validation: a bad option fails every rank before any collective
    from reptok.backends import set_tf32

    set_tf32(dev, True)  # float32 matmuls (fp32 training, the ops autocast keeps in fp32) as TF32
    with fresh_run_guard(out, resume, info.is_main):
        summary = train_gen(tokens, out, cfg, resume=resume, device=dev, info=info, progress=not (json_out or quiet),
                            precision=precision, init=init, workers=workers, compile=compile_,
                            tensorboard=not no_tensorboard, wandb=wandb, val_tokens=val_tokens)
    _finish(summary, info, json_out, "tokens/s")

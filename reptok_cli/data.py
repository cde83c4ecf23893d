"""``reptok data``: prepare datasets (``prep``) and summarise them (``info``). Thin: parse, call
:mod:`reptok.data`, print (tables and progress on stderr, ``--json`` on stdout)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .common import app, emit_json, err, handle_errors, init_ranks, parse_device
from .options import device_option, json_option

data_app = typer.Typer(
    name="data",
    help="Prepare datasets for training (image folder, Hugging Face dataset, builtin:shapes) and inspect them.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(data_app, name="data", rich_help_panel="Data")

_IN, _OUT, _HF = "Input", "Output", "Hugging Face columns"

PREP_EPILOG = (
    "Examples:\n\n"
    "  reptok data prep builtin:shapes --out data/shapes     # 12000 images, 32 px, 12 classes\n\n"
    "  reptok data prep builtin:shapes:2000 --out data/shapes64 --resolution 64\n\n"
    "  reptok data prep ~/imagenet/train --out data/in256    # one sub-folder per class\n\n"
    "  reptok data prep imagenet-1k --split validation --limit 10000 --out data/val\n\n"
    "  reptok data prep ./saved_ds --image-column img --caption-column text --out data/mine --json\n\n"
    "Unreadable images are skipped and listed in OUT/skipped.txt (exit code 2 only if none is usable)."
)

INFO_EPILOG = (
    "Examples:\n\n  reptok data info data/shapes\n\n"
    "  reptok data info data/shapes --json | jq .count"
)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _classes_line(names, limit: int = 6) -> str:
    if not names:
        return "-"
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} total)" if len(names) > limit else "")


@data_app.command("prep", epilog=PREP_EPILOG)
@handle_errors
def prep(
    source: str = typer.Argument(..., help="Image folder, Hugging Face dataset name or saved dataset path, or builtin:shapes[:N]."),
    out: Path = typer.Option(..., "--out", "-o", help="Output dataset directory.", rich_help_panel=_OUT),
    resolution: Optional[int] = typer.Option(None, "--resolution", "-r", help="Output side in pixels (ADM/DiT centre crop). Default: 32 for builtin, 256 otherwise.", rich_help_panel=_OUT),
    limit: Optional[int] = typer.Option(None, "--limit", help="Keep at most N images (builtin: the first N; otherwise a seeded random subset in input order).", rich_help_panel=_IN),
    split: Optional[str] = typer.Option(None, "--split", help="Hugging Face split (default: train, or the only split).", rich_help_panel=_IN),
    seed: int = typer.Option(0, "--seed", help="builtin:shapes generation seed; subset seed for --limit.", rich_help_panel=_IN),
    workers: Optional[int] = typer.Option(None, "--workers", help="Image decoding threads (default: min(8, CPUs)).", rich_help_panel=_IN),
    image_column: Optional[str] = typer.Option(None, "--image-column", help="Image column (default: detected).", rich_help_panel=_HF),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="Label column (default: detected; 'none' for unlabelled).", rich_help_panel=_HF),
    caption_column: Optional[str] = typer.Option(None, "--caption-column", help="Caption column (default: detected; 'none' to drop captions).", rich_help_panel=_HF),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists and is not empty.", rich_help_panel=_OUT),
    json_out: bool = json_option(_OUT),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar on stderr.", rich_help_panel=_OUT),
) -> None:
    """Prepare SOURCE as a memory-mapped dataset (raw uint8 pixels, labels, captions) for training."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from reptok.data import prepare

    with Progress(
        TextColumn("[bold]prep[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True, disable=quiet,
    ) as bar:
        task = bar.add_task("prep", total=None, rate="")

        def progress(done: int, total: int) -> None:
            elapsed = bar.tasks[task].elapsed or 0.0
            rate = f"{done / elapsed:,.0f} img/s" if elapsed > 0 else ""
            bar.update(task, completed=done, total=total, rate=rate)

        summary = prepare(
            source, out, resolution=resolution, limit=limit, split=split, image_column=image_column,
            label_column=label_column, caption_column=caption_column, seed=seed, progress=progress,
            overwrite=overwrite, workers=workers,
        )
    if json_out:
        emit_json(summary)
        return
    t = Table(title=f"prepared {summary['out']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("source", f"{summary['source']} ({summary['source_kind']})")
    t.add_row("images", f"{summary['count']:,} at {summary['resolution']}x{summary['resolution']}")
    t.add_row("classes", f"{summary['num_classes']}: {_classes_line(summary['class_names'])}" if summary["num_classes"] else "unlabelled")
    t.add_row("captions", "yes" if summary["has_captions"] else "no")
    skipped = summary["skipped"]
    t.add_row("skipped", f"[yellow]{skipped}[/] (see {Path(summary['out']) / 'skipped.txt'})" if skipped else "0")
    t.add_row("time", f"{summary['seconds']:.1f} s ({summary['images_per_s']:,.0f} images/s)")
    Console(soft_wrap=True).print(t)  # the result: stdout


CACHE_EPILOG = (
    "Examples:\n\n"
    "  reptok data cache-latents data/in256 --vae stabilityai/sd-vae-ft-mse\n\n"
    "  torchrun --nproc-per-node 8 -m reptok_cli data cache-latents data/in256 --vae ./sd-vae   # one share per GPU\n\n"
    "Interrupted? Run the same command again: finished chunks are kept. 'reptok train recon' on DATA then\n"
    "reads the cache instead of running the VAE encoder (the run's VAE and resolution must match)."
)


@data_app.command("cache-latents", epilog=CACHE_EPILOG)
@handle_errors
def cache_latents(
    directory: Path = typer.Argument(..., help="A dataset directory written by 'reptok data prep'."),
    vae: str = typer.Option(..., "--vae", help="Hub id or local dir of a diffusers AutoencoderKL (the run's --vae)."),
    subfolder: Optional[str] = typer.Option(None, "--subfolder", help="Subfolder of the VAE repository / directory."),
    flips: bool = typer.Option(True, "--hflip/--no-hflip", help="Also store the mirror images' posteriors (needed by train recon --hflip)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="Images per VAE forward pass (default 64 on CUDA, 32 elsewhere)."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 autocast on CUDA, fp32 elsewhere) | fp32 | bf16 | fp16; moments are stored float16."),
    chunk_size: int = typer.Option(256, "--chunk-size", help="Images per resumable unit (the units are split across ranks)."),
    device: str = device_option(),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a cache made with another VAE / flips setting."),
    json_out: bool = json_option(),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar on stderr."),
) -> None:
    """Store the SD-VAE posterior (mean, logvar) of every image in DIRECTORY/latents (sharded across torchrun ranks)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from reptok.data.dataset import read_meta
    from reptok.data.latents import cache_latents as run_cache, load_vae, vae_identity
    from reptok.errors import InputError


    read_meta(directory)
    if (batch_size is not None and batch_size < 1) or chunk_size < 1:
        raise InputError(f"--batch-size {batch_size} / --chunk-size {chunk_size}: expected 1 or more")
    dev = parse_device(device)
    from reptok.train.loop import amp_dtype_for

    amp_dtype_for(precision, dev)  # a bad --precision: exit 2 before loading anything
    model = load_vae(vae, subfolder)  # before the process group: a bad --vae fails every rank at once
    dev, rank = init_ranks(dev)
    with Progress(TextColumn("[bold]cache[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=err, transient=True, disable=quiet or not rank.is_main) as bar:
        task = bar.add_task("cache", total=None)
        summary = run_cache(directory, model, vae_identity(vae, subfolder), flips=flips, batch_size=batch_size,
                            device=dev, info=rank, overwrite=overwrite, chunk=chunk_size, precision=precision,
                            progress=lambda done, total: bar.update(task, completed=done, total=total))
    if not rank.is_main:
        return
    if json_out:
        emit_json(summary)
    else:
        Console(soft_wrap=True).print(f"[green]cached[/] {summary['count']:,} images ({'with' if summary['flips'] else 'no'} mirrors) "
                  f"in {summary['out']}: {summary['encoded']:,} encoded, {summary['images_per_s']:,.1f} img/s")


@data_app.command("info", epilog=INFO_EPILOG)
@handle_errors
def info(
    directory: Path = typer.Argument(..., help="A dataset directory written by 'reptok data prep'."),
    json_out: bool = json_option(),
) -> None:
    """Summarise a prepared dataset: size, resolution, classes, captions, skipped inputs."""
    from reptok.data import dataset_info

    d = dataset_info(directory)
    if json_out:
        emit_json(d)
        return
    t = Table(title=str(directory), show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("source", f"{d.get('source')} ({d.get('source_kind')})")
    t.add_row("images", f"{d['count']:,} at {d['resolution']}x{d['resolution']}, {_fmt_bytes(d['size_bytes'])} on disk")
    if d["num_classes"]:
        counts = d["class_counts"]
        t.add_row("classes", f"{d['num_classes']}: {_classes_line(d['class_names'])}")
        t.add_row("per class", f"min {min(counts):,}, max {max(counts):,}" + (f", {d['unlabelled']:,} unlabelled" if d["unlabelled"] else ""))
    else:
        t.add_row("classes", "unlabelled")
    t.add_row("captions", "yes" if d.get("has_captions") else "no")
    lc = d.get("latent_cache")
    t.add_row("latent cache", f"{lc['vae']} at {lc['resolution']} px, {'with' if lc['flips'] else 'no'} mirrors" if lc else "no")
    t.add_row("skipped", str(d.get("skipped", 0)) + (f" (see {d['skipped_report']})" if d.get("skipped") else ""))
    t.add_row("created", f"{d.get('created')} by reptok {d.get('reptok_version')}")
    Console(soft_wrap=True).print(t)  # the result: stdout (reptok data info D | grep images)

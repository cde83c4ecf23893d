"""``reptok extract``, ``reptok reconstruct``, ``reptok interpolate``: image <-> token."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import app, emit_json, err, handle_errors, init_ranks, parse_device, progress_bar
from .options import check_choice, check_sampling, device_option, json_option, overwrite_option, quiet_option, run_path


@app.command("extract", epilog="Examples:\n\n  reptok extract --ckpt runs/tok --data data/shapes --out tokens.npy\n\n"
             "  torchrun --nproc-per-node 8 -m reptok_cli extract --ckpt runs/tok --data data/in1k --out in1k.npy")
@handle_errors
def extract(
    ckpt: Path = typer.Option(..., "--ckpt", parser=run_path, help="A tokenizer run (or any run with an encoder)."),
    data: Path = typer.Option(..., "--data", help="A prepared dataset."),
    out: Path = typer.Option(..., "--out", help="tokens.npy (sidecars tokens.json, tokens.labels.npy beside it)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", min=1),
    limit: int = typer.Option(None, "--limit", min=1, help="Only the first N images."),
    device: str = device_option(),
    overwrite: bool = overwrite_option(),
    json_out: bool = json_option(),
    quiet: bool = quiet_option(),
):
    """Encode every image of a dataset to its token: float32 (N, D) in dataset order."""
    from reptok.data.dataset import PreparedDataset
    from reptok.extract import extract_tokens
    from reptok.outputs import check_tokens_output
    from reptok.pipeline import Pipeline
    from reptok.run import read_run_config

    check_tokens_output(out, overwrite)
    kind = read_run_config(ckpt)["kind"]
    if kind == "generator":
        from reptok.errors import InputError

        raise InputError(f"--ckpt {ckpt}: a generator run has no encoder; pass its tokenizer run")
    total = len(PreparedDataset(data))
    dev = parse_device(device)
    dev, info = init_ranks(dev)
    pipe = Pipeline.from_run(ckpt, dev, components=("encoder",))
    mine = min(total, limit or total) // max(info.world_size, 1)
    with progress_bar("extracting", mine, enabled=info.is_main and not quiet) as advance:
        meta = extract_tokens(pipe, data, out, batch_size=batch_size, info=info, limit=limit, overwrite=overwrite,
                              progress=advance)
    if info.is_main:
        summary = {k: meta[k] for k in ("count", "dim", "checkpoint", "dataset")} | {"out": str(out)}
        emit_json(summary) if json_out else typer.echo(f"wrote {out}: {meta['count']} x {meta['dim']} tokens")


def _check_images(paths: List[Path]) -> None:
    from reptok.errors import InputError

    for p in paths:
        if not Path(p).is_file():
            raise InputError(f"{p}: no such image file")


def _check_kind(ckpt: Path, command: str) -> None:
    """reconstruct / interpolate need an encoder and a decoder: a tokenizer (or pipeline) run."""
    from reptok.errors import InputError
    from reptok.run import read_run_config

    kind = read_run_config(ckpt)["kind"]
    if kind == "generator":
        raise InputError(f"--ckpt {ckpt}: a generator run; {command} takes its tokenizer run (tokenizer_run in its config.json)")


def _load_images(paths: List[Path], size: int):
    import numpy as np

    from reptok.images import load_image, uint8_to_tensor

    return uint8_to_tensor(np.stack([load_image(p, size) for p in paths]))


@app.command("reconstruct", epilog="Example:\n\n  reptok reconstruct a.png b.png --ckpt runs/tok --out recon/")
@handle_errors
def reconstruct(
    images: List[Path] = typer.Argument(..., help="Image files."),
    ckpt: Path = typer.Option(..., "--ckpt", parser=run_path),
    out: Path = typer.Option(..., "--out", help="Folder for side-by-side PNGs (original | reconstruction)."),
    decoder_steps: int = typer.Option(None, "--decoder-steps"),
    solver: str = typer.Option(None, "--solver", help="euler | heun"),
    seed: int = typer.Option(0, "--seed"),
    device: str = device_option(),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | bf16 | fp16 autocast (default bf16 on CUDA, fp32 on CPU)."),
    no_fast: bool = typer.Option(False, "--no-fast", help="Force torch eager fp32 (default on CUDA: bf16 + CUDA graphs)."),
    cuda_graphs: Optional[bool] = typer.Option(None, "--cuda-graphs/--no-cuda-graphs", help="CUDA graphs (default: on with CUDA)."),
    overwrite: bool = overwrite_option(),
    json_out: bool = json_option(),
    quiet: bool = quiet_option(),
):
    """Image -> token -> image; prints the PSNR of each reconstruction."""
    from reptok.backends import PRECISIONS, describe_fast_path
    from reptok.pipeline import Pipeline
    from reptok.evaluate.metrics import psnr as psnr_db
    from reptok.images import make_grid, save_png, tensor_to_uint8
    from reptok.outputs import check_new_output

    _check_images(images)
    check_new_output(out, True, folder=True)  # a folder: other files in it are left alone
    for p in images:
        check_new_output(Path(out) / f"{Path(p).stem}_recon.png", overwrite)
    _check_kind(ckpt, "reconstruct")
    check_sampling(decoder_steps=decoder_steps, solver=solver)
    check_choice("--precision", precision, tuple(PRECISIONS))
    pipe = Pipeline.from_run(ckpt, parse_device(device), components=("encoder", "decoder", "vae"), fast=not no_fast,
                             precision=precision, cuda_graphs=cuda_graphs)
    if not quiet:
        err.print(f"reconstructing with {describe_fast_path(pipe.fast_path)}", highlight=False)
    x = _load_images(images, pipe.cfg.image_size)
    given = dict(decoder_steps=decoder_steps, decoder_solver=solver)
    rec = pipe.reconstruct(x, seed, output="pt", **{k: v for k, v in given.items() if v is not None})
    a, b = tensor_to_uint8(x), tensor_to_uint8(rec)
    psnr = psnr_db(a, b)
    rows = []
    for p, orig, r, v in zip(images, a, b, psnr):
        dst = Path(out) / f"{Path(p).stem}_recon.png"
        save_png(dst, make_grid([orig, r], ncol=2))
        rows.append({"image": str(p), "out": str(dst), "psnr": round(float(v), 3)})
        if not json_out:
            typer.echo(f"{p}: PSNR {v:.2f} dB -> {dst}")
    if json_out:
        emit_json({"images": rows, "mean_psnr": round(float(psnr.mean()), 3),
                   "fast_path": describe_fast_path(pipe.fast_path)})


@app.command("interpolate", epilog="Example:\n\n  reptok interpolate a.png b.png --ckpt runs/tok --frames 8 --out ab.png")
@handle_errors
def interpolate(
    a: Path = typer.Argument(...), b: Path = typer.Argument(...),
    ckpt: Path = typer.Option(..., "--ckpt", parser=run_path),
    frames: int = typer.Option(8, "--frames", min=2),
    out: Path = typer.Option(..., "--out", help="A PNG strip (or a folder for one PNG per frame)."),
    decoder_steps: int = typer.Option(None, "--decoder-steps"),
    seed: int = typer.Option(0, "--seed"),
    device: str = device_option(),
    no_fast: bool = typer.Option(False, "--no-fast", help="Force torch eager fp32 (default on CUDA: bf16 + CUDA graphs)."),
    overwrite: bool = overwrite_option(),
    json_out: bool = json_option(),
    quiet: bool = quiet_option(),
):
    """Spherical interpolation between two images' tokens, decoded with the same noise."""
    from reptok.backends import describe_fast_path
    from reptok.pipeline import Pipeline
    from reptok.images import make_grid, save_png

    from reptok.outputs import check_new_output

    _check_images([a, b])
    if Path(out).suffix.lower() == ".png":
        check_new_output(out, overwrite)
    else:
        check_new_output(out, True, folder=True)
        for i in range(frames):
            check_new_output(Path(out) / f"frame_{i:03d}.png", overwrite)
    _check_kind(ckpt, "interpolate")
    check_sampling(decoder_steps=decoder_steps)

    pipe = Pipeline.from_run(ckpt, parse_device(device), components=("encoder", "decoder", "vae"), fast=not no_fast)
    if not quiet:
        err.print(f"interpolating with {describe_fast_path(pipe.fast_path)}", highlight=False)
    x = _load_images([a, b], pipe.cfg.image_size)
    kw = {"decoder_steps": decoder_steps} if decoder_steps is not None else {}
    imgs = pipe.interpolate(x[0], x[1], frames, seed, output="np", **kw)
    if Path(out).suffix.lower() == ".png":
        save_png(out, make_grid(list(imgs), ncol=frames))
        files = [str(out)]
    else:
        files = [str(Path(out) / f"frame_{i:03d}.png") for i in range(frames)]
        for f, im in zip(files, imgs):
            save_png(f, im)
    emit_json({"frames": frames, "files": files}) if json_out else typer.echo(f"wrote {out}")


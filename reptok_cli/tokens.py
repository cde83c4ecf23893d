"""``reptok extract``, ``reptok reconstruct``, ``reptok interpolate``: image <-> token."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from .common import app, emit_json, err, handle_errors, init_ranks, parse_device


@app.command("extract", epilog="Examples:\n\n  reptok extract --ckpt runs/tok --data data/shapes --out tokens.npy\n\n"
             "  torchrun --nproc-per-node 8 -m reptok_cli extract --ckpt runs/tok --data data/in1k --out in1k.npy")
@handle_errors
def extract(
    ckpt: Path = typer.Option(..., "--ckpt", help="A tokenizer run (or any run with an encoder)."),
    data: Path = typer.Option(..., "--data", help="A prepared dataset."),
    out: Path = typer.Option(..., "--out", help="tokens.npy (sidecars tokens.json, tokens.labels.npy beside it)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b"),
    limit: int = typer.Option(None, "--limit", help="Only the first N images."),
    device: str = typer.Option("auto", "--device"),
    json_out: bool = typer.Option(False, "--json"),
):
    """Encode every image of a dataset to its token: float32 (N, D) in dataset order."""
    from reptok.pipeline import Pipeline
    from reptok.extract import extract_tokens

    dev = parse_device(device)
    dev, info = init_ranks(dev)
    pipe = Pipeline.from_run(ckpt, dev, components=("encoder",))
    meta = extract_tokens(pipe, data, out, batch_size=batch_size, info=info, limit=limit)
    if info.is_main:
        summary = {k: meta[k] for k in ("count", "dim", "checkpoint", "dataset")} | {"out": str(out)}
        emit_json(summary) if json_out else err.print(f"[green]wrote[/] {out}: {meta['count']} x {meta['dim']} tokens")


def _load_images(paths: List[Path], size: int):
    import numpy as np

    from reptok.images import load_image, uint8_to_tensor

    return uint8_to_tensor(np.stack([load_image(p, size) for p in paths]))


@app.command("reconstruct", epilog="Example:\n\n  reptok reconstruct a.png b.png --ckpt runs/tok --out recon/")
@handle_errors
def reconstruct(
    images: List[Path] = typer.Argument(..., help="Image files."),
    ckpt: Path = typer.Option(..., "--ckpt"),
    out: Path = typer.Option(..., "--out", help="Folder for side-by-side PNGs (original | reconstruction)."),
    decoder_steps: int = typer.Option(None, "--decoder-steps"),
    solver: str = typer.Option(None, "--solver", help="euler | heun"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
    no_fast: bool = typer.Option(False, "--no-fast", help="Force torch eager fp32 (default on CUDA: bf16 + CUDA graphs)."),
    json_out: bool = typer.Option(False, "--json"),
):
    """Image -> token -> image; prints the PSNR of each reconstruction."""
    from reptok.backends import apply_fast_path, describe_fast_path
    from reptok.pipeline import Pipeline
    from reptok.evaluate.metrics import psnr as psnr_db
    from reptok.images import make_grid, save_png, tensor_to_uint8

    pipe = apply_fast_path(Pipeline.from_run(ckpt, parse_device(device), components=("encoder", "decoder", "vae")),
                           fast=not no_fast)
    err.print(f"reconstructing with {describe_fast_path(pipe.fast_path)}", highlight=False)
    x = _load_images(images, pipe.cfg.image_size)
    rec = pipe.reconstruct(x, seed, steps=decoder_steps, solver=solver, output="pt")
    a, b = tensor_to_uint8(x), tensor_to_uint8(rec)
    psnr = psnr_db(a, b)
    rows = []
    for p, orig, r, v in zip(images, a, b, psnr):
        dst = Path(out) / f"{Path(p).stem}_recon.png"
        save_png(dst, make_grid([orig, r], ncol=2))
        rows.append({"image": str(p), "out": str(dst), "psnr": round(float(v), 3)})
        if not json_out:
            err.print(f"{p}: PSNR {v:.2f} dB -> {dst}")
    if json_out:
        emit_json({"images": rows, "mean_psnr": round(float(psnr.mean()), 3),
                   "fast_path": describe_fast_path(pipe.fast_path)})


@app.command("interpolate", epilog="Example:\n\n  reptok interpolate a.png b.png --ckpt runs/tok --frames 8 --out ab.png")
@handle_errors
def interpolate(
    a: Path = typer.Argument(...), b: Path = typer.Argument(...),
    ckpt: Path = typer.Option(..., "--ckpt"),
    frames: int = typer.Option(8, "--frames", min=2),
    out: Path = typer.Option(..., "--out", help="A PNG strip (or a folder for one PNG per frame)."),
    decoder_steps: int = typer.Option(None, "--decoder-steps"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
    json_out: bool = typer.Option(False, "--json"),
):
    """Spherical interpolation between two images' tokens, decoded with the same noise."""
    from reptok.pipeline import Pipeline
    from reptok.images import make_grid, save_png, tensor_to_uint8
    import torch

    from reptok.pipeline import STREAM_DECODER, index_noise, slerp

    pipe = Pipeline.from_run(ckpt, parse_device(device), components=("encoder", "decoder", "vae"))
    z = pipe.encode(_load_images([a, b], pipe.cfg.image_size))
    ts = [i / (frames - 1) for i in range(frames)]
    tokens = torch.stack([slerp(z[0], z[1], t) for t in ts])
    noise = index_noise(seed, [0], pipe.latent_shape, STREAM_DECODER).expand(frames, *pipe.latent_shape)
    imgs = tensor_to_uint8(pipe.decode_tokens(tokens, noise, decoder_steps))
    if Path(out).suffix.lower() == ".png":
        save_png(out, make_grid(list(imgs), ncol=frames))
        files = [str(out)]
    else:
        files = [str(Path(out) / f"frame_{i:03d}.png") for i in range(frames)]
        for f, im in zip(files, imgs):
            save_png(f, im)
    emit_json({"frames": frames, "files": files}) if json_out else err.print(f"[green]wrote[/] {out}")


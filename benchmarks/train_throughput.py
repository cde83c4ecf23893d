"""Training throughput per process: img/s of ``train recon`` and ``train gen`` at a preset, with
the input pipeline alone, the model alone (one synthetic batch fed again and again) and both.

    python benchmarks/train_throughput.py --preset small                 # CPU
    python benchmarks/train_throughput.py --preset xl --device cuda --precision bf16 --cache --compile

Everything runs through the package: the loader is ``reptok.train.feed.step_loader`` over the
task's own source, the model rows are ``reptok.train.loop.fit`` (AdamW, EMA, clipping, autocast,
the GradScaler with fp16) on a temporary run directory. Rates are steady state (after the first
step, which carries start-up and compilation). Weights are random (``--encoder-weights random``,
a random SD-VAE-shaped VAE for latent presets): throughput does not depend on them.

Peak memory: on CUDA ``max_memory_allocated`` of each row (and per image of the per-process
batch); on a CPU the process's peak RSS so far (monotonic, so read it as an upper bound).

Columns: stage | mode | workers | batch | img/s | peak mem | mem / img.
``--cache`` (latent presets) writes the latent cache of the benchmark data first, so the
``recon`` rows run without the VAE encoder; without it they include the VAE encoder pass.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reptok.config import PipelineConfig, with_encoder  # noqa: E402
from reptok.data.latents import LatentCache  # noqa: E402
from reptok.presets import get_preset  # noqa: E402
from reptok.dist import DistInfo  # noqa: E402
from reptok.train.feed import default_workers, step_loader  # noqa: E402
from reptok.train.loop import BatchOrder, fit  # noqa: E402


def peak_memory(device: str) -> float:
    """GiB: CUDA max allocated since the last reset, else this process's peak RSS."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def reset_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------- set-up
def bench_config(preset: str, args) -> PipelineConfig:
    cfg = with_encoder(get_preset(preset), None, "random")
    if args.batch_size:
        cfg.train.batch_size = args.batch_size
    cfg.train.log_every = 10 ** 9  # host syncs only at the first and last step
    cfg.train.ckpt_every = 10 ** 9
    cfg.train.sample_every = 0
    return cfg


def bench_data(cfg: PipelineConfig, root: Path, n: int, cache: bool, device: str) -> Path:
    """builtin:shapes at the preset's resolution (+ a random SD-VAE and its latent cache)."""
    from reptok.data.prep import prepare

    data = root / "data"
    prepare(f"builtin:shapes:{n}", data, resolution=cfg.image_size, progress=None)
    if not cfg.vae.is_pixel:
        from reptok.bench import random_autoencoder

        random_autoencoder(cfg.vae, 0).save_pretrained(root / "vae")
        cfg.vae.source, cfg.vae.subfolder = str(root / "vae"), None
        if cache:
            from reptok.data.latents import cache_latents, load_vae, vae_identity

            t0 = time.perf_counter()
            out = cache_latents(data, load_vae(cfg.vae.source), vae_identity(cfg.vae.source), flips=cfg.train.hflip,
                                batch_size=32, device=device)
            print(f"latent cache: {out['count']} images in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return data


def recon_task(cfg: PipelineConfig, data: Path, device: str, grad_checkpoint: bool):
    from reptok.data.dataset import PreparedDataset
    from reptok.pipeline import Pipeline
    from reptok.train.recon import ReconTask

    ds = PreparedDataset(data)
    cache = None if cfg.vae.is_pixel else LatentCache.of(ds.path)
    torch.manual_seed(0)
    pipe = Pipeline.build(cfg, components=("encoder", "decoder", "vae"))
    pipe.decoder.grad_checkpoint = grad_checkpoint
    return ReconTask(pipe, ds, cfg.train.cos_weight, freeze_token=False, token_lr_scale=cfg.train.token_lr_scale,
                     hflip=cfg.train.hflip, cache=cache)


def gen_task(cfg: PipelineConfig, n: int):
    from reptok.models import build_generator
    from reptok.train.gen import GenTask

    g = cfg.generator
    g.token_dim = cfg.encoder.dim
    g.num_classes = max(g.num_classes, 1)
    torch.manual_seed(0)
    gen = build_generator(g)
    gen.set_token_stats(torch.zeros(g.token_dim), torch.ones(g.token_dim))
    tokens = np.random.default_rng(0).standard_normal((n, g.n_tokens, g.token_dim)).astype(np.float32)
    if g.n_tokens == 1:
        tokens = tokens[:, 0]
    labels = np.arange(n) % g.num_classes
    return GenTask(gen, tokens, labels, class_dropout=g.class_dropout)


# ----------------------------------------------------------------------------- the three modes
def loader_rate(task, cfg, steps: int, workers: int, device: str) -> float:
    order = BatchOrder(task.num_examples(), cfg.train.batch_size, cfg.train.seed)
    source = task.example_source() if hasattr(task, "example_source") else task.load_examples
    tcfg = PipelineConfig.from_dict(cfg.to_dict()).train
    tcfg.steps = steps + 1
    loader = step_loader(source, order, tcfg, DistInfo(), 0, workers, pin=device.startswith("cuda"))
    it = iter(loader)
    first = next(it)  # worker start-up
    t0 = time.perf_counter()
    for batch in it:
        for v in batch.values():
            v.to(device, non_blocking=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    del first
    return steps * cfg.train.batch_size / (time.perf_counter() - t0)


class _Synthetic:
    """The task's first batch, returned for every step (the model alone: no reads)."""

    def __init__(self, source, indices):
        self.batch = source(indices)

    def __call__(self, indices):
        return self.batch


def model_rate(task, cfg, steps: int, workers: int, device: str, precision: str, compile: bool,
               synthetic: bool) -> dict:
    if synthetic:
        source = task.example_source() if hasattr(task, "example_source") else task.load_examples
        fixed = _Synthetic(source, torch.arange(cfg.train.batch_size // cfg.train.grad_accum))
        task.example_source = lambda: fixed  # instance attribute: this benchmark's task only
        workers = 0
    tcfg = PipelineConfig.from_dict(cfg.to_dict()).train
    tcfg.steps = steps + 1
    with tempfile.TemporaryDirectory() as run:
        s = fit(task, Path(run), tcfg, device=device, precision=precision, progress=False, workers=workers,
                compile=compile, tensorboard=False)
    if synthetic:
        del task.example_source
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--stages", default="recon,gen")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per row (after 1 warm-up step)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    ap.add_argument("--images", type=int, default=2048, help="benchmark dataset size")
    ap.add_argument("--workers", type=int, default=None, help=f"loader workers (default {default_workers()})")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--compile", action="store_true", help="also the model rows with --compile")
    ap.add_argument("--grad-checkpoint", action="store_true")
    ap.add_argument("--cache", action="store_true", help="latent presets: cache the latents first")
    ap.add_argument("--modes", default="loader,model,both",
                    help="rows per stage (loader, model, both; with --compile also model+compile, both+compile)")
    ap.add_argument("--json", action="store_true", help="one JSON line per row on stdout")
    args = ap.parse_args()
    workers = default_workers() if args.workers is None else args.workers
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(args.preset, args)
        data = bench_data(cfg, Path(tmp), args.images, args.cache, args.device) if "recon" in args.stages else None
        for stage in args.stages.split(","):
            task = recon_task(cfg, data, args.device, args.grad_checkpoint) if stage == "recon" else gen_task(cfg, args.images)
            modes = [("loader", workers, False), ("model", 0, False), ("both", workers if stage == "recon" else 0, False)]
            if args.compile:
                modes += [("model+compile", 0, True), ("both+compile", workers if stage == "recon" else 0, True)]
            wanted = set(args.modes.split(",")) | ({m + "+compile" for m in args.modes.split(",")} if args.compile else set())
            for mode, w, comp in [m for m in modes if m[0] in wanted]:
                reset_memory(args.device)
                if mode == "loader":
                    rate = loader_rate(task, cfg, args.steps, w, args.device)
                else:
                    s = model_rate(task, cfg, args.steps, w, args.device, args.precision, comp, mode.startswith("model"))
                    rate = s.get("steady_images_per_s", s["images_per_s"])
                mem = peak_memory(args.device)
                per_rank = cfg.train.batch_size
                rows.append({"stage": stage, "mode": mode, "workers": w, "batch": per_rank, "images_per_s": round(rate, 1),
                             "peak_mem_gib": round(mem, 3),
                             "mem_per_image_mib": round(mem * 1024 / per_rank, 2) if args.device.startswith("cuda") else None,
                             "preset": args.preset, "device": args.device, "precision": args.precision,
                             "cache": bool(args.cache and not cfg.vae.is_pixel)})
                print(f"{stage} {mode}: {rate:.1f} img/s", file=sys.stderr)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    mem_kind = "CUDA max allocated" if args.device.startswith("cuda") else "peak RSS so far"
    print(f"preset {args.preset}, {args.device}, precision {args.precision}, cache {args.cache}, "
          f"{args.steps} steps per row; memory = {mem_kind}\n")
    print("| stage | mode | workers | batch | img/s | peak mem GiB | MiB / img |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        per = "-" if r["mem_per_image_mib"] is None else r["mem_per_image_mib"]
        print(f"| {r['stage']} | {r['mode']} | {r['workers']} | {r['batch']} | {r['images_per_s']} | "
              f"{r['peak_mem_gib']} | {per} |")


if __name__ == "__main__":
    main()

"""``reptok bench``: latency and throughput per stage for the torch, ONNX Runtime and TensorRT
backends of one pipeline.

Stages, each timed at every batch size B (warm-up calls excluded, median of ``iters``; the
backends are timed in alternation, so background load skews none of them in particular):

- ``generator``: one network call (NFE) on B token rows (sampling doubles it to 2B inside the
  CFG interval; that is part of ``end_to_end``);
- ``decoder``: one decoder NFE on B images;
- ``vae``: one VAE decode of B latents (skipped in pixel space);
- ``end_to_end``: ``Pipeline.generate`` + ``Pipeline.decode`` of B images (generator steps with CFG,
  decoder steps, VAE), the run's default steps unless ``steps`` (generator) / ``decoder_steps`` say otherwise.

images/s = B / median latency; each row also has the min and max latency of its ``iters``
timed calls (``latency_min_ms`` / ``latency_max_ms``). ``max_abs_err`` compares each backend's NFE output with torch eager
float32 on identical inputs (same weights: the runtimes are exported from the same pipeline).
``vs_torch`` is the throughput relative to torch eager at the same stage and batch.

Backends: ``torch`` (eager, plus ``torch+compile`` with ``compile`` and ``torch+cudagraphs``
with ``cuda_graphs`` on CUDA), ``onnx`` (ONNX Runtime: CUDA provider when available),
``trt`` (TensorRT engines, CUDA only). Without ``onnx_dir`` / ``trt_dir`` the graphs and
engines are built into a temp folder first. ``--preset`` benchmarks random weights (with a
random SD-VAE-shaped VAE for latent presets), which time exactly like trained ones.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .choices import BACKENDS, PRECISIONS
from .models.vae import SD_VAE_CONFIG
from .errors import InputError
from .fast import fast_variant

STAGES = ("generator", "decoder", "vae", "end_to_end")


# ----------------------------------------------------------------------------- random weights
def randomize_weights(module: nn.Module, seed: int = 0) -> nn.Module:
    """Replace every parameter (zero-inits included) by a random one of a sensible scale, so
    outputs are non-trivial: a freshly built decoder or generator outputs exactly 0 (zero-init
    output layers), which would make any parity check vacuous.

    matrices ~ N(0, 1 / fan_in); norm scales / LayerNorm weights 1 + 0.1 N; attention scales
    U(2, 12) (they must stay positive); other vectors 0.1 N.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("attn.scale"):
                p.copy_(torch.rand(p.shape, generator=g) * 10 + 2)
            elif p.dim() >= 2:
                p.copy_(r / math.sqrt(max(1, p[0].numel())))
            elif leaf == "scale" or (leaf == "weight" and ("norm" in name or name.endswith("ln.weight"))):
                p.copy_(1 + 0.1 * r)
            else:
                p.copy_(0.1 * r)
    return module


def random_pipeline(cfg, seed: int = 0, components: Sequence[str] = ("decoder", "generator", "vae")):
    """A Pipeline of ``cfg`` with random weights (no downloads): randomized decoder / generator,
    random token statistics, and for latent configs a random diffusers AutoencoderKL with the
    SD-VAE architecture (``reptok.models.vae.SD_VAE_CONFIG``, resized to the config's channels)."""
    from .pipeline import Pipeline
    from .shapes.ssl import builtin_weights

    comps = set(components)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = Pipeline.build(cfg, components=comps - {"vae"}, resolve_builtin=builtin_weights)
        if "vae" in comps:
            pipe.latent = random_latent(cfg.vae, seed)
    if pipe.decoder is not None:
        randomize_weights(pipe.decoder, seed)
    if pipe.generator is not None:
        randomize_weights(pipe.generator, seed + 1)
        g = torch.Generator().manual_seed(seed + 2)
        d = cfg.generator.token_dim
        pipe.generator.set_token_stats(0.5 * torch.randn(d, generator=g), 0.5 + torch.rand(d, generator=g))
    return pipe.eval()


def random_autoencoder(vae_cfg, seed: int = 0, narrow: bool = False):
    """A random diffusers AutoencoderKL shaped like the SD-VAE, with ``vae_cfg``'s latent
    channels and downsampling (``log2(downsample) + 1`` levels); ``narrow``: 8-16 channels per
    level instead of 128-512 (the same layout at a CPU dry run's cost)."""
    from diffusers import AutoencoderKL


    levels = int(round(math.log2(vae_cfg.downsample))) + 1
    kw = dict(SD_VAE_CONFIG)
    kw.pop("scaling_factor", None)
    widths = (list(kw["block_out_channels"]) + [kw["block_out_channels"][-1]] * levels)[:levels]
    if narrow:
        widths, kw["norm_num_groups"] = [min(16, 8 * (i + 1)) for i in range(levels)], 8
    kw.update(latent_channels=vae_cfg.latent_channels, block_out_channels=widths,
              down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**kw)


def random_latent(vae_cfg, seed: int = 0):
    from .models.vae import LatentVAE, PixelSpace

    if vae_cfg.is_pixel:
        return PixelSpace(vae_cfg)
    return LatentVAE.from_module(random_autoencoder(vae_cfg, seed), vae_cfg)


def make_random_run(preset: str, out, seed: int = 0) -> Path:
    """Write a run directory (kind "pipeline") with random decoder + generator weights and, for
    latent presets, a random SD-VAE-shaped ``vae/``: a stand-in for a trained run (GPU checks)."""
    from . import run as rundir
    from .presets import get_preset

    from . import io

    out = Path(out)
    cfg = get_preset(preset)
    cfg.encoder.weights = "random"
    # Built in a temp folder and renamed: an interrupted call (XL: 4 GB of weights) leaves no
    # run whose config.json is there but whose weights are not.
    with io.atomic_dir(out, overwrite=True, what="run") as tmp:
        if not cfg.vae.is_pixel:
            random_autoencoder(cfg.vae, seed).save_pretrained(tmp / "vae")
            cfg.vae.source, cfg.vae.subfolder = "vae", None
        pipe = random_pipeline(cfg, seed, components=("decoder", "generator"))
        rundir.write_run_config(tmp, cfg, "pipeline", note=f"random weights from preset {preset} (benchmarks)")
        rundir.save_weights(tmp, {"decoder": pipe.decoder, "generator": pipe.generator})
    return out


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_inputs(cfg, stage: str, batch: int, device) -> tuple:
    """Deterministic random inputs for one NFE of ``stage`` at ``batch`` (float32 / int64)."""
    g = torch.Generator().manual_seed(1000 + batch)
    if stage == "generator":
        gc = cfg.generator
        y = torch.randint(0, max(gc.num_classes, 1), (batch,), generator=g)
        args = (torch.randn(batch, gc.n_tokens, gc.token_dim, generator=g), torch.full((batch,), 0.5), y)
    elif stage == "decoder":
        d = cfg.decoder
        args = (torch.randn(batch, d.in_channels, d.input_size, d.input_size, generator=g),
                torch.full((batch,), 0.5), torch.randn(batch, d.token_dim, generator=g))
    else:
        d = cfg.decoder
        args = (torch.randn(batch, d.in_channels, d.input_size, d.input_size, generator=g),)
    return tuple(a.to(device) for a in args)


def _stage_fn(pipe, stage: str, args: tuple) -> Callable[[], torch.Tensor]:
    def call():
        with pipe._autocast():
            if stage == "generator":
                return pipe.generator(*args).float()
            if stage == "decoder":
                return pipe.decoder(*args).float()
            return pipe.latent.decode(*args).float()

    return call


# ----------------------------------------------------------------------------- the benchmark
def _parse_list(spec, allowed=None, kind="value") -> List[str]:
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if str(s).strip()]
    if allowed is not None:
        for s in items:
            if s not in allowed:
                raise InputError(f"--backend {s!r}: choose from {', '.join(allowed)}")
    if not items:
        raise InputError(f"empty {kind} list")
    return items


def parse_batch_sizes(spec) -> List[int]:
    try:
        sizes = [int(s) for s in _parse_list(spec, kind="batch size")]
    except ValueError:
        raise InputError(f"--batch-sizes {spec!r}: expected integers like 1,8,64") from None
    if any(b < 1 for b in sizes):
        raise InputError(f"--batch-sizes {spec!r}: batch sizes must be >= 1")
    return sizes


def run_bench(
    ckpt: Optional[Path] = None,
    preset: Optional[str] = None,
    backends: Sequence[str] = ("torch",),
    batch_sizes: Sequence[int] = (1, 8),
    steps: Optional[int] = None,
    decoder_steps: Optional[int] = None,
    warmup: int = 2,
    iters: int = 5,
    compile: bool = False,
    cuda_graphs: bool = False,
    device: str = "cpu",
    precision: str = "fp32",
    onnx_dir: Optional[Path] = None,
    trt_dir: Optional[Path] = None,
    stages: Sequence[str] = STAGES,
    seed: int = 0,
    threads: Optional[int] = None,
    log: Optional[Callable[[str], None]] = None,
    runtimes=None,
) -> dict:
    """Benchmark a run (``ckpt``) or a preset with random weights; returns a JSON-able report
    {"rows": [...], "notes": [...], ...}. See the module docstring for what is measured.
    ``threads``: torch (and ONNX Runtime) intra-op threads for the run (default: torch's).
    ``runtimes``: what builds the onnx / trt rows (``export.bench.RUNTIMES``; this package does
    not import ``export``): ``check(device)`` fails early, ``pipelines(...)`` returns the rows'
    pipelines. ``export.bench.run_bench`` passes it; without it only torch can be measured."""
    log = log or (lambda msg: None)
    backends = _parse_list(backends, BACKENDS)
    if runtimes is None and ("onnx" in backends or "trt" in backends):
        raise InputError("the onnx / trt rows need export.bench.run_bench (reptok.bench measures torch only)")
    batch_sizes = parse_batch_sizes(batch_sizes)
    if (ckpt is None) == (preset is None):
        raise InputError("pass exactly one of --ckpt RUN or --preset NAME")
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    for flag, n in (("--steps", steps), ("--decoder-steps", decoder_steps)):
        if n is not None and n < 1:
            raise InputError(f"{flag} {n}: must be >= 1")
    if warmup < 0 or iters < 1:
        raise InputError("--warmup must be >= 0 and --iters >= 1")
    if preset is not None and (onnx_dir or trt_dir):
        raise InputError("--engine needs --ckpt: a preset's random weights differ between processes")
    if threads is not None and threads < 1:
        raise InputError(f"--threads {threads}: must be >= 1")
    threads_before = torch.get_num_threads()
    if threads is not None:  # torch intra-op threads; ORT sessions take the same count
        torch.set_num_threads(int(threads))
    try:
        return _run_bench(ckpt, preset, backends, batch_sizes, steps, decoder_steps, warmup, iters, compile,
                          cuda_graphs, device, precision, onnx_dir, trt_dir, stages, seed, log, runtimes)
    finally:
        torch.set_num_threads(threads_before)


def _run_bench(ckpt, preset, backends, batch_sizes, steps, decoder_steps, warmup, iters, compile, cuda_graphs, device,
               precision, onnx_dir, trt_dir, stages, seed, log, runtimes) -> dict:
    from .pipeline import Pipeline
    from .presets import get_preset

    dev = torch.device(device)
    notes: List[str] = []
    if "trt" in backends:
        runtimes.check(str(dev))

    # The torch fp32 reference pipeline (also the torch eager backend when precision is fp32).
    if ckpt is not None:
        ref = Pipeline.from_run(Path(ckpt), str(dev), components=("decoder", "generator", "vae"))
        cfg = ref.cfg
        source = {"ckpt": str(Path(ckpt).absolute())}
    else:
        try:
            cfg = get_preset(preset)
        except KeyError as e:
            raise InputError(str(e.args[0])) from None
        ref = random_pipeline(cfg, seed).to(dev)
        source = {"preset": preset, "weights": "random"}
    if ref.generator is None:
        notes.append("the run has no generator: generator and end_to_end stages skipped")
    elif getattr(ref, "is_text", False):
        stages = [s for s in stages if s not in ("generator", "end_to_end")]
        notes.append("text-conditioned generator: generator and end_to_end stages skipped (class-conditional only)")
    e2e_steps = {"steps": cfg.sampling.steps if steps is None else steps,
                 "decoder_steps": cfg.sampling.decoder_steps if decoder_steps is None else decoder_steps}

    tmp = contextlib.ExitStack()
    pipelines: List[tuple] = []  # (label, pipeline, precision label, provider)
    try:
        if "torch" in backends:
            eager = copy.copy(ref).with_fast_path({"backend": "torch", "device": str(dev), "precision": precision,
                                                   "cuda_graphs": False, "compile": False}, PRECISIONS[precision])
            pipelines.append(("torch", eager, precision, "eager"))
            if compile:
                pipelines.append(("torch+compile", fast_variant(eager, compile=True), precision,
                                  "inductor (regional)"))
            if cuda_graphs:
                if dev.type != "cuda":
                    notes.append("--cuda-graphs skipped: CUDA graphs need --device cuda")
                else:
                    pipelines.append(("torch+cudagraphs", fast_variant(eager, cuda_graphs=True),
                                      precision, "cuda graphs"))
        elif compile or cuda_graphs:
            notes.append("--compile / --cuda-graphs apply to the torch backend, which is not selected")
        if "onnx" in backends or "trt" in backends:
            pipelines += runtimes.pipelines(ref, ckpt, backends, precision, onnx_dir, trt_dir, batch_sizes,
                                            dev, tmp, notes, log)

        rows = _measure(pipelines, ref, batch_sizes, stages, warmup, iters, e2e_steps, dev, notes, log)
    finally:
        tmp.close()
    _relative(rows)
    peak = _utilisation(rows, ref, e2e_steps, dev, notes)
    return {
        **source, "device": str(dev), "precision": precision, "batch_sizes": batch_sizes,
        "warmup": warmup, "iters": iters, "end_to_end_steps": e2e_steps, "threads": torch.get_num_threads(),
        "image_size": cfg.image_size, "peak": peak, "rows": rows, "notes": notes,
    }


def _stage_call(pipe, cfg, stage: str, batch: int, e2e_steps: dict, dev):
    """(fn, args or None, note) for one stage of one pipeline, or None when it does not apply."""
    if stage in ("generator", "end_to_end") and pipe.generator is None:
        return None
    if stage == "vae" and (cfg.vae.is_pixel or pipe.latent is None):
        return None  # pixel space: the decoder's output is the image
    if stage == "end_to_end":
        labels = torch.randint(0, max(cfg.generator.num_classes, 1), (batch,),
                               generator=torch.Generator().manual_seed(batch))
        kw = dict(e2e_steps)
        if getattr(pipe.generator, "null_class", None) is None:
            kw["guidance_scale"] = 1.0  # no null class: no CFG
        args, idx = pipe.sampler_args(**kw), list(range(batch))
        g_noise, d_noise = pipe.generator_noise(idx), pipe.decoder_noise(idx)
        fn = lambda: pipe.decode(pipe.generate(labels, g_noise, args), d_noise, args)  # noqa: E731
        return fn, None, f"{kw['steps']}+{kw['decoder_steps']} steps"
    args = stage_inputs(cfg, stage, batch, dev)
    return _stage_fn(pipe, stage, args), args, ""


def _measure(pipelines, ref, batch_sizes, stages, warmup, iters, e2e_steps, dev, notes, log) -> List[dict]:
    """Time every pipeline at each (batch, stage), **interleaved**: iteration i times each
    backend once in turn, so load from other processes (shared CPUs, a busy GPU) hits all
    backends alike and the ``vs_torch`` ratios stay meaningful. A backend that fails (e.g.
    inductor without a compiler) is dropped with a note; torch eager failing is an error."""
    cfg = ref.cfg
    alive = list(pipelines)
    rows = []
    for b in batch_sizes:
        for stage in stages:
            log(f"  {stage} at batch {b} ...")
            calls = []
            for label, pipe, prec, provider in list(alive):
                try:
                    made = _stage_call(pipe, cfg, stage, b, e2e_steps, dev)
                    if made is None:
                        continue
                    fn, args, note = made
                    row = {"backend": label, "provider": provider, "precision": prec, "stage": stage, "batch": b,
                           "latency_ms": None, "images_per_s": None, "max_abs_err": None, "note": note}
                    with torch.no_grad():
                        out = fn()  # first call: compiles / captures / allocates
                        if args is not None:
                            want = _stage_fn(ref, stage, args)()
                            row["max_abs_err"] = float((out.float() - want.float()).abs().max())
                        for _ in range(warmup):
                            fn()
                    calls.append((fn, row, []))
                except Exception as e:  # noqa: BLE001
                    if label == "torch":
                        raise
                    msg = f"{label} dropped at {stage} batch {b}: {type(e).__name__}: " + \
                        (str(e).splitlines()[0][:200] if str(e) else "")
                    notes.append(msg)
                    log(msg)
                    alive = [p for p in alive if p[0] != label]
            _sync(dev)
            with torch.no_grad():
                for _ in range(iters):
                    for fn, _row, times in calls:
                        t0 = time.perf_counter()
                        fn()
                        _sync(dev)
                        times.append(time.perf_counter() - t0)
            for _fn, row, times in calls:
                sec = statistics.median(times)
                row["latency_ms"] = round(sec * 1e3, 3)
                # The spread, so one noisy iteration (a shared CPU, a busy GPU) cannot pass for a speed-up.
                row["latency_min_ms"] = round(min(times) * 1e3, 3)
                row["latency_max_ms"] = round(max(times) * 1e3, 3)
                row["images_per_s"] = round(b / sec, 2)
                rows.append(row)
    order = {p[0]: i for i, p in enumerate(pipelines)}
    rows.sort(key=lambda r: (order[r["backend"]], r["batch"], STAGES.index(r["stage"])))
    return rows


def _relative(rows: List[dict]) -> None:
    """vs_torch: images/s relative to torch eager at the same stage and batch."""
    base = {(r["stage"], r["batch"]): r["images_per_s"] for r in rows if r["backend"] == "torch"}
    for r in rows:
        b = base.get((r["stage"], r["batch"]))
        r["vs_torch"] = round(r["images_per_s"] / b, 3) if b and r["images_per_s"] else None


def stage_gflops(pipe, e2e_steps: dict) -> Dict[str, float]:
    """GFLOPs per image of each stage (``reptok info``'s counts): one generator / decoder NFE, one
    VAE decode, and ``end_to_end`` = the NFEs of ``SamplerArgs.nfe`` (CFG doubles the guided ones)."""
    from .info import model_report

    per = {r["component"]: r["gflops"] for r in model_report(pipe.cfg, components=("decoder", "generator", "vae"))}
    out = {k: v for k, v in per.items()}
    if "generator" in per:
        n = pipe.sampler_args(**e2e_steps).nfe()
        out["end_to_end"] = (per["generator"] * (n["generator"] + n["generator_guided"])
                             + per["decoder"] * n["decoder"] + per.get("vae", 0.0))
    return out


def _utilisation(rows: List[dict], ref, e2e_steps: dict, dev, notes: List[str]) -> dict:
    """tflops (achieved) and mfu (None off the peak table) per row; returns the device's peaks."""
    from . import flops

    gf = stage_gflops(ref, e2e_steps)
    peaks = {}
    for r in rows:
        if r["precision"] not in peaks:
            peaks[r["precision"]] = flops.device_peak(dev, PRECISIONS.get(r["precision"]))
        name, peak = peaks[r["precision"]]
        r.update(flops.utilisation(r["images_per_s"], gf.get(r["stage"], 0.0), peak))
    if any(p is None for _, p in peaks.values()):
        notes.append(f"no MFU: {name} is not in the peak table (unknown device: no MFU, see reptok/flops.py)")
    return {prec: {"device": n, "peak_tflops": p[1] if p else None} for prec, (n, p) in peaks.items()}

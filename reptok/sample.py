"""Batch sampling to files: class specs, output kinds, sharding, torchrun splitting.

Global image index i (0 <= i < len(classes) * n) has label ``classes[i // n]`` and noise from
(seed, i) only, so ``--start/--count`` shards and torchrun ranks reproduce one big run exactly.
Text-to-image runs take prompts instead of classes: image i has prompt ``prompts[i // n]`` and its
"label" is the prompt index ``i // n``.

Output kinds, by OUT:
- ``*.npz``: ADM format, ``arr_0`` uint8 (N, H, W, 3), ``arr_1`` int64 labels (the standard
  evaluator's input; ``--class all -n 50`` on ImageNet is the 50K class-balanced protocol) or
  prompt indices, plus ``prompts`` (the prompt strings) for text runs;
- ``*.png``: one grid, a row per class (prompt);
- anything else: a folder of PNGs named ``{index:06d}_class{label:04d}.png`` (text runs:
  ``{index:06d}_prompt{p:04d}.png`` and a ``prompts.txt``, one prompt a line); existing files are
  kept and skipped, so a killed job resumes where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from . import io
from . import run as rundir
from .errors import InputError
from .outputs import check_sample_output
from .flow import host_to_device
from .backends import describe_fast_path
from .pipeline import SamplerArgs, pad_rows
from .images import make_grid, save_png, tensor_to_uint8, uint8_hwc
from .dist import DistInfo, barrier, gather_objects, shard_range


# ----------------------------------------------------------------------------- specs
def parse_classes(spec: str, num_classes: int) -> List[int]:
    """'88', '1,5,9', '0-9', 'all' -> class ids, each checked against ``num_classes``."""
    spec = str(spec).strip()
    if num_classes <= 0:
        if spec in ("", "all", "none"):
            return [-1]
        raise InputError(f"--class {spec}: this generator is unconditional; drop --class")
    if spec == "all":
        return list(range(num_classes))
    out: List[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise InputError(f"--class {spec!r}: expected an id, a list (1,5,9), a range (0-9) or 'all'") from None
    bad = [c for c in out if not 0 <= c < num_classes]
    if bad:
        raise InputError(f"--class {bad[0]} is outside the model's classes 0-{num_classes - 1}")
    return out


def png_name(index: int, label: int, kind: str = "class") -> str:
    return f"{index:06d}_{kind}{label:04d}.png" if label >= 0 else f"{index:06d}.png"


def read_prompts(prompts: Optional[Sequence[str]] = None, prompts_file: Optional[Path] = None) -> List[str]:
    """``--prompt`` values then the lines of ``--prompts FILE`` (blank lines skipped)."""
    out = [str(p) for p in (prompts or [])]
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise InputError(f"--prompts {path}: no such file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise InputError(f"--prompts {path}: not a UTF-8 text file (one prompt a line)") from None
        lines = [ln.strip() for ln in lines if ln.strip()]
        if not lines:
            raise InputError(f"--prompts {path}: the file has no prompts (one a line)")
        out.extend(lines)
    return out


def parse_cfg_interval(text: Optional[str]):
    """``--cfg-interval`` TEXT: 'none'/'all' -> None (guide every step), 'lo,hi' -> (lo, hi);
    range checks are the config layer's. (Not given: leave the run's interval.)"""
    if text.strip().lower() in ("none", "all"):
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--cfg-interval {text!r}: expected two numbers like 0.3,0.9") from None
    return (lo, hi)


@dataclass
class SampleJob:
    """What ``reptok sample`` will do, resolved and checked before any work: the conditions (class
    ids or prompts), the output and, for a PNG folder, its manifest."""

    ckpt: Path
    out: Path
    kind: str
    classes: Optional[List[int]]
    prompts: Optional[List[str]]
    n: int
    sampler: dict  # the SamplerArgs fields the options set (the run's defaults for the rest)
    manifest: Optional[dict] = None
    overwrite: bool = False

    def images(self, start: int = 0, count: Optional[int] = None) -> int:
        """How many images the shard [start, start + count) holds."""
        return count if count is not None else len(self.prompts or self.classes) * self.n - start

    def prepare_output(self, info: DistInfo = DistInfo()) -> None:
        """Set up a PNG folder (rank 0; the others wait so nobody lists PNGs of a folder that
        ``--overwrite`` is emptying). Outputs of other kinds are written whole at the end."""
        from .outputs import prepare_png_folder

        if self.manifest is None:
            return
        if info.is_main:
            prepare_png_folder(self.out, self.manifest, overwrite=self.overwrite)
        barrier()


def plan_sample_job(ckpt: Path, out: Path, *, classes: Optional[str] = None, prompts: Sequence[str] = (),
                    prompts_file: Optional[Path] = None, n: int = 1, seed: int = 0,
                    cfg: Optional[float] = None, cfg_interval: Optional[str] = None, steps: Optional[int] = None,
                    decoder_steps: Optional[int] = None, solver: Optional[str] = None, backend: str = "torch",
                    engine: Optional[Path] = None, precision: str = "fp32", overwrite: bool = False) -> SampleJob:
    """Check a sampling job against its run before any work (InputError: one line, exit 2):
    a generator run, --class for class runs / --prompt(s) for text runs, the output free (or a
    PNG folder whose manifest matches: then it resumes), and build its PNG-folder manifest."""
    from . import outputs

    kind = check_sample_output(out)
    doc = rundir.read_run_config(ckpt)
    gen_cfg = doc["config"].generator
    if doc["kind"] == "tokenizer" or gen_cfg is None:
        raise InputError(f"{ckpt}: a {doc['kind']} run has no generator; pass a generator run (reptok train gen)")
    prompt_list = None
    if gen_cfg.text_encoder is not None:
        if classes is not None:
            raise InputError(f"{ckpt}: a text-to-image run takes --prompt/--prompts, not --class")
        prompt_list = read_prompts(prompts, prompts_file)
        if not prompt_list:
            raise InputError(f"{ckpt}: a text-to-image run needs --prompt TEXT or --prompts FILE")
    elif prompts or prompts_file is not None:
        raise InputError(f"{ckpt}: not a text-to-image run (it takes --class); drop --prompt/--prompts")
    class_ids = None if prompt_list is not None else parse_classes(
        classes if classes is not None else ("0" if gen_cfg.num_classes > 0 else ""), gen_cfg.num_classes)
    given = dict(steps=steps, guidance_scale=cfg, solver=solver, decoder_steps=decoder_steps, decoder_solver=solver)
    sampler = {k: v for k, v in given.items() if v is not None}
    if cfg_interval is not None:
        sampler["cfg_interval"] = parse_cfg_interval(cfg_interval)
    job = SampleJob(Path(ckpt), Path(out), kind, class_ids, prompt_list, n, sampler, overwrite=overwrite)
    if kind == "folder":
        args = SamplerArgs.from_config(doc["config"].sampling, **sampler)
        job.manifest = outputs.sample_manifest(
            ckpt, seed=seed, cfg=args.guidance_scale,
            cfg_interval=None if args.cfg_interval is None else list(args.cfg_interval),
            steps=args.steps, solver=args.solver, decoder_steps=args.decoder_steps,
            decoder_solver=args.decoder_solver, backend=backend,
            engine=str(Path(engine).resolve()) if engine else None, precision=precision,
            classes=class_ids, prompts=prompt_list, n=n)
        outputs.prepare_png_folder(out, job.manifest, overwrite=overwrite, write=False)  # check only
    else:
        outputs.check_new_output(out, overwrite)
    return job


# ----------------------------------------------------------------------------- the job
class _Writer:
    """PNG encoding + atomic writes on a small thread pool, off the sampling loop's critical path.

    Each file is written atomically (``save_png``: temp file + rename), so an interrupted job
    leaves every file complete or absent. At most ``max_pending`` batches are in flight
    (backpressure: memory stays bounded when PIL is slower than the networks); a writer error is
    raised in the sampling loop at the next submit or at ``close``."""

    def __init__(self, workers: int = 2, max_pending: int = 4):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reptok-writer")
        self.pending: list = []
        self.max_pending = max_pending

    def submit(self, items) -> None:
        """items: [(path, uint8 HWC image)] of one batch."""
        self.pending.append(self.pool.submit(lambda: [save_png(p, im) for p, im in items]))
        while len(self.pending) > self.max_pending:
            self.pending.pop(0).result()
        for f in [f for f in self.pending if f.done()]:
            self.pending.remove(f)
            f.result()

    def close(self, raise_errors: bool = True) -> None:
        """Write every image already handed over (also when the job was interrupted: no sampled
        image is lost), then stop the threads. ``raise_errors=False`` on the error path, so a
        writer error cannot mask the exception in flight."""
        try:
            for f in self.pending:
                try:
                    f.result()
                except Exception:
                    if raise_errors:
                        raise
        finally:
            self.pool.shutdown(wait=True)


def _prefetch(pool, fn, *args, pin: bool = False):
    """``fn(*args)`` on the prefetch thread (noise for the next batches while the networks run);
    ``pin``: the result in pinned memory, so its copy to the GPU is asynchronous."""
    return pool.submit(lambda: fn(*args).pin_memory() if pin else fn(*args))


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``flow.host_to_device`` (no sync on CUDA); CPU tensors stay as they are."""
    return x if device.type != "cuda" else host_to_device(x, device)


def _fetch_uint8(images: torch.Tensor) -> Callable[[], np.ndarray]:
    """Start bringing decoded images (B,3,H,W) to the host as uint8 (B,H,W,3); returns the function
    that waits for them. On CUDA the conversion runs on the device and the copy goes into pinned
    memory behind an event, so the caller can queue the next batches before waiting; elsewhere
    it converts at once. Same bytes on every device (``images.uint8_hwc``)."""
    if images.device.type != "cuda":
        arr = tensor_to_uint8(images)
        return lambda: arr
    dev = uint8_hwc(images)
    host = torch.empty(dev.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(dev, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def wait() -> np.ndarray:
        done.synchronize()
        return host.numpy().copy()  # pageable copy: the pinned block goes back to the cache

    return wait


def default_batch_size(device) -> int:
    """``reptok sample``'s batch when none is given: 64 on CUDA (XL at batch 16 leaves most of a
    large GPU idle between kernels), 16 elsewhere (CPU rates barely grow with the batch)."""
    return 64 if torch.device(device).type == "cuda" else 16


def _warm_up(pipe, gen_batches, dec_batches, generate, decode, seed) -> float:
    """One generator and one decoder batch, untimed, when the fast path captures CUDA graphs or
    compiles (both happen on a network's first call per shape: minutes for --compile at XL, which
    the images/s must not include). Returns the seconds it took (0 on the eager path)."""
    fp = getattr(pipe, "fast_path", None) or {}
    if not gen_batches or not (fp.get("cuda_graphs") or fp.get("compile")):
        return 0.0
    t0 = time.perf_counter()
    z = generate(gen_batches[0], pipe.generator_noise(gen_batches[0], seed))
    idx = dec_batches[0][:1]
    decode(z[:1], pipe.decoder_noise(idx, seed), 1)()
    return time.perf_counter() - t0


def sample_to(
    pipe, classes: Optional[Sequence[int]], n: int, out: Path, *, seed: int = 0, start: int = 0,
    count: Optional[int] = None, batch_size: int = 16, gen_batch_size: Optional[int] = None,
    info: DistInfo = DistInfo(), progress: Optional[Callable[[int], None]] = None,
    prompts: Optional[Sequence[str]] = None, writers: int = 2, **sampler_kw,
) -> dict:
    """Sample images ``[start, start + count)`` of the job (classes x n, or prompts x n for a
    text-to-image run) and write them to ``out``. ``sampler_kw``: ``pipe.sampler_args``'s
    keywords (steps, guidance_scale, ...; checked before any work).

    ``batch_size`` is the decoder's batch (and the VAE's), ``gen_batch_size`` the generator's
    (default: the same); the generator's tokens are buffered between them (``_run_batches``). A
    last partial batch is padded to the full size and the padding discarded. Images depend on
    (seed, index) only, so shards run with the same batch sizes reproduce one run byte for byte
    (other batch sizes: within float rounding)."""
    out = Path(out)
    kind = check_sample_output(out)
    args = pipe.sampler_args(**sampler_kw)
    if batch_size < 1 or (gen_batch_size is not None and gen_batch_size < 1):
        raise InputError("--batch-size and --gen-batch-size must be >= 1")
    gen_batch_size = gen_batch_size or batch_size
    classes, prompts, total, count = _job_images(classes, n, start, count, prompts)
    name_kind = "prompt" if prompts is not None else "class"
    png_name_ = lambda i, label: png_name(i, label, name_kind)  # noqa: E731
    indices = list(range(start, start + count))
    mine = [indices[i] for i in shard_range(len(indices), info)]
    labels_of = lambda idx: [classes[i // n] for i in idx]  # noqa: E731
    # Capped at the job's size (a 1-image job is batch 1); see _batch_calls for the padding.
    batch_size, gen_batch_size = min(batch_size, total), min(gen_batch_size, total)
    todo = mine
    if kind == "folder":
        out.mkdir(parents=True, exist_ok=True)
        if prompts is not None and info.is_main:
            io.atomic_write_text(out / "prompts.txt", "".join(p.replace("\n", " ") + "\n" for p in prompts))
        todo = [i for i in mine if not (out / png_name_(i, labels_of([i])[0])).exists()]

    device = torch.device(getattr(pipe, "device", "cpu"))
    generate, decode = _batch_calls(pipe, args, labels_of, prompts, gen_batch_size, batch_size, device)
    gen_batches = [todo[b: b + gen_batch_size] for b in range(0, len(todo), gen_batch_size)]
    dec_batches = [todo[b: b + batch_size] for b in range(0, len(todo), batch_size)]
    warmup_s = _warm_up(pipe, gen_batches, dec_batches, generate, decode, seed)
    t0 = time.perf_counter()  # after the warm-up: captures and compilation are not in the rate
    arrays, writer = [], (_Writer(writers) if kind == "folder" else None)

    def hand_over(idx, imgs):
        if writer is not None:
            writer.submit([(out / png_name_(i, label), im) for i, label, im in zip(idx, labels_of(idx), imgs)])
        else:
            arrays.append(imgs)
        if progress is not None:
            progress(len(idx))

    finished = False
    try:
        _run_batches(pipe, gen_batches, dec_batches, generate, decode, hand_over, seed, device.type == "cuda")
        finished = True
    finally:
        if writer is not None:
            writer.close(raise_errors=finished)
    seconds = time.perf_counter() - t0
    if kind != "folder":
        written = _gather_to_file(out, kind, np.concatenate(arrays) if arrays else None, info,
                                  np.asarray(labels_of(indices), np.int64), prompts,
                                  ncol=n if len(classes) > 1 and count == total else 0)
    else:
        written = [str(out / png_name_(i, labels_of([i])[0])) for i in mine]
    # Under torchrun the summary covers every rank's work (the folder is complete once this returns).
    generated, skipped, files = len(todo), len(mine) - len(todo), len(written) if kind == "folder" else 1
    if info.enabled:
        parts = gather_objects((generated, skipped, files, seconds), info)
        generated, skipped = sum(p[0] for p in parts), sum(p[1] for p in parts)
        files = sum(p[2] for p in parts) if kind == "folder" else 1
        seconds = max(p[3] for p in parts)
    return {
        "out": str(out), "kind": kind, "images": len(indices), "generated": generated,
        "skipped_existing": skipped, "files": files, "seconds": round(seconds, 3), "warmup_s": round(warmup_s, 3),
        "images_per_s": round(generated / seconds, 3) if seconds > 0 and generated else None,
        "seed": seed, "start": start, "count": count, "batch_size": batch_size, "gen_batch_size": gen_batch_size,
        "nfe": args.nfe(), "fast_path": describe_fast_path(getattr(pipe, "fast_path", None)),
    }


def _job_images(classes, n: int, start: int, count: Optional[int], prompts):
    """-> (per-condition ids, prompts as strings or None, the job's image count, the shard's
    count), checked: a text job's conditions are its prompts' rows; the shard lies in the job."""
    if prompts is not None:
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise InputError("no prompts: pass --prompt TEXT or --prompts FILE")
        classes = list(range(len(prompts)))
    total = len(classes) * n
    count = total - start if count is None else count
    if start < 0 or count < 0 or start + count > total:
        raise InputError(f"--start {start} --count {count}: outside the job's {total} images")
    if total == 0:
        raise InputError("nothing to sample: the job has no images")
    return classes, prompts, total, count


def _batch_calls(pipe, args, labels_of, prompts, gen_batch_size: int, batch_size: int, device):
    """(generate(idx, noise) -> tokens, decode(tokens, noise, k) -> wait for uint8 images).

    Every network call sees exactly its stage's batch size (a partial batch is padded, the
    padding dropped): row results then do not depend on where a shard starts, so shards equal one
    run byte for byte (float kernels give last-bit differences between batch sizes), and CUDA
    graphs capture one shape."""

    def generate(idx, noise):
        """Tokens (len(idx), D) of generator batch ``idx`` (on the pipeline's device)."""
        b = gen_batch_size
        lab = labels_of(idx)
        noise = pad_rows(_to_device(noise, device), b)
        if prompts is not None:
            return pipe.generate(pad_rows([prompts[c] for c in lab], b), noise, args)[: len(idx)]
        labels = _to_device(pad_rows(torch.tensor(lab).clamp(min=0), b), device)
        return pipe.generate(labels, noise, args)[: len(idx)]

    def decode(tokens, noise, k):
        """Queue decoder batch -> the function that waits for its uint8 images (k, H, W, 3)."""
        b = batch_size
        return _fetch_uint8(pipe.decode(pad_rows(tokens, b), pad_rows(_to_device(noise, device), b), args)[:k])

    return generate, decode


def _run_batches(pipe, gen_batches, dec_batches, generate, decode, hand_over, seed: int, cuda: bool) -> None:
    """The batch-in-flight scheduler: generator batches buffered up to each decoder batch, noise
    of the next batches drawn on a prefetch thread, and one decoder batch in flight: batch d is
    queued (with the generator batches it needs) before batch d-1's images are waited for, so on
    CUDA the GPU always has the next batch's work queued while the host converts, writes and
    prepares (CPU: the same order, same bytes). ``hand_over(indices, uint8 images)`` receives
    every finished batch, in order, also the one already decoded when a later batch fails."""
    from concurrent.futures import ThreadPoolExecutor

    prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reptok-noise")
    in_flight = None  # (indices, wait) of the decoded batch whose images are still on the way
    finished = False
    try:
        gen_noise = [_prefetch(prefetcher, pipe.generator_noise, idx, seed, pin=cuda) for idx in gen_batches[:2]]
        dec_noise = [_prefetch(prefetcher, pipe.decoder_noise, idx, seed, pin=cuda) for idx in dec_batches[:2]]
        tokens = torch.zeros(0)
        g = 0  # next generator batch
        for d, idx in enumerate(dec_batches):
            while len(tokens) < len(idx):  # buffer the generator's tokens up to this decoder batch
                z = generate(gen_batches[g], gen_noise[g].result())
                gen_noise[g] = None
                if g + 2 < len(gen_batches):
                    gen_noise.append(_prefetch(prefetcher, pipe.generator_noise, gen_batches[g + 2], seed, pin=cuda))
                tokens = z if len(tokens) == 0 else torch.cat([tokens, z.to(tokens.device)])
                g += 1
            tok, tokens = tokens[: len(idx)], tokens[len(idx):]
            wait = decode(tok, dec_noise[d].result(), len(idx))
            dec_noise[d] = None
            if d + 2 < len(dec_batches):
                dec_noise.append(_prefetch(prefetcher, pipe.decoder_noise, dec_batches[d + 2], seed, pin=cuda))
            if in_flight is not None:
                prev, in_flight = in_flight, None
                hand_over(prev[0], prev[1]())
            in_flight = (idx, wait)
        if in_flight is not None:
            prev, in_flight = in_flight, None
            hand_over(prev[0], prev[1]())
        finished = True
    finally:
        prefetcher.shutdown(wait=True, cancel_futures=True)
        # Interrupted (or a later batch failed): the batch already decoded is still handed over,
        # so no finished image is lost; if even that fails, its files stay absent (a rerun makes
        # them). Every batch handed over is written completely by the writer's close.
        if not finished and in_flight is not None:
            try:
                hand_over(in_flight[0], in_flight[1]())
            except Exception:
                pass


def _gather_to_file(out: Path, kind: str, local: Optional[np.ndarray], info: DistInfo, labels: np.ndarray,
                    prompts: Optional[Sequence[str]], ncol: int) -> List[str]:
    """Write an npz (ADM layout: arr_0 images, arr_1 labels, prompts for text runs) or a grid
    PNG from this rank's images; under torchrun every rank's part is gathered through ``.npy``
    files next to ``out`` and rank 0 writes. Returns the files written."""
    written: List[str] = []
    if info.enabled:
        tmp = Path(f"{out}.rank{info.rank}.npy")
        io.atomic_save(tmp, lambda p: np.save(open(p, "wb"), local if local is not None
                                                  else np.zeros((0, 1, 1, 3), np.uint8)))
        barrier()
        if info.is_main:
            parts = [np.load(Path(f"{out}.rank{r}.npy")) for r in range(info.world_size)]
            local = np.concatenate([p for p in parts if len(p)])
            for r in range(info.world_size):
                Path(f"{out}.rank{r}.npy").unlink(missing_ok=True)
    if info.is_main:
        if kind == "npz":
            extra = {"prompts": np.asarray(prompts, dtype=str)} if prompts is not None else {}
            io.atomic_save(out, lambda p: np.savez(open(p, "wb"), arr_0=local, arr_1=labels, **extra))
        else:
            save_png(out, make_grid(list(local), ncol=ncol))
        written = [str(out)]
    barrier()
    return written

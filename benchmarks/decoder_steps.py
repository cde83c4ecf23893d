"""Fewer decoder steps as a knob: quality and speed vs decoder NFE on a trained run.

    OMP_NUM_THREADS=1 python benchmarks/decoder_steps.py                       # the quickstart at /work/qs
    OMP_NUM_THREADS=1 python benchmarks/decoder_steps.py --quickstart qs --recon 256 --per-class 20

For each decoder setting (default: Euler 10 / 25 / 50, Heun 5 / 10 / 25; Heun costs 2 NFE a
step) it prints:

- held-out reconstruction PSNR (``--recon`` builtin:shapes images never seen in training,
  image -> token -> decoder, via ``Pipeline.reconstruct``) and the decoder's images/s there;
- the builtin judge's class and shape accuracy of generated samples (``--per-class`` per class;
  the generator's tokens are sampled once with the run's settings and shared by every row, so
  rows differ only in the decoder) and the decoder's images/s on them.

images/s are decoder + output only (the generator's cost is the same in every row, printed
once). The run is read-only; nothing is written.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from reptok.pipeline import Pipeline
from reptok.shapes.render import make_shapes
from reptok.shapes.judge import load_judge, shape_accuracy
from reptok.evaluate.metrics import psnr
from reptok.images import tensor_to_uint8


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quickstart", default="/work/qs")
    ap.add_argument("--settings", default="euler:10,euler:25,euler:50,heun:5,heun:10,heun:25")
    ap.add_argument("--recon", type=int, default=192, help="held-out images to reconstruct")
    ap.add_argument("--per-class", type=int, default=16, help="generated samples per class")
    ap.add_argument("--batch-size", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    qs = Path(args.quickstart)
    settings = [(s.split(":")[0], int(s.split(":")[1])) for s in args.settings.split(",")]
    judge = load_judge(args.device)

    tok = Pipeline.from_run(qs / "tokenizer", args.device, components=("encoder", "decoder", "vae"), fast=True)
    gen = Pipeline.from_run(qs / "generator", args.device, fast=True)
    held = make_shapes(args.recon, tok.cfg.image_size, seed=args.seed + 10_000)  # quickstart's held-out seed
    images = torch.from_numpy(held["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    tokens_rec = torch.cat([tok.encode(images[i:i + args.batch_size]) for i in range(0, len(images), args.batch_size)])

    k = gen.num_classes
    labels = torch.arange(k).repeat_interleave(args.per_class)
    idx = list(range(len(labels)))
    z, gsec = _timed(lambda: torch.cat([
        gen.generate(labels[i:i + args.batch_size], gen.generator_noise(idx[i:i + args.batch_size], args.seed + 1))
        for i in range(0, len(idx), args.batch_size)]))
    gnfe = gen.sampler_args().nfe()
    print(f"run {qs}: {len(images)} held-out reconstructions, {len(idx)} samples ({args.per_class} x {k} classes); "
          f"generator {gnfe['generator']} NFE ({gen.cfg.sampling.solver}, cfg {gen.cfg.sampling.cfg}): "
          f"{len(idx) / gsec:.1f} tokens/s; threads {torch.get_num_threads()}; fast path {gen.fast_path['precision']}")

    def decode_all(pipe, tokens, indices, seed, solver, steps):
        out = []
        for i in range(0, len(tokens), args.batch_size):
            sl = slice(i, i + args.batch_size)
            out.append(tensor_to_uint8(pipe.decode(tokens[sl], pipe.decoder_noise(indices[sl], seed),
                                                   pipe.sampler_args(decoder_steps=steps, decoder_solver=solver))))
        return np.concatenate(out)

    print("\n| decoder | NFE | recon PSNR dB | recon img/s | sample class acc | sample shape acc | sample img/s |")
    print("|---|---|---|---|---|---|---|")
    for solver, steps in settings:
        nfe = steps * (2 if solver == "heun" else 1)
        rec, rsec = _timed(lambda: decode_all(tok, tokens_rec, list(range(len(images))), args.seed, solver, steps))
        psnr_db = float(psnr(held["images"], rec).mean())
        smp, ssec = _timed(lambda: decode_all(gen, z, idx, args.seed + 1, solver, steps))
        pred = judge.predict(smp).cpu().numpy()
        acc = float((pred == labels.numpy()).mean())
        print(f"| {solver} {steps} | {nfe} | {psnr_db:.2f} | {len(images) / rsec:.1f} | {acc:.3f} | "
              f"{shape_accuracy(pred, labels.numpy()):.3f} | {len(idx) / ssec:.1f} |", flush=True)


if __name__ == "__main__":
    main()

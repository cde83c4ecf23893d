"""Few-step decoder on the quickstart's models (CPU, small preset): which K to pick?

Distils the quickstart's tokenizer (``reptok train distill``'s function, piecewise reflow on the
student's K-step grid, against the teacher's ``--teacher-steps`` trajectory) into one student per K
(default 4, 2, 1; each student is written to a temp dir, the quickstart stays read-only), then
reports for the teacher at 50 / 25 / 8 / 4 Euler steps and for every student at 4 / 2 / 1 steps:

- held-out reconstruction PSNR (``--eval-images`` shapes never seen in training, one token each);
- ``vs T50``: PSNR of the decoded images against the teacher's 50-step decode of the same token and
  noise (how faithfully the few-step decoder reproduces the teacher);
- class accuracy of generated samples: the quickstart generator's tokens (its sampling defaults:
  CFG, interval, steps; the same tokens for every row) decoded by the row's decoder, judged by the
  builtin classifier;
- decoder images/s (batch of all the evaluation images, this process's threads).

    python benchmarks/distill_shapes.py --quickstart /work/qs [--ks 4,2,1] [--steps 200] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from reptok.pipeline import Pipeline
from reptok.shapes.render import make_shapes
from reptok.shapes.judge import load_judge
from reptok.evaluate.metrics import psnr as psnr_db
from reptok.images import tensor_to_uint8
from reptok.pipeline import STREAM_DECODER, STREAM_GENERATOR, index_noise
from reptok.train.distill import distill_config, distill_defaults, train_distill


def decode_timed(pipe, tokens: torch.Tensor, noise: torch.Tensor, steps: int):
    t = time.perf_counter()
    imgs = pipe.decode(tokens, noise, pipe.sampler_args(decoder_steps=steps))
    return imgs, len(tokens) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quickstart", default="/work/qs")
    ap.add_argument("--out", default=None, help="Where the students go (default: a temp dir).")
    ap.add_argument("--ks", default="4,2,1", help="One student per K.")
    ap.add_argument("--teacher-steps", type=int, default=50)
    ap.add_argument("--teacher-rows", default="50,25,8,4,2,1")
    ap.add_argument("--method", default="reflow")
    ap.add_argument("--steps", type=int, default=200, help="Distillation steps per student.")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="Default: train distill's (the teacher's lr).")
    ap.add_argument("--ema", type=float, default=None, help="Default: train distill's (0.99).")
    ap.add_argument("--eval-images", type=int, default=256)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    qs = Path(args.quickstart)
    out = Path(args.out or tempfile.mkdtemp(prefix="distill_shapes_"))
    ks = [int(k) for k in args.ks.split(",")]

    # ------------------------------------------------------------------ students
    students, train_rows = {}, []
    for k in ks:
        over = {**distill_defaults(qs / "tokenizer"), "train.steps": args.steps, "train.batch_size": args.batch_size,
                "train.log_every": 10, "train.ckpt_every": args.steps}
        for key, value in (("train.lr", args.lr), ("train.ema", args.ema)):
            if value is not None:
                over[key] = value
        cfg = distill_config(qs / "tokenizer", k, over)
        t = time.perf_counter()
        s = train_distill(qs / "tokenizer", out / f"student{k}", cfg, student_steps=k,
                          teacher_steps=args.teacher_steps, method=args.method, progress=False)
        train_rows.append((k, s["last_loss"], s["images_per_s"], time.perf_counter() - t))
        students[k] = Pipeline.from_run(out / f"student{k}", components=("encoder", "decoder", "vae"))
        print(f"student K={k}: {args.steps} steps x {args.batch_size}, lr {cfg.train.lr:g}, EMA {cfg.train.ema:g}, loss {s['last_loss']:.5f}, "
              f"{s['images_per_s']:.1f} img/s, {time.perf_counter() - t:.0f} s", flush=True)

    # ------------------------------------------------------------------ evaluation inputs
    teacher = Pipeline.from_run(qs / "tokenizer", components=("encoder", "decoder", "vae"))
    gen = Pipeline.from_run(qs / "generator", components=("generator",))
    judge = load_judge()
    n = args.eval_images
    held = make_shapes(n, teacher.cfg.image_size, seed=123_457)
    x = torch.from_numpy(held["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    z_rec = teacher.encode(x)
    noise_rec = index_noise(args.seed, range(n), teacher.latent_shape, STREAM_DECODER)
    k_cls = gen.num_classes
    labels = torch.arange(k_cls).repeat_interleave(args.per_class)
    g = gen.cfg.generator
    z_gen = gen.generate(labels, index_noise(args.seed, range(len(labels)), (g.n_tokens, g.token_dim), STREAM_GENERATOR))
    noise_gen = index_noise(args.seed, range(len(labels)), teacher.latent_shape, STREAM_DECODER)
    ref, _ = decode_timed(teacher, z_rec, noise_rec, 50)
    ref_u8 = tensor_to_uint8(ref)

    rows = [("teacher", s, teacher) for s in (int(v) for v in args.teacher_rows.split(","))]
    rows += [(f"student K={k}", s, students[k]) for k in ks for s in sorted({4, 2, 1, k}, reverse=True)]
    print(f"\n{n} held-out images, {len(labels)} generated ({args.per_class} per class; generator "
          f"{gen.cfg.sampling.steps} steps, CFG {gen.cfg.sampling.cfg}), teacher trajectory {args.teacher_steps} steps, "
          f"method {args.method}, {torch.get_num_threads()} threads")
    print(f"| {'decoder':<13} | {'steps':>5} | {'PSNR dB':>7} | {'vs T50 dB':>9} | {'class acc':>9} | {'images/s':>8} |")
    print(f"|{'-' * 15}|{'-' * 7}|{'-' * 9}|{'-' * 11}|{'-' * 11}|{'-' * 10}|")
    for name, steps, pipe in rows:
        rec, rate = decode_timed(pipe, z_rec, noise_rec, steps)
        rec_u8 = tensor_to_uint8(rec)
        psnr = float(psnr_db(held["images"], rec_u8).mean())
        vs_ref = float(psnr_db(ref_u8, rec_u8).mean())
        imgs, _ = decode_timed(pipe, z_gen, noise_gen, steps)
        acc = float((judge.predict(imgs) == labels).float().mean())
        print(f"| {name:<13} | {steps:>5} | {psnr:>7.2f} | {vs_ref:>9.2f} | {acc:>9.3f} | {rate:>8.1f} |", flush=True)
    print(f"\nstudents in {out}")


if __name__ == "__main__":
    main()

"""Stage (b) on the quickstart models: does CFG help, and where does sampling time go?

Reads a quickstart output folder (run ``reptok quickstart`` first), samples ``--per-class``
images per class with CFG 1.0 and 1.5 (and any other scales given), judges their class with the
builtin classifier, and times the generator (tokens/s) and the decoder (images/s) separately.

    python benchmarks/gen_shapes.py --quickstart quickstart_out [--per-class 40] [--cfg 1.0,1.5,3.0] [--cfg-interval 0.3,0.9]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from reptok.pipeline import Pipeline
from reptok.shapes.render import COLOURS, SHAPES
from reptok.shapes.judge import load_judge, shape_accuracy
from reptok.pipeline import STREAM_DECODER, STREAM_GENERATOR, index_noise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quickstart", default="quickstart_out")
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--cfg", default="1.0,1.5,3.0")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cfg-interval", default=None, help="t_begin,t_end (default: the run's sampling config)")
    args = ap.parse_args()
    pipe = Pipeline.from_run(Path(args.quickstart) / "generator")
    judge = load_judge()
    k = pipe.num_classes
    labels = torch.arange(k).repeat_interleave(args.per_class)
    idx = list(range(len(labels)))
    g = pipe.cfg.generator
    noise_g = index_noise(args.seed, idx, (g.n_tokens, g.token_dim), STREAM_GENERATOR)
    noise_d = index_noise(args.seed, idx, pipe.latent_shape, STREAM_DECODER)
    given = {"cfg_interval": tuple(float(v) for v in args.cfg_interval.split(","))} if args.cfg_interval else {}
    shown = pipe.sampler_args(**given).cfg_interval
    print(f"{len(labels)} samples ({args.per_class} per class, {k} classes), generator {pipe.cfg.sampling.steps} "
          f"steps, decoder {pipe.cfg.sampling.decoder_steps} steps, CFG interval {shown}, "
          f"{torch.get_num_threads()} threads")
    shape_cols = " ".join(f"{name:>7}" for name in SHAPES)
    print(f"{'cfg':>5} {'class acc':>10} {shape_cols} {'gen tokens/s':>13} {'dec images/s':>13}")
    for scale in (float(s) for s in args.cfg.split(",")):
        t = time.perf_counter()
        z = pipe.generate(labels, noise_g, pipe.sampler_args(guidance_scale=scale, **given))
        t_gen = time.perf_counter() - t
        t = time.perf_counter()
        imgs = pipe.decode(z, noise_d)
        t_dec = time.perf_counter() - t
        pred = judge.predict(imgs)
        acc = float((pred == labels).float().mean())
        shape_of = labels // len(COLOURS)  # per shape: right shape, whatever the colour
        per_shape = " ".join(f"{shape_accuracy(pred[shape_of == i], labels[shape_of == i]):>7.2f}"
                             for i in range(len(SHAPES)))
        print(f"{scale:>5g} {acc:>10.3f} {per_shape} {len(labels) / t_gen:>13.1f} {len(labels) / t_dec:>13.1f}",
              flush=True)


if __name__ == "__main__":
    main()

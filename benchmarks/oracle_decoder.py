"""Upper bound for the CPU quickstart: how class-correct can the flow decoder get when its token
is an *oracle* (class one-hot + position, size, angle) instead of the encoder's [cls] token?

Trains ``FlowDecoder`` (a preset's decoder, any resolution) on builtin:shapes with the same flow
loss, EMA and Euler sampler as ``reptok train recon``, then judges 96 held-out samples with the
builtin classifier. If this number is low, the decoder (not the token) limits the quickstart.

    python benchmarks/oracle_decoder.py [--oracle full|class] [--resolution 16] [--steps 3000]
        [--batch-size 128] [--set decoder.width=192 ...]

Defaults are the quickstart's stage (a) budget (3000 steps x 128 at the small preset's 16 px).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from reptok import flow
from reptok.shapes.render import render_shape
from reptok.shapes.judge import load_judge
from reptok.models.decoder import FlowDecoder
from reptok.pipeline import STREAM_DECODER, index_noise
from reptok.presets import get_preset


def oracle_set(n: int, res: int, seed: int, dim: int, what: str = "full"):
    imgs, toks = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        img, _, a = render_shape(rng, i % 12, res)
        t = np.zeros(dim, np.float32)
        t[i % 12] = 3.0
        if what == "full":  # "class": the class alone, the decoder must invent the geometry
            t[12:17] = [a["cx"] / (res / 2) - 1, a["cy"] / (res / 2) - 1, a["radius"] / (res / 4),
                        np.cos(a["angle"]), np.sin(a["angle"])]
        imgs.append(img)
        toks.append(t)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.from_numpy(np.stack(toks)), torch.arange(n) % 12


@torch.no_grad()
def decode(ema, xt, zt, r, cfg, solver="euler", steps=None):
    ema.eval()
    noise = index_noise(0, list(range(len(xt))), (3, r, r), STREAM_DECODER)
    return flow.solve(lambda a, t: ema(a, t, zt), noise, steps or cfg.sampling.decoder_steps, solver)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--resolution", type=int, default=None, help="default: the preset's image size")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--eval-every", type=int, default=0, help="also judge the EMA decoder every N steps")
    ap.add_argument("--oracle", choices=("full", "class"), default="full",
                    help="full: class + position, size, angle; class: the class one-hot only")
    ap.add_argument("--warmup", type=int, default=0, help="linear learning-rate warm-up steps")
    ap.add_argument("--time-loc", type=float, default=0.0, help="logit-normal time location (> 0: towards data)")
    ap.add_argument("--samplers", default="euler:25", help="comma list of SOLVER:STEPS to judge at the end")
    ap.add_argument("--grid", default=None, help="save the final samples as a PNG grid here")
    ap.add_argument("--set", action="append", default=[], help="decoder override KEY=VALUE (JSON value)")
    args = ap.parse_args()
    over = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    r = args.resolution or get_preset(args.preset).image_size
    cfg = get_preset(args.preset).replace(**{"image_size": r, "decoder.input_size": r, **over})
    x, z, _ = oracle_set(args.images, r, 0, cfg.decoder.token_dim, args.oracle)
    xt, zt, yt = oracle_set(96, r, 99, cfg.decoder.token_dim, args.oracle)
    judge = load_judge()
    torch.manual_seed(0)
    dec = FlowDecoder(cfg.decoder)
    ema = FlowDecoder(cfg.decoder)
    ema.load_state_dict(dec.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(dec.parameters(), args.lr)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (args.batch_size,), generator=g)
        noise = torch.randn(args.batch_size, 3, r, r, generator=g)
        loss = flow.flow_matching_loss(lambda a, t: dec(a, t, z[idx]), x[idx], noise,
                                       flow.sample_time(args.batch_size, generator=g, loc=args.time_loc)).mean()
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / max(args.warmup, 1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), dec.parameters()):
                e.lerp_(p, 1 - cfg.train.ema)
        if step % 200 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - t0:6.1f} s", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            print(f"step {step + 1:5d}  judge accuracy {judge.accuracy(decode(ema, xt, zt, r, cfg), yt):.3f}", flush=True)
    for spec in args.samplers.split(",")[1:]:
        solver, steps = spec.split(":")
        acc = judge.accuracy(decode(ema, xt, zt, r, cfg, solver, int(steps)), yt)
        print(f"sampler {solver} x {steps}: judge accuracy {acc:.3f}")
    solver, steps = args.samplers.split(",")[0].split(":")
    out = decode(ema, xt, zt, r, cfg, solver, int(steps))
    acc = judge.accuracy(out, yt)
    if args.grid:
        from reptok.images import make_grid, save_png, tensor_to_uint8

        save_png(args.grid, make_grid(list(tensor_to_uint8(out[:48])), ncol=12))
    print(f"oracle-token decoder ({args.preset}, {r}px, {args.steps} steps x {args.batch_size}): "
          f"judge accuracy {acc:.3f} on {len(xt)} samples")


if __name__ == "__main__":
    main()

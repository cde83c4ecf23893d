"""Per preset and component: parameters, GFLOPs per forward, CPU forward latency at batch 1 and 8.

    python benchmarks/models.py                      # tiny, small (latency) + paper sizes (counts)
    python benchmarks/models.py --latency-presets tiny,small,base --iters 3

GFLOPs are per network call per image (decoder: one ODE step; generator: one NFE).
Latency: median of --iters timed calls after one warm-up, torch eager fp32, this machine's threads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from reptok.info import model_report
from reptok.pipeline import Pipeline
from reptok.presets import get_preset, list_presets


def latency_ms(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


@torch.no_grad()
def component_latency(preset: str, batch: int, iters: int) -> dict:
    cfg = get_preset(preset)
    cfg.encoder.weights = "random"
    comps = ("encoder", "decoder", "generator") + (() if cfg.vae.is_pixel else ())
    pipe = Pipeline.build(cfg, components=comps).eval()
    img = torch.rand(batch, 3, cfg.image_size, cfg.image_size) * 2 - 1
    d = cfg.decoder
    x = torch.randn(batch, d.in_channels, d.input_size, d.input_size)
    t = torch.rand(batch)
    z = torch.randn(batch, d.token_dim)
    g = cfg.generator
    xg = torch.randn(batch, g.n_tokens, g.token_dim)
    y = torch.zeros(batch, dtype=torch.long)
    return {
        "encoder": latency_ms(lambda: pipe.encoder(img), iters),
        "decoder": latency_ms(lambda: pipe.decoder(x, t, z), iters),
        "generator": latency_ms(lambda: pipe.generator(xg, t, y), iters),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default=",".join(list_presets()))
    ap.add_argument("--latency-presets", default="tiny,small")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    lat_presets = set(filter(None, args.latency_presets.split(",")))
    header = f"{'preset':8} {'component':10} {'params':>14} {'GFLOPs':>10} {'ms @1':>9} {'ms @8':>9}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(header)
    print("-" * len(header))
    for preset in args.presets.split(","):
        rows = model_report(get_preset(preset))
        lat = {b: component_latency(preset, b, args.iters) for b in (1, 8)} if preset in lat_presets else {}
        for r in rows:
            c = r["component"]
            l1 = f"{lat[1][c]:9.2f}" if lat and c in lat[1] else f"{'-':>9}"
            l8 = f"{lat[8][c]:9.2f}" if lat and c in lat[8] else f"{'-':>9}"
            print(f"{preset:8} {c:10} {r['params']:>14,} {r['gflops']:>10.3f} {l1} {l8}")


if __name__ == "__main__":
    main()

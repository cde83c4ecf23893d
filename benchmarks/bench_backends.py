#!/usr/bin/env python
"""Backend comparison: torch eager (/ compile / CUDA graphs) vs ONNX Runtime vs TensorRT.

Thin wrapper over ``export.bench.run_bench`` (the logic behind ``reptok bench``)::

    python benchmarks/bench_backends.py --preset small --backend torch,onnx --batch-sizes 1,8
    python benchmarks/bench_backends.py --ckpt runs/gen --backend torch,onnx,trt --precision bf16 \
        --batch-sizes 1,8,64 --compile --out results.json
    python benchmarks/bench_backends.py --summarize out/bench_*.json     # one table from reports

``--summarize`` prints a markdown table of images/s per backend and batch for every stage, with
the throughput relative to torch eager and the max abs error against torch fp32 (e.g. the
reports written by ``benchmarks/gpu_check.sh``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def summarize(paths) -> str:
    """Markdown: one row per (report, backend, precision, stage, batch)."""
    lines = ["| report | backend | provider | prec | stage | batch | ms | img/s | vs torch eager | max abs err |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    notes = []
    for p in paths:
        doc = json.loads(Path(p).read_text())
        notes += [f"- {Path(p).stem}: {n}" for n in doc.get("notes", [])]
        for r in doc["rows"]:
            err = f"{r['max_abs_err']:.2e}" if r.get("max_abs_err") is not None else ""
            vs = f"{r['vs_torch']:.2f}x" if r.get("vs_torch") else ""
            lines.append(f"| {Path(p).stem} | {r['backend']} | {r['provider']} | {r['precision']} | {r['stage']} | "
                         f"{r['batch']} | {r['latency_ms']:.2f} | {r['images_per_s']:.1f} | {vs} | {err} |")
    if notes:
        lines += ["", "Notes:"] + notes
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--summarize", nargs="+", metavar="REPORT.json", help="Print one table from bench reports.")
    ap.add_argument("--ckpt")
    ap.add_argument("--preset")
    ap.add_argument("--backend", default="torch,onnx")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--steps", type=int, help="Generator steps (default: the run's).")
    ap.add_argument("--decoder-steps", type=int, help="Decoder steps (default: the run's).")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--cuda-graphs", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--out", help="Also write the JSON report here.")
    args = ap.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0

    from export.bench import run_bench
    from reptok_cli.bench import print_table
    from reptok_cli.common import parse_device

    report = run_bench(ckpt=args.ckpt, preset=args.preset or (None if args.ckpt else "small"), backends=args.backend,
                       batch_sizes=args.batch_sizes, steps=args.steps,
                       decoder_steps=args.decoder_steps, warmup=args.warmup, iters=args.iters,
                       compile=args.compile, cuda_graphs=args.cuda_graphs, device=parse_device(args.device),
                       precision=args.precision, log=lambda m: print(m, file=sys.stderr))
    print_table(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

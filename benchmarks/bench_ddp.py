"""Training throughput (images/s) with 1 vs N ranks under torchrun (DDP), stage (a) and (b).

Every run is ``python -m torch.distributed.run --nproc-per-node N -m reptok_cli train ...`` with
the same *global* batch, so the runs do the same work per step; the table reports the run's own
``--json`` summary (all steps, including the first) and a steady-state rate that leaves out
step 1 (computed from metrics.jsonl, logged every step).

On CPU each rank gets ``cores // N`` threads (``OMP_NUM_THREADS``), so 1 rank and N ranks use the
same cores: the numbers are CPU-bound and show DDP's overhead (gloo all-reduce, duplicated
start-up), not a speed-up you would get from more hardware. On GPUs the same script runs
unchanged with NCCL, one GPU per rank:

    python benchmarks/bench_ddp.py                                  # CPU: small preset, 1 vs 2 ranks
    python benchmarks/bench_ddp.py --device cuda --nproc 1,2,4,8 --batch-size 256 --steps 30
    python benchmarks/bench_ddp.py --device cuda --preset base --data data/in1k --stages recon
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list, threads: int) -> tuple:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "reptok_cli",
           *[str(a) for a in args]]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{res.stdout}\n{res.stderr[-4000:]}")
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1, f"expected one JSON summary (rank 0 only), got {len(lines)}"
    return lines[0], wall


def steady_rate(run: Path, batch: int) -> float:
    """Images/s over steps 2..N: metrics hold the cumulative rate k*B/T_k at every step k."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    t = {r["step"]: r["step"] * batch / r["images_per_s"] for r in rows if r.get("images_per_s")}
    last = max(t)
    if last < 2 or 1 not in t:
        return float("nan")
    return (last - 1) * batch / max(t[last] - t[1], 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--stages", default="recon,gen", help="recon, gen or both")
    ap.add_argument("--nproc", default="1,2", help="rank counts to compare, e.g. 1,2,4,8")
    ap.add_argument("--device", default="cpu", help="cpu (gloo) | cuda (NCCL, one GPU per rank)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64, help="global batch (recon)")
    ap.add_argument("--gen-batch-size", type=int, default=256, help="global batch (gen)")
    ap.add_argument("--gen-steps", type=int, default=20)
    ap.add_argument("--data", type=Path, help="a prepared dataset (default: builtin:shapes, 512 images)")
    ap.add_argument("--threads", type=int, help="threads per rank on CPU (default: cores // ranks)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell; the best is kept (shared machines)")
    ap.add_argument("--work", type=Path, help="working folder (default: a temp folder)")
    ap.add_argument("--json", dest="json_out", type=Path, help="also write the rows to this JSON file")
    a = ap.parse_args()

    nprocs = [int(x) for x in a.nproc.split(",")]
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    work = a.work or Path(tempfile.mkdtemp(prefix="bench_ddp_"))
    work.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    data = a.data
    if data is None:
        from reptok.data.prep import prepare
        from reptok.presets import get_preset

        data = work / "data"
        if not data.exists():
            prepare("builtin:shapes", data, limit=512, resolution=get_preset(a.preset).image_size)

    def threads_for(n: int) -> int:
        if a.threads:
            return a.threads
        return max(1, cores // n) if a.device == "cpu" else max(1, cores // max(nprocs))

    rows = []

    def run_stage(stage: str, base_args: list, batch: int, steps: int) -> None:
        one = None
        for n in nprocs:
            best = None
            for r in range(a.repeat):
                out = work / f"{stage}_np{n}_r{r}"
                args = ["train", stage, "--out", out, "--preset", a.preset, "--steps", steps, "--batch-size", batch,
                        "--device", a.device, "--set", "train.log_every=1", "--set", f"train.ckpt_every={steps}",
                        "--json", *base_args]
                summary, wall = torchrun(n, args, threads_for(n))
                row = {"stage": stage, "ranks": n, "threads_per_rank": threads_for(n), "global_batch": batch,
                       "steps": steps, "img_s": summary["images_per_s"], "img_s_steady": round(steady_rate(out, batch), 1),
                       "wall_s": round(wall, 1), "run": str(out)}
                if best is None or row["img_s_steady"] > best["img_s_steady"]:
                    best = row
            one = one or best
            best["speedup"] = round(best["img_s_steady"] / one["img_s_steady"], 2)
            rows.append(best)
            print(f"{stage} x{n}: {best['img_s']} img/s (steady {best['img_s_steady']})", file=sys.stderr, flush=True)

    tok_run = None
    if "recon" in stages:
        run_stage("recon", ["--data", data, "--sample-every", 0], a.batch_size, a.steps)
        tok_run = Path(rows[0]["run"])
    if "gen" in stages:
        if tok_run is None:  # a short 1-process tokenizer, only to have tokens
            tok_run = work / "tok"
            if not tok_run.exists():
                subprocess.run([sys.executable, "-m", "reptok_cli", "train", "recon", "--data", data, "--out", tok_run,
                                "--preset", a.preset, "--steps", 2, "--sample-every", 0, "--device", a.device,
                                "--json"], check=True, capture_output=True)
        tokens = work / "tokens.npy"
        subprocess.run([sys.executable, "-m", "reptok_cli", "extract", "--ckpt", tok_run, "--data", data,
                        "--out", tokens, "--device", a.device], check=True, capture_output=True)
        run_stage("gen", ["--tokens", tokens], a.gen_batch_size, a.gen_steps)

    import torch

    hw = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else f"CPU, {cores} cores"
    print(f"\nDDP training throughput, preset {a.preset}, {hw}, torch {torch.__version__}"
          + (" (CPU-bound: all ranks share the same cores)" if a.device == "cpu" else ""))
    print("| stage | ranks | threads/rank | global batch | steps | img/s (summary) | img/s (steps 2..N) | vs 1 rank | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['ranks']} | {r['threads_per_rank']} | {r['global_batch']} | {r['steps']} | "
              f"{r['img_s']} | {r['img_s_steady']} | {r['speedup']}x | {r['wall_s']} |")
    if a.json_out:
        a.json_out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

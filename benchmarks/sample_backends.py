"""End-to-end ``reptok sample`` on a CPU: torch eager vs ONNX Runtime, start-up and export included.

    OMP_NUM_THREADS=2 python benchmarks/sample_backends.py --preset small -n 40          # 12 classes x 40
    OMP_NUM_THREADS=2 python benchmarks/sample_backends.py --preset xl --classes 0-1 -n 1 --steps 5
    ... --repeat 2     # the two sampling rows twice, alternating (the export once)

For a random-weight run of the preset (``reptok.bench.make_random_run``; timing does not depend on
the weights) it times, as a user would see them, whole processes:

- ``torch``: ``reptok sample --backend torch`` (process wall time: import, load, sample, write);
- ``export``: ``reptok export onnx`` (graphs + ORT self-verification), paid once per run;
- ``onnx``: ``reptok sample --backend onnx --engine DIR`` (wall time, ORT session creation included);

and prints the wall seconds, the sampling images/s the command reports, the max uint8 difference
of the two outputs, and the break-even: the number of images after which export + ORT beats
torch. All commands run side by side on the same (possibly shared) CPU; compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def run(cmd, env) -> tuple:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}\n{p.stderr[-2000:]}")
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    return wall, (json.loads(lines[-1]) if lines else {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--classes", default="all")
    ap.add_argument("-n", type=int, default=40, help="images per class")
    ap.add_argument("--steps", type=int, default=None, help="steps of both stages (default: the preset's)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--work", default=None, help="keep the run and graphs here (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="time the torch and onnx sampling rows this many times, alternating (export once); "
                         "the table shows the best, the JSON every repeat")
    args = ap.parse_args()

    from reptok.bench import make_random_run

    work = Path(args.work or tempfile.mkdtemp(prefix="reptok-sb-"))
    run_dir = work / f"run-{args.preset}"
    if not (run_dir / "config.json").exists():
        make_random_run(args.preset, run_dir)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    base = [sys.executable, "-m", "reptok_cli"]
    common = ["sample", "--ckpt", run_dir, "--class", args.classes, "-n", args.n, "--device", "cpu", "--json"]
    if args.steps:
        common += ["--steps", args.steps, "--decoder-steps", args.steps]
    if args.batch_size:
        common += ["--batch-size", args.batch_size]
    common = [str(c) for c in common]
    engine = work / f"onnx-{args.preset}"
    rows, repeats = {}, []
    t_cmd = base + common + ["--backend", "torch", "--no-fast", "--out", str(work / "torch.npz")]
    o_cmd = base + common + ["--backend", "onnx", "--engine", str(engine), "--out", str(work / "onnx.npz")]
    rows["torch"] = run(t_cmd, env)
    rows["export"] = run(base + ["export", "onnx", "--ckpt", str(run_dir), "--out", str(engine), "--overwrite", "--json"], env)
    rows["onnx"] = run(o_cmd, env)
    repeats.append((rows["torch"][0], rows["onnx"][0]))
    for _ in range(args.repeat - 1):  # alternate, so a noisy neighbour hits both paths alike
        t, o = run(t_cmd, env), run(o_cmd, env)
        repeats.append((t[0], o[0]))
        rows["torch"] = min(rows["torch"], t, key=lambda r: r[0])
        rows["onnx"] = min(rows["onnx"], o, key=lambda r: r[0])
    a = np.load(work / "torch.npz")["arr_0"].astype(int)
    b = np.load(work / "onnx.npz")["arr_0"].astype(int)
    images = len(a)
    t_torch, s_torch = rows["torch"]
    t_exp, _ = rows["export"]
    t_onnx, s_onnx = rows["onnx"]
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"\n{args.preset}: {images} images, steps {s_torch.get('nfe', {})}, OMP_NUM_THREADS={threads}\n")
    print("| path | wall s | sampling img/s | note |")
    print("|---|---|---|---|")
    print(f"| torch eager fp32 | {t_torch:.1f} | {s_torch.get('images_per_s')} | |")
    print(f"| export onnx (once) | {t_exp:.1f} | | graphs + ORT self-check |")
    print(f"| onnx (ORT, --engine) | {t_onnx:.1f} | {s_onnx.get('images_per_s')} | session creation included |")
    print(f"| export + onnx | {t_exp + t_onnx:.1f} | | first run without graphs |")
    per_t = 1 / s_torch["images_per_s"] if s_torch.get("images_per_s") else None
    per_o = 1 / s_onnx["images_per_s"] if s_onnx.get("images_per_s") else None
    print(f"\nmax |onnx - torch| (uint8): {int(np.abs(a - b).max())}; "
          f"ORT / torch sampling throughput: {s_onnx['images_per_s'] / s_torch['images_per_s']:.2f}x; "
          f"wall with graphs: torch / onnx = {t_torch / t_onnx:.2f}x")
    if per_t and per_o and per_o < per_t:
        fixed = (t_exp + t_onnx - images * per_o) - (t_torch - images * per_t)
        print(f"break-even incl. export: {max(0.0, fixed / (per_t - per_o)):.0f} images")
    print(json.dumps({"preset": args.preset, "images": images, "torch_wall_s": round(t_torch, 2),
                      "export_wall_s": round(t_exp, 2), "onnx_wall_s": round(t_onnx, 2),
                      "torch_img_s": s_torch.get("images_per_s"), "onnx_img_s": s_onnx.get("images_per_s"),
                      "max_uint8_diff": int(np.abs(a - b).max()),
                      "repeats_wall_s": [[round(t, 2), round(o, 2)] for t, o in repeats]}))


if __name__ == "__main__":
    main()

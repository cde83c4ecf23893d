"""summary.md + results.json of benchmarks/gpu_check.sh, rewritten after every step (so a run cut
short still returns what it measured):

    python benchmarks/gpu_summary.py OUT WORK PRESET FLOPS_PER_IMAGE PEAK_FLOPS

Reads OUT/steps.tsv and WORK/res/NAME.out (each step's stdout: the last JSON line(s) it printed).
MFU = img/s x FLOPS_PER_IMAGE / PEAK_FLOPS (12.9e12 = XL at 50 + 50 steps; 790e12 ~ one H200 dense
bf16): meaningful for the xl preset at its default steps only.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def json_lines(path: Path) -> list:
    out = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out


def peak_mem(run: str | None):
    """The last gpu_mem_gib a training run logged (CUDA only)."""
    m = Path(run or "") / "metrics.jsonl"
    rows = json_lines(m) if run else []
    vals = [r["gpu_mem_gib"] for r in rows if "gpu_mem_gib" in r]
    return vals[-1] if vals else None


def figures(steps: list, fpi: float, peak: float, xl: bool = True) -> list:
    """(what, value) rows of the headline figures present so far."""
    rows = []
    for s in steps:
        res, name = s["result"], s["name"]
        if not res or s["rc"] != "0":
            continue
        last = res[-1]
        if name.startswith("sample_") and "images_per_s" in last:
            ips = last["images_per_s"] or 0.0
            rows.append((f"{name}: img/s ({last['images']} images, batch {last['batch_size']}, NFE "
                         f"{last['nfe']['generator']}+{last['nfe']['decoder']}, {last['fast_path']})",
                         f"{ips}" + (f" (MFU {ips * fpi / peak:.1%}" if xl else " (") + f", warm-up {last.get('warmup_s')} s)"))
        elif name == "sample_diff":
            rows.append((f"max / mean uint8 difference bf16 + graphs vs fp32 ({last['images']} images)",
                         f"{last['max_abs_uint8']} / {last['mean_abs_uint8']:.3f}"))
        elif name.startswith("train_recon") or name in ("train_gen", "train_distill"):
            mem = peak_mem(last.get("run"))
            rows.append((f"{name}: steady img/s per GPU (steps {last.get('start_step')}..{last.get('steps')})",
                         f"{last.get('steady_images_per_s', last.get('images_per_s'))}"
                         + (f", peak {mem} GiB" if mem is not None else "")))
        elif name == "throughput":
            for r in res:
                mem = r.get("mem_per_image_mib")
                rows.append((f"train_throughput {r['preset']} {r['stage']} {r['mode']} batch {r['batch']}",
                             f"{r['images_per_s']} img/s" + (f", {mem} MiB / image" if mem is not None else "")))
    return rows


def main() -> None:
    out, work, preset = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    fpi, peak = float(sys.argv[4]), float(sys.argv[5])
    with open(out / "steps.tsv") as f:
        steps = [dict(r) for r in csv.DictReader(f, delimiter="\t")]
    for s in steps:
        s["name"] = s.pop("step")
        s["result"] = json_lines(work / "res" / f"{s['name']}.out")
    env = next((s["result"][-1] for s in steps if s["name"] == "env" and s["result"]), {})
    figs = figures(steps, fpi, peak, xl=preset == "xl")
    doc = {"preset": preset, "env": env, "figures": dict(figs),
           "steps": [{**s, "result": s["result"][-20:]} for s in steps]}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out / "results.json")
    lines = [f"# reptok GPU check ({preset}; {env.get('gpu', 'no GPU')}, torch {env.get('torch')})", "",
             "| figure | value |", "|---|---|", *[f"| {a} | {b} |" for a, b in figs], "",
             "| step | rc | seconds |", "|---|---|---|", *[f"| {s['name']} | {s['rc']} | {s['seconds']} |" for s in steps],
             "", "rc: 124 = timed out; skipped:X = X failed or the time budget ran out. Logs: logs.tar.gz."]
    tmp = out / "summary.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "summary.md")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The GPU check of issue 15 (fast batched sampling in `reptok sample` itself). From the repo root:
#
#   OUT=/path/to/results bash benchmarks/gpu_sample_check.sh          # ~1,000 XL images per path
#   DEVICE=cpu PRESET=tiny IMAGES=8 BATCH=4 OUT=/tmp/x bash benchmarks/gpu_sample_check.sh   # CPU dry run
#
# A random-weight run of $PRESET (timing does not depend on the weights), then the same
# `reptok sample --class all -n K --batch-size $BATCH` job (same seeds) four ways:
#   eager fp32 (--no-fast), bf16 (--precision bf16 --no-cuda-graphs), bf16 + CUDA graphs (the
#   default on CUDA), bf16 + CUDA graphs + regional compile (--compile);
# and writes $OUT/sample_check.md: images/s, MFU (FLOPS_PER_IMAGE, 12.9e12 at XL 50+50 steps, over
# PEAK_FLOPS, 790e12 ~ one H200 dense bf16), and the max / mean uint8 difference vs eager fp32.
# Target (issue 15): >= 30 img/s (~50 % MFU) at 50+50 steps, bf16 + graphs.
# Knobs: PRESET=xl IMAGES=1000 BATCH=64 STEPS= (empty: the run's 50+50) DEVICE=cuda PY=python
#        WORK=/tmp/reptok-gpu-sample STEP_TIMEOUT=600 FLOPS_PER_IMAGE PEAK_FLOPS
set -uo pipefail

OUT=${OUT:-$PWD/gpu_sample_check_out}
PRESET=${PRESET:-xl}
IMAGES=${IMAGES:-1000}
BATCH=${BATCH:-64}
STEPS=${STEPS:-}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python}
WORK=${WORK:-/tmp/reptok-gpu-sample}
STEP_TIMEOUT=${STEP_TIMEOUT:-600}
FLOPS_PER_IMAGE=${FLOPS_PER_IMAGE:-12.9e12}
PEAK_FLOPS=${PEAK_FLOPS:-790e12}
[ -x .venv/bin/python ] && [ "$PY" = python ] && PY=.venv/bin/python
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

RUN=$WORK/run-$PRESET
[ -f "$RUN/config.json" ] || "$PY" -c "from reptok.bench import make_random_run; make_random_run('$PRESET', '$RUN')"
CLASSES=$("$PY" -c "from reptok.run import read_run_config as r; print(r('$RUN')['config'].generator.num_classes)")
PER=$(( (IMAGES + CLASSES - 1) / CLASSES ))
JOB=(sample --ckpt "$RUN" --class all -n "$PER" --count "$IMAGES" --seed 0 --batch-size "$BATCH" --device "$DEVICE" --json)
[ -n "$STEPS" ] && JOB+=(--steps "$STEPS" --decoder-steps "$STEPS")

declare -A FLAGS=(
  [eager_fp32]="--no-fast"
  [bf16]="--precision bf16 --no-cuda-graphs"
  [bf16_graphs]="--precision bf16 --cuda-graphs"
  [bf16_graphs_compile]="--precision bf16 --cuda-graphs --compile"
)
ORDER=(eager_fp32 bf16 bf16_graphs bf16_graphs_compile)
if [ "$DEVICE" != cuda ]; then  # dry run: no graphs on a CPU; bf16 autocast and compile still run
  FLAGS[bf16]="--precision bf16"; FLAGS[bf16_graphs]="--precision bf16"; FLAGS[bf16_graphs_compile]="--precision bf16 --compile"
fi
for name in "${ORDER[@]}"; do
  echo "=== $name: reptok ${JOB[*]} ${FLAGS[$name]}" >&2
  # shellcheck disable=SC2086
  timeout "$STEP_TIMEOUT" "$PY" -m reptok_cli "${JOB[@]}" ${FLAGS[$name]} --out "$WORK/$name.npz" \
    > "$OUT/sample_$name.json" 2> "$OUT/sample_$name.log"
  echo "rc=$? $(tail -c 300 "$OUT/sample_$name.json")" >&2
done

"$PY" - "$OUT" "$WORK" "$FLOPS_PER_IMAGE" "$PEAK_FLOPS" <<'EOF' | tee "$OUT/sample_check.md"
import json, sys
from pathlib import Path
import numpy as np
out, work, fpi, peak = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
names = ["eager_fp32", "bf16", "bf16_graphs", "bf16_graphs_compile"]
ref = np.load(work / "eager_fp32.npz")["arr_0"].astype(np.int16) if (work / "eager_fp32.npz").exists() else None
print("| path | fast path | images | NFE gen+dec | img/s | MFU | max diff vs fp32 | mean diff |")
print("|---|---|---|---|---|---|---|---|")
for n in names:
    try:
        s = json.loads((out / f"sample_{n}.json").read_text().strip().splitlines()[-1])
    except Exception:
        print(f"| {n} | failed (see sample_{n}.log) | | | | | | |")
        continue
    ips = s.get("images_per_s") or 0.0
    diff = mean = ""
    if ref is not None and (work / f"{n}.npz").exists():
        x = np.load(work / f"{n}.npz")["arr_0"].astype(np.int16)
        diff, mean = int(np.abs(x - ref).max()), round(float(np.abs(x - ref).mean()), 3)
    print(f"| {n} | {s['fast_path']} | {s['images']} | {s['nfe']['generator']}+{s['nfe']['decoder']} | "
          f"{ips:.2f} | {ips * fpi / peak:.1%} | {diff} | {mean} |")
print(f"\nMFU = img/s x {fpi:.3g} FLOPs/image / {peak:.3g} FLOP/s (FLOPs/image is the XL 50+50-step figure;"
      " rescale for other presets / steps).")
EOF

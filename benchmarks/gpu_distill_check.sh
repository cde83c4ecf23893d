#!/usr/bin/env bash
# One prepared GPU check for the few-step decoder (issue 19). From the repo root:
#
#   OUT=/path/to/results bash benchmarks/gpu_distill_check.sh
#   DEVICE=cpu PRESET=tiny OUT=/tmp/gdc bash benchmarks/gpu_distill_check.sh     # plumbing dry run
#
# Speed only (random weights say nothing about quality; a K-step student has the teacher's
# architecture, so its cost is the teacher's at K decoder steps):
# 1. a random-weight run of $PRESET (xl: decoder 1152 x 28, generator 1536 x 28, SD-VAE-shaped VAE);
# 2. `reptok sample` at batch $BATCH, bf16: $GEN_STEPS+$GEN_STEPS vs $GEN_STEPS+$K (generator +
#    decoder steps), images/s from its --json line (a warm-up call first); with --cuda-graphs when
#    `reptok sample` has that option;
# 3. `reptok bench --cuda-graphs` per-NFE latencies at batch $BATCH (generator, decoder, VAE) and
#    the images/s they imply for both step counts (CFG doubles the guided generator rows);
# 4. the CUDA path of `reptok train distill` itself on a tiny tokenizer (bf16 autocast): a few
#    steps, a resume, `reptok info`, a sample through `reptok train attach`;
# 5. summary.md.
# A failed step is recorded in $OUT/steps.tsv and the script goes on.
# Knobs: PRESET=xl BATCH=64 GEN_STEPS=50 K=4 N_BATCHES=2 DEVICE=cuda STEP_TIMEOUT=600 WORK PY
set -uo pipefail

OUT=${OUT:-$PWD/gpu_distill_out}
PRESET=${PRESET:-xl}
BATCH=${BATCH:-64}
GEN_STEPS=${GEN_STEPS:-50}
K=${K:-4}
N_BATCHES=${N_BATCHES:-2}
DEVICE=${DEVICE:-cuda}
STEP_TIMEOUT=${STEP_TIMEOUT:-600}
WORK=${WORK:-/tmp/reptok-gpu-distill}
PY=${PY:-python}
if [ "$DEVICE" = cpu ]; then BATCH=${BATCH_CPU:-4}; N_BATCHES=1; fi

. "$(dirname "$0")/gpu_steps.sh"

# ---------------------------------------------------------------- 1. random-weight run
RUN=$WORK/run-$PRESET
if [ ! -f "$RUN/config.json" ]; then
  step make_run "$PY" -c "from reptok.bench import make_random_run; make_random_run('$PRESET', '$RUN')"
fi

# ---------------------------------------------------------------- 2. reptok sample: T+T vs T+K
GRAPHS=()
if "${REPTOK[@]}" sample --help 2>/dev/null | grep -q -- "--cuda-graphs" && [ "$DEVICE" = cuda ]; then
  GRAPHS=(--cuda-graphs)
fi
N=$((BATCH * N_BATCHES))
SAMPLE=(sample --ckpt "$RUN" --class 0 -n "$N" --batch-size "$BATCH" --steps "$GEN_STEPS" --precision bf16
        --device "$DEVICE" --json ${GRAPHS[@]+"${GRAPHS[@]}"})
step sample_warmup "${REPTOK[@]}" sample --ckpt "$RUN" --class 0 -n "$BATCH" --batch-size "$BATCH" --steps 2 \
  --decoder-steps 2 --precision bf16 --device "$DEVICE" --json ${GRAPHS[@]+"${GRAPHS[@]}"} \
  --out "$WORK/warm.npz" > /dev/null
for dec in "$GEN_STEPS" "$K"; do
  step "sample_${GEN_STEPS}_$dec" "${REPTOK[@]}" "${SAMPLE[@]}" --decoder-steps "$dec" --out "$WORK/s_$dec.npz" \
    > "$OUT/sample_${GEN_STEPS}_$dec.json"
done

# ---------------------------------------------------------------- 3. per-NFE latencies (CUDA graphs)
CG=()
[ "$DEVICE" = cuda ] && CG=(--cuda-graphs)
step bench "${REPTOK[@]}" bench --ckpt "$RUN" --stages generator,decoder,vae --batch-sizes "$BATCH" \
  --precision bf16 --device "$DEVICE" --warmup 2 --iters 5 --json ${CG[@]+"${CG[@]}"} > "$OUT/bench.json"

# ---------------------------------------------------------------- 4. train distill on CUDA
TINY=$WORK/tiny
rm -rf "$TINY"
step data "${REPTOK[@]}" data prep builtin:shapes --out "$TINY/data" --limit 64 --resolution 32 --json \
  > "$OUT/distill_data.json"
step recon "${REPTOK[@]}" train recon --data "$TINY/data" --out "$TINY/tok" --preset tiny --steps 20 \
  --batch-size 16 --sample-every 0 --device "$DEVICE" --json > "$OUT/distill_recon.json"
step distill "${REPTOK[@]}" train distill --ckpt "$TINY/tok" --out "$TINY/st" --student-steps "$K" --teacher-steps 16 \
  --steps 6 --ckpt-every 3 --batch-size 16 --device "$DEVICE" --json > "$OUT/distill.json"
step distill_resume "${REPTOK[@]}" train distill --ckpt "$TINY/tok" --out "$TINY/st" --steps 10 --resume \
  --device "$DEVICE" --json > "$OUT/distill_resume.json"
step info "${REPTOK[@]}" info --ckpt "$TINY/st" --json > "$OUT/distill_info.json"
step extract "${REPTOK[@]}" extract --ckpt "$TINY/tok" --data "$TINY/data" --out "$TINY/tokens.npy" --device "$DEVICE" \
  > /dev/null
step gen "${REPTOK[@]}" train gen --tokens "$TINY/tokens.npy" --out "$TINY/gen" --preset tiny --steps 10 \
  --device "$DEVICE" --json > /dev/null
step attach "${REPTOK[@]}" train attach --generator "$TINY/gen" --tokenizer "$TINY/st" --out "$TINY/gen-st" --json \
  > "$OUT/distill_attach.json"
step sample_student "${REPTOK[@]}" sample --ckpt "$TINY/gen-st" --class all -n 2 --device "$DEVICE" --json \
  --out "$TINY/student.npz" > "$OUT/distill_sample.json"

# ---------------------------------------------------------------- 5. summary
"$PY" - "$OUT" "$RUN" "$GEN_STEPS" "$K" "$BATCH" <<'EOF' > "$OUT/summary.md"
import json, sys
from pathlib import Path
out, run, T, K, B = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])

def load(name):
    try:
        return json.loads((out / name).read_text().strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001 - a failed step leaves no JSON
        return {"error": f"{name}: {type(e).__name__}"}

print(f"# few-step decoder: speed at {run.name}, batch {B}, bf16\n")
print("| measurement | generator+decoder steps | images/s |\n|---|---|---|")
for dec in (T, K):
    s = load(f"sample_{T}_{dec}.json")
    print(f"| reptok sample | {T}+{dec} | {s.get('images_per_s', s.get('error'))} |")
bench = load("bench.json")
rows = bench.get("rows", bench.get("results", [])) if isinstance(bench, dict) else []
best = {}
for r in rows:
    if r.get("batch") == B and r.get("latency_ms"):
        k = r["stage"]
        if k not in best or r["latency_ms"] < best[k][0]:
            best[k] = (r["latency_ms"], r["backend"])
if "generator" in best and "decoder" in best:
    cfg = json.loads((run / "config.json").read_text())["pipeline"]["sampling"]
    lo, hi = cfg["cfg_interval"]
    grid = [i / T for i in range(T)]
    guided = sum(1 for t in grid if lo <= t <= hi) if cfg["cfg"] != 1.0 else 0
    gen_ms = best["generator"][0] * (T - guided + 2 * guided)  # CFG rows run at 2B: ~2x an NFE
    vae_ms = best.get("vae", (0.0, ""))[0]
    for dec in (T, K):
        ms = gen_ms + dec * best["decoder"][0] + vae_ms
        print(f"| per-NFE composition ({best['decoder'][1]}) | {T}+{dec} | {B / ms * 1e3:.1f} |")
print("\nper-NFE latency ms:", {k: v for k, v in best.items()})
print("\ndistill on", "the device:", {n: load(n).get("last_loss", load(n).get("error")) for n in ("distill.json", "distill_resume.json")})
print("info distilled:", load("distill_info.json").get("distilled"))
print("attached sample:", load("distill_sample.json").get("images_per_s", load("distill_sample.json").get("error")))
print("\n## steps")
print((out / "steps.tsv").read_text())
EOF
cat "$OUT/summary.md"

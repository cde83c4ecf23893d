#!/usr/bin/env bash
# One prepared GPU check (fast inference, issue 6; the CUDA paths of training). From the repo root:
#
#   OUT=/path/to/results bash benchmarks/gpu_check.sh
#
# 0. the CUDA-only tests (pytest -m cuda);
# 1. a run directory with random weights from the `xl` preset (decoder 1152 x 28, generator
#    1536 x 28, a random SD-VAE-shaped VAE): timing does not depend on the weights;
# 2. `reptok export onnx` (fp32 graphs, self-verified with ONNX Runtime on the CPU);
# 3. `reptok export trt` twice: fp16 and bf16 engines (batch profile 1 / 8 / 64);
# 4. `reptok bench` at batch 1/8/64: torch eager bf16, CUDA graphs, ONNX Runtime CUDA (fp32
#    graphs: ORT has no bf16) and TensorRT bf16; torch.compile bf16; TensorRT fp16. Each NFE row
#    carries the max abs error against torch eager fp32 on the same inputs;
# 5. whole samples: torch fp32 vs TensorRT fp16 / bf16 (same seeds) -> max abs pixel error, PSNR;
# 6. summary.md: every bench row in one table;
# 7. `reptok quickstart --device cuda` (QUICKSTART=1): the whole method trained and judged on the
#    GPU (bf16 autocast), its report in $OUT/quickstart.json.
# 8. training at scale (TRAIN=1, issue 14): `torchrun --nproc-per-node 1` (a real 1-rank NCCL
#    group: DDP + every collective, each checked to get a tensor on the training device by
#    tests/collective_guard.py) `data cache-latents`, `train recon` and `train gen` at
#    TRAIN_PRESET=base for TRAIN_STEPS=20 steps; then benchmarks/train_throughput.py at
#    THROUGHPUT_PRESET=xl, bf16, cached latents, eager and --compile -> $OUT/train_throughput.md.
#
# Results (JSON + logs) land in $OUT. A failed step is recorded in $OUT/steps.tsv and the script
# goes on, so a partial run still returns what it measured. Knobs (environment):
#   PRESET=xl BATCHES=1,8,64 STEPS=10 (end-to-end steps, both stages; the run default is 50+50)
#   WARMUP=2 ITERS=5 STEP_TIMEOUT=900 (seconds per step) WORK=/tmp/reptok-gpu-check PY=python
#   DEVICE=cuda (DEVICE=cpu PRESET=tiny BATCHES=1,2 is a plumbing dry run on a CPU machine)
#   CUDA_TESTS=1 QUICKSTART=1 (0 skips the step). ONNX export is skipped on CUDA when neither
#   TensorRT nor onnxruntime-gpu is installed (nothing on the GPU would use the graphs).
set -uo pipefail

OUT=${OUT:-$PWD/gpu_check_out}
PRESET=${PRESET:-xl}
BATCHES=${BATCHES:-1,8,64}
MAXB=${BATCHES##*,}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-2}
ITERS=${ITERS:-5}
STEP_TIMEOUT=${STEP_TIMEOUT:-900}
WORK=${WORK:-/tmp/reptok-gpu-check}
PY=${PY:-python}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu PRESET=tiny: a plumbing dry run without a GPU
CUDA_TESTS=${CUDA_TESTS:-1}
QUICKSTART=${QUICKSTART:-1}
TRAIN=${TRAIN:-1}
TRAIN_PRESET=${TRAIN_PRESET:-$([ "$DEVICE" = cpu ] && echo tiny || echo base)}
TRAIN_STEPS=${TRAIN_STEPS:-20}
THROUGHPUT_PRESET=${THROUGHPUT_PRESET:-$([ "$DEVICE" = cpu ] && echo tiny || echo xl)}
THROUGHPUT_BATCH=${THROUGHPUT_BATCH:-$([ "$DEVICE" = cpu ] && echo 8 || echo 64)}
. "$(dirname "$0")/gpu_steps.sh"

# ---------------------------------------------------------------- environment
step env "$PY" - <<'EOF' > "$OUT/env.json"
import json, importlib
info = {}
for mod in ("torch", "onnx", "onnxruntime", "tensorrt", "diffusers", "timm"):
    try:
        info[mod] = importlib.import_module(mod).__version__
    except Exception as e:  # noqa: BLE001
        info[mod] = f"missing ({type(e).__name__})"
import torch
info["cuda"] = torch.cuda.is_available()
if info["cuda"]:
    info["gpu"] = torch.cuda.get_device_name(0)
    info["capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
try:
    import onnxruntime as ort
    info["ort_providers"] = ort.get_available_providers()
except Exception:
    pass
print(json.dumps(info, indent=2))
EOF
cat "$OUT/env.json"
HAS_TRT=$("$PY" -c "import tensorrt" 2>/dev/null && echo 1 || echo 0)
HAS_ORT_CUDA=$("$PY" -c "import onnxruntime as o, sys; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 1)" 2>/dev/null && echo 1 || echo 0)

# ---------------------------------------------------------------- 0. CUDA tests
if [ "$CUDA_TESTS" = 1 ]; then
  step cuda_tests "$PY" -m pytest -q -m cuda -p no:cacheprovider tests > "$OUT/cuda_tests.txt" 2>&1
  tail -3 "$OUT/cuda_tests.txt"
fi

# ---------------------------------------------------------------- 1. random-weight run
RUN=$WORK/run
if [ ! -f "$RUN/config.json" ]; then
  step make_run "$PY" -c "from reptok.bench import make_random_run; make_random_run('$PRESET', '$RUN')"
fi

# ---------------------------------------------------------------- 2. ONNX
if [ "$DEVICE" = cuda ] && [ "$HAS_TRT" != 1 ] && [ "$HAS_ORT_CUDA" != 1 ]; then
  echo "neither tensorrt nor onnxruntime-gpu is installed: ONNX export skipped" | tee "$OUT/onnx_skipped.txt"
else
step export_onnx "${REPTOK[@]}" export onnx --ckpt "$RUN" --out "$WORK/onnx" --overwrite --json \
  > "$OUT/export_onnx.json"
fi

# ---------------------------------------------------------------- 3. TensorRT engines
if [ "$HAS_TRT" = 1 ]; then
  for prec in fp16 bf16; do
    step "trt_$prec" "${REPTOK[@]}" export trt --engine "$WORK/onnx" --out "$WORK/trt-$prec" --precision "$prec" \
      --min-batch 1 --opt-batch 8 --max-batch "$MAXB" --timing-cache "$WORK/trt.cache" --overwrite --json \
      > "$OUT/trt_$prec.json"
  done
else
  echo "tensorrt is not installed: TensorRT steps skipped" | tee "$OUT/trt_skipped.txt"
fi

# ---------------------------------------------------------------- 4. bench
BENCH=(--ckpt "$RUN" --batch-sizes "$BATCHES" --steps "$STEPS" --warmup "$WARMUP" --iters "$ITERS" --device "$DEVICE" --json)
BACKENDS=torch,onnx
if [ "$HAS_ORT_CUDA" != 1 ] && [ "$DEVICE" = cuda ]; then
  BACKENDS=torch  # an xl model on ORT's CPU provider would eat the whole time budget
  echo "onnxruntime has no CUDA provider (install onnxruntime-gpu): ORT rows skipped" | tee "$OUT/ort_skipped.txt"
fi
EXTRA=()
if [ "$HAS_TRT" = 1 ] && [ -f "$WORK/trt-bf16/engines.json" ]; then
  BACKENDS=torch,onnx,trt
  EXTRA=(--engine "$WORK/trt-bf16")
fi
# Separate invocations, so a slow or failing variant (torch.compile of a 28-layer model per
# batch shape) cannot take the other results down with it.
step bench_bf16 "${REPTOK[@]}" bench "${BENCH[@]}" --backend "$BACKENDS" --precision bf16 --cuda-graphs \
  --engine "$WORK/onnx" ${EXTRA[@]+"${EXTRA[@]}"} > "$OUT/bench_bf16.json"
step bench_compile "${REPTOK[@]}" bench "${BENCH[@]}" --backend torch --precision bf16 --compile \
  > "$OUT/bench_compile_bf16.json"
if [ "$HAS_TRT" = 1 ] && [ -f "$WORK/trt-fp16/engines.json" ]; then
  step bench_trt_fp16 "${REPTOK[@]}" bench "${BENCH[@]}" --backend trt --precision fp16 --engine "$WORK/trt-fp16" \
    > "$OUT/bench_trt_fp16.json"
fi

# ---------------------------------------------------------------- 5. whole samples vs torch
SAMPLE=(sample --ckpt "$RUN" --class 0-7 -n 1 --seed 3 --steps "$STEPS" --decoder-steps "$STEPS" --batch-size 8 --device "$DEVICE" --json)
step sample_torch "${REPTOK[@]}" "${SAMPLE[@]}" --out "$WORK/torch.npz" > "$OUT/sample_torch.json"
for prec in fp16 bf16; do
  if [ -f "$WORK/trt-$prec/engines.json" ]; then
    step "sample_trt_$prec" "${REPTOK[@]}" "${SAMPLE[@]}" --backend trt --engine "$WORK/trt-$prec" \
      --out "$WORK/trt_$prec.npz" > "$OUT/sample_trt_$prec.json"
  fi
done
step sample_compare "$PY" - "$WORK" <<'EOF' > "$OUT/sample_compare.json"
import json, sys, numpy as np
from pathlib import Path
work = Path(sys.argv[1])
ref = np.load(work / "torch.npz")["arr_0"].astype(np.float64)
out = {}
for prec in ("fp16", "bf16"):
    f = work / f"trt_{prec}.npz"
    if f.exists():
        x = np.load(f)["arr_0"].astype(np.float64)
        mse = ((x - ref) ** 2).mean()
        out[f"trt_{prec}"] = {"max_abs_uint8": float(np.abs(x - ref).max()), "mean_abs_uint8": float(np.abs(x - ref).mean()),
                              "psnr_db": float(10 * np.log10(255 ** 2 / mse)) if mse > 0 else float("inf")}
print(json.dumps(out, indent=2))
EOF

# ---------------------------------------------------------------- 5b. reptok sample fast paths (issue 15)
step sample_fast env OUT="$OUT/sample_fast" PRESET="$PRESET" DEVICE="$DEVICE" PY="$PY" bash benchmarks/gpu_sample_check.sh

# ---------------------------------------------------------------- 7. quickstart
if [ "$QUICKSTART" = 1 ]; then
  step quickstart "${REPTOK[@]}" quickstart --out "$WORK/quickstart" --overwrite --device "$DEVICE" --json \
    > "$OUT/quickstart.json"
  cat "$OUT/quickstart.json"
fi

# ---------------------------------------------------------------- 8. training at scale
if [ "$TRAIN" = 1 ]; then
  TW=$WORK/train
  TRES=$("$PY" -c "from reptok.presets import get_preset; print(get_preset('$TRAIN_PRESET').image_size)")
  TPIX=$("$PY" -c "from reptok.presets import get_preset; print(int(get_preset('$TRAIN_PRESET').vae.is_pixel))")
  GUARD=("$PY" -m torch.distributed.run --nproc-per-node 1 --master-addr 127.0.0.1 --master-port 29517 tests/collective_guard.py)
  export REPTOK_COLLECTIVE_DEVICE=$DEVICE
  step train_prep "${REPTOK[@]}" data prep builtin:shapes:256 --out "$TW/data" --resolution "$TRES" --overwrite --json > "$OUT/train_prep.json"
  TVAE=()
  if [ "$TPIX" = 0 ]; then
    step train_vae "$PY" -c "from reptok.bench import random_autoencoder; from reptok.presets import get_preset; random_autoencoder(get_preset('$TRAIN_PRESET').vae, 0).save_pretrained('$TW/vae')"
    TVAE=(--vae "$TW/vae")
    step train_cache "${GUARD[@]}" data cache-latents "$TW/data" "${TVAE[@]}" --device "$DEVICE" --json > "$OUT/train_cache.json"
  fi
  rm -rf "$TW/tok" "$TW/gen"
  step train_recon "${GUARD[@]}" train recon --data "$TW/data" --out "$TW/tok" --preset "$TRAIN_PRESET" --encoder-weights random \
    ${TVAE[@]+"${TVAE[@]}"} --steps "$TRAIN_STEPS" --batch-size 32 --sample-every 0 --device "$DEVICE" --json > "$OUT/train_recon.json"
  step train_extract "${REPTOK[@]}" extract --ckpt "$TW/tok" --data "$TW/data" --out "$TW/tokens.npy" --device "$DEVICE" --json > "$OUT/train_extract.json"
  step train_gen "${GUARD[@]}" train gen --tokens "$TW/tokens.npy" --out "$TW/gen" --preset "$TRAIN_PRESET" \
    --steps "$TRAIN_STEPS" --batch-size 64 --device "$DEVICE" --json > "$OUT/train_gen.json"
  cat "$OUT/train_recon.json" "$OUT/train_gen.json"
  step train_throughput "$PY" benchmarks/train_throughput.py --preset "$THROUGHPUT_PRESET" --device "$DEVICE" \
    --precision bf16 --cache --compile --batch-size "$THROUGHPUT_BATCH" --images 1024 --steps 20 > "$OUT/train_throughput.md"
  cat "$OUT/train_throughput.md"
  unset REPTOK_COLLECTIVE_DEVICE
fi

# ---------------------------------------------------------------- 6. summary
"$PY" benchmarks/bench_backends.py --summarize "$OUT"/bench_*.json > "$OUT/summary.md" 2>/dev/null
{ echo; echo "## whole samples vs torch fp32 ($STEPS+$STEPS steps)"; cat "$OUT/sample_compare.json"; \
  [ -f "$OUT/train_throughput.md" ] && { echo; echo "## training throughput"; cat "$OUT/train_throughput.md"; }; \
  echo; echo "## steps"; cat "$OUT/steps.tsv"; } >> "$OUT/summary.md"
cat "$OUT/summary.md"

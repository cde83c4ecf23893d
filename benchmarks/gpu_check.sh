#!/usr/bin/env bash
# The GPU check (issue 24): one run, at most 8 minutes on one H200 (BUDGET seconds of steps),
# that returns its figures even when it is cut short. From the repo root:
#
#   OUT=/path/to/results bash benchmarks/gpu_check.sh
#   WHEELS=/path/to/wheels OUT=... bash benchmarks/gpu_check.sh   # first installs what is missing
#   DEVICE=cpu PRESET=tiny OUT=/tmp/x bash benchmarks/gpu_check.sh  # CPU dry run (the test suite runs it)
#
# Steps, in order of value (each with its own timeout; a failed step is recorded and the steps
# that need its output are skipped; the summary is rewritten after every step):
#   env            versions (package metadata: only torch is imported), GPU; with WHEELS=DIR: pip install --no-index --find-links DIR --target
#                  WORK/site of every wheel whose distribution is not installed (PYTHONPATH then has it)
#   cuda_tests     pytest -m cuda
#   train_*        torchrun --nproc-per-node 1 under tests/collective_guard.py (a real 1-rank NCCL
#                  group: every collective must get a tensor on the training device): data prep,
#                  a random SD-VAE, data cache-latents, train recon at TRAIN_PRESET with cached
#                  latents eager / --compile / --precision fp16, extract, train gen (TRAIN_STEPS each)
#   make_run       ONE random-weight run of PRESET (xl), reused by every later step
#   sample_*       reptok sample: bf16 + CUDA graphs (IMAGES), --compile (timer after the warm-up),
#                  eager fp32 (--no-fast, FP32_IMAGES) and its max pixel difference to bf16 + graphs,
#                  the 4-step decoder (--decoder-steps K) vs 50 steps
#   throughput     benchmarks/train_throughput.py --preset THROUGHPUT_PRESET, stage a, cached latents,
#                  eager vs --compile, peak memory per image
#   train_distill  train distill (K-step student of the train_recon tokenizer) under torchrun
# Results in OUT (at most 8 files): summary.md, results.json, steps.tsv, logs.tar.gz (each step's
# stdout + stderr; REPTOK_DEBUG=1, so a failure carries its traceback).
# Knobs: OUT WORK PY (python3) DEVICE (cuda) PRESET (xl) BUDGET (430 s) IMAGES (128) BATCH (64)
#        FP32_IMAGES (16) K (4) TRAIN_PRESET (base) TRAIN_STEPS (10) TRAIN_IMAGES (512) WHEELS
#        CUDA_TESTS (test paths, "tests"; empty skips) FLOPS_PER_IMAGE (12.9e12) PEAK_FLOPS (790e12)
# CPU dry run: the same steps at tiny sizes (gloo instead of NCCL; --compile steps run with
# TORCHDYNAMO_DISABLE=1, i.e. the flags and code paths without inductor's minutes of codegen;
# compilation itself is tested by tests/test_sample.py).
set -uo pipefail

CPU=$([ "${DEVICE:-cuda}" = cpu ] && echo 1 || echo 0)
pick() { [ "$CPU" = 1 ] && echo "$2" || echo "$1"; }  # pick CUDA_VALUE CPU_VALUE
OUT=${OUT:-$PWD/gpu_check_out}
WORK=${WORK:-/tmp/reptok-gpu-check}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-$(pick xl tiny)}
BUDGET=${BUDGET:-$(pick 430 600)}
IMAGES=${IMAGES:-$(pick 128 8)}
BATCH=${BATCH:-$(pick 64 4)}
FP32_IMAGES=${FP32_IMAGES:-$(pick 16 4)}
K=${K:-4}
SAMPLE_STEPS=${SAMPLE_STEPS:-$(pick "" 4)}  # empty: the run's own (50 + 50)
TRAIN_PRESET=${TRAIN_PRESET:-$(pick base tiny)}
TRAIN_STEPS=${TRAIN_STEPS:-$(pick 10 3)}
TRAIN_IMAGES=${TRAIN_IMAGES:-$(pick 512 32)}
TRAIN_BATCH=${TRAIN_BATCH:-$(pick 64 8)}
THROUGHPUT_PRESET=${THROUGHPUT_PRESET:-$PRESET}
THROUGHPUT_BATCH=${THROUGHPUT_BATCH:-$(pick 64 8)}
THROUGHPUT_STEPS=${THROUGHPUT_STEPS:-$(pick 10 2)}
CUDA_TESTS=${CUDA_TESTS-tests}
FLOPS_PER_IMAGE=${FLOPS_PER_IMAGE:-12.9e12}
PEAK_FLOPS=${PEAK_FLOPS:-790e12}
[ "$PY" = python3 ] && [ -x .venv/bin/python ] && PY=.venv/bin/python

T0=$SECONDS
rm -rf "$WORK/logs" "$WORK/res"
mkdir -p "$OUT" "$WORK/logs" "$WORK/res"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" REPTOK_DEBUG=1 PYTHONUNBUFFERED=1
REPTOK=("$PY" -m reptok_cli)
GUARD=("$PY" -m torch.distributed.run --nproc-per-node 1 --master-addr 127.0.0.1 --master-port "${PORT:-29517}"
       tests/collective_guard.py)
export REPTOK_COLLECTIVE_DEVICE=$DEVICE
printf 'step\trc\tseconds\n' > "$OUT/steps.tsv"
declare -A RC

summarize() {  # summary.md + results.json from steps.tsv and every step's stdout (after each step)
  "$PY" benchmarks/gpu_summary.py "$OUT" "$WORK" "$PRESET" "$FLOPS_PER_IMAGE" "$PEAK_FLOPS" \
    > "$WORK/logs/summary.log" 2>&1
  tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs 2>/dev/null
}

step() {  # step NAME TIMEOUT [needs=A,B] CMD... : stdout -> res/NAME.out, stderr -> logs/NAME.log
  local name=$1 limit=$2; shift 2
  local needs=""
  case "$1" in needs=*) needs=${1#needs=}; shift ;; esac
  local left=$((BUDGET - (SECONDS - T0) - 5)) rc t0=$SECONDS dep
  for dep in ${needs//,/ }; do
    if [ "${RC[$dep]:-missing}" != 0 ]; then rc="skipped:$dep"; fi
  done
  [ "$left" -lt 10 ] && rc=${rc:-skipped:budget}
  if [ -z "${rc:-}" ]; then
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (timeout $limit s): $*" >&2
    echo "\$ $*" > "$WORK/logs/$name.log"
    timeout -k 5 "$limit" "$@" > "$WORK/res/$name.out" 2>> "$WORK/logs/$name.log"
    rc=$?
    cp "$WORK/res/$name.out" "$WORK/logs/$name.out" 2>/dev/null
  fi
  RC[$name]=$rc
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$OUT/steps.tsv"
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s" >&2
  summarize
}

# ---------------------------------------------------------------- env (+ wheels)
if [ -n "${WHEELS:-}" ]; then
  SITE=$WORK/site
  step wheels 120 "$PY" - "$WHEELS" "$SITE" <<'EOF'
import subprocess, sys
from importlib import metadata
from pathlib import Path
wheels, site = Path(sys.argv[1]), sys.argv[2]
def installed(name):
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False
todo = [w for w in sorted(wheels.glob("*.whl")) if not installed(w.name.split("-")[0].replace("_", "-"))]
print("installing:", [w.name for w in todo])
if todo:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), "--no-deps",
                    "--target", site, *map(str, todo)], check=True)
EOF
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi
step env 60 "$PY" - <<'EOF'
import json, platform
from importlib import metadata
info = {"python": platform.python_version()}
for dist in ("torch", "triton", "timm", "diffusers", "safetensors", "typer", "numpy", "scipy", "onnx", "onnxruntime",
             "onnxruntime-gpu", "tensorrt", "datasets", "huggingface-hub", "pytest"):
    try:
        info[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        info[dist] = "missing"
import torch
info["torch"] = torch.__version__
info["cuda_available"] = torch.cuda.is_available()
info["torch_cuda"] = torch.version.cuda
if info["cuda_available"]:
    info["gpu"] = torch.cuda.get_device_name(0)
    info["capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
    info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
print(json.dumps(info))
EOF

# ---------------------------------------------------------------- CUDA tests
if [ -n "$CUDA_TESTS" ]; then
  # shellcheck disable=SC2086
  step cuda_tests 90 "$PY" -m pytest -q -m cuda -p no:cacheprovider -o addopts="" -rs --continue-on-collection-errors \
    $CUDA_TESTS
fi

# ---------------------------------------------------------------- training under torchrun
TW=$WORK/train
rm -rf "$TW"
# builtin:shapes at the preset's resolution and a random VAE of the preset's SD-VAE shape (a pixel
# preset: the SD-VAE layout, 8x down, 4 channels; the CPU dry run narrows it to 8-16 channels).
step train_data 90 "$PY" -c "
from reptok.bench import random_autoencoder; from reptok.config import VAEConfig; from reptok.presets import get_preset
from reptok.data.prep import prepare
p = get_preset('$TRAIN_PRESET')
prepare('builtin:shapes:$TRAIN_IMAGES', '$TW/data', resolution=p.image_size, progress=None)
random_autoencoder(VAEConfig() if p.vae.is_pixel else p.vae, 0, narrow=$CPU).save_pretrained('$TW/vae')"
step train_cache 60 needs=train_data "${GUARD[@]}" data cache-latents "$TW/data" --vae "$TW/vae" \
  --device "$DEVICE" --json
RECON=(train recon --data "$TW/data" --preset "$TRAIN_PRESET" --vae "$TW/vae" --encoder-weights random
       --steps "$TRAIN_STEPS" --batch-size "$TRAIN_BATCH" --sample-every 0 --device "$DEVICE" --json)
DYNAMO_OFF=()
[ "$CPU" = 1 ] && DYNAMO_OFF=(env TORCHDYNAMO_DISABLE=1)
step train_recon 90 needs=train_cache "${GUARD[@]}" "${RECON[@]}" --out "$TW/tok"
step train_recon_compile 120 needs=train_cache ${DYNAMO_OFF[@]+"${DYNAMO_OFF[@]}"} "${GUARD[@]}" "${RECON[@]}" \
  --out "$TW/tok_compile" --compile
step train_recon_fp16 90 needs=train_cache "${GUARD[@]}" "${RECON[@]}" --out "$TW/tok_fp16" --precision fp16
step train_extract 60 needs=train_recon "${REPTOK[@]}" extract --ckpt "$TW/tok" --data "$TW/data" \
  --out "$TW/tokens.npy" --device "$DEVICE" --json
step train_gen 90 needs=train_extract "${GUARD[@]}" train gen --tokens "$TW/tokens.npy" --out "$TW/gen" \
  --preset "$TRAIN_PRESET" --steps "$TRAIN_STEPS" --batch-size "$((TRAIN_BATCH * 2))" --device "$DEVICE" --json

# ---------------------------------------------------------------- one random run, sampled four ways
RUN=$WORK/run-$PRESET
[ -f "$RUN/config.json" ] || step make_run 120 "$PY" -c \
  "from reptok.bench import make_random_run; make_random_run('$PRESET', '$RUN')"
[ -f "$RUN/config.json" ] && RC[make_run]=0
JOB=(sample --ckpt "$RUN" --class all --seed 0 --device "$DEVICE" --json)
[ -n "$SAMPLE_STEPS" ] && JOB+=(--steps "$SAMPLE_STEPS" --decoder-steps "$SAMPLE_STEPS")
FAST=(--precision bf16 --cuda-graphs)
[ "$CPU" = 1 ] && FAST=(--precision bf16)  # no CUDA graphs on a CPU
step sample_bf16_graphs 90 needs=make_run "${REPTOK[@]}" "${JOB[@]}" "${FAST[@]}" --count "$IMAGES" --batch-size "$BATCH" \
  --out "$WORK/bf16.npz" --overwrite
step sample_compile 150 needs=make_run ${DYNAMO_OFF[@]+"${DYNAMO_OFF[@]}"} "${REPTOK[@]}" "${JOB[@]}" "${FAST[@]}" \
  --compile --count "$IMAGES" --batch-size "$BATCH" --out "$WORK/compile.npz" --overwrite
step sample_fp32 90 needs=make_run "${REPTOK[@]}" "${JOB[@]}" --no-fast --count "$FP32_IMAGES" \
  --batch-size "$FP32_IMAGES" --out "$WORK/fp32.npz" --overwrite
step sample_diff 30 needs=sample_bf16_graphs,sample_fp32 "$PY" -c "
import json, numpy as np
a = np.load('$WORK/fp32.npz')['arr_0'].astype(np.int16)
b = np.load('$WORK/bf16.npz')['arr_0'][:len(a)].astype(np.int16)
print(json.dumps({'images': len(a), 'max_abs_uint8': int(np.abs(a - b).max()), 'mean_abs_uint8': float(np.abs(a - b).mean())}))"
step sample_student 90 needs=make_run "${REPTOK[@]}" "${JOB[@]}" "${FAST[@]}" --decoder-steps "$K" \
  --count "$IMAGES" --batch-size "$BATCH" --out "$WORK/student.npz" --overwrite

# ---------------------------------------------------------------- training throughput
step throughput 240 ${DYNAMO_OFF[@]+"${DYNAMO_OFF[@]}"} "$PY" benchmarks/train_throughput.py --preset "$THROUGHPUT_PRESET" --device "$DEVICE" \
  --precision bf16 --cache --compile --stages recon --modes model,model+compile --batch-size "$THROUGHPUT_BATCH" \
  --images "$((THROUGHPUT_BATCH * 2))" --steps "$THROUGHPUT_STEPS" --json

# ---------------------------------------------------------------- the few-step decoder's training
step train_distill 90 needs=train_recon "${GUARD[@]}" train distill --ckpt "$TW/tok" --out "$TW/student" \
  --student-steps "$K" --teacher-steps 8 --steps "$TRAIN_STEPS" --batch-size "$TRAIN_BATCH" --device "$DEVICE" --json

echo "=== done in $((SECONDS - T0)) s" >&2
cat "$OUT/summary.md"

# Sourced by the GPU check scripts (gpu_check.sh, gpu_distill_check.sh) after they set OUT, WORK,
# PY and STEP_TIMEOUT: the log, steps.tsv, REPTOK and `step`.
[ -x .venv/bin/python ] && [ "$PY" = python ] && PY=.venv/bin/python

mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/log.txt") 2>&1
printf 'step\trc\tseconds\n' > "$OUT/steps.tsv"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
REPTOK=("$PY" -m reptok_cli)

step() {  # step NAME CMD... : run with a timeout, log rc and time, never abort the script
  local name=$1; shift
  echo "=== $name: $*" >&2   # stderr: a step's stdout is often a result file
  local t0=$SECONDS
  timeout "$STEP_TIMEOUT" "$@"
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$OUT/steps.tsv"
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s" >&2
  return $rc
}

#!/usr/bin/env bash
# Issue 5's accelerator checks as ONE prepared run (device time is scarce: 15 min a session,
# machine start included). Writes one JSON file per check under $OUT and prints them.
#
# Before the call, here (the H200 image lacks ml_collections and dm-pix; both are pure Python):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl \
#     "ml_collections==$(python3 -c 'import importlib.metadata as m; print(m.version("ml_collections"))')" \
#     "dm-pix==$(python3 -c 'import importlib.metadata as m; print(m.version("dm-pix"))')"
# Then: device run(command="bash benchmarks/h200_check.sh", carry=[".whl"], timeout_s=540).
#
# Checks (CIFAR-10 config, 35.7M-parameter UNet at 32x32):
#   1. local train step, bf16 compute, batch 256: images/s, FLOPs, MFU against --peak-tflops
#      (989 = H100/H200 dense bf16 datasheet) and against an 8192^3 bf16 matmul in the same run;
#   2. DDIM replay: one DDIM_STEPS-step program on DDIM_BATCH images, bf16, extrapolated to
#      DDIM-250 (labelled so); the time for 10,000 images follows from its images/s;
#   3. the same train step in float32, if time is left (for the bf16 speed-up).
# Dry run on CPU (checks the script, not the numbers):
#   CHECK_CONFIG=configs/tiny.py CHECK_BATCH=8 DDIM_BATCH=16 DDIM_STEPS=2 bash benchmarks/h200_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/h200_check}"
mkdir -p "$OUT"
CONFIG="${CHECK_CONFIG:-configs/cifar10.py}"
BATCH="${CHECK_BATCH:-256}"
DDIM_BATCH="${DDIM_BATCH:-2000}"
DDIM_STEPS="${DDIM_STEPS:-25}"
PEAK="${PEAK_TFLOPS:-989}"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
(nvidia-smi -L 2>/dev/null || true; python3 -c "import jax, flax; print(jax.__version__, flax.__version__, jax.devices())") \
  | tee "$OUT/env.txt"

check() {   # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" > "$OUT/$name.json" 2> "$OUT/$name.err"
  local rc=$?
  tail -n 1 "$OUT/$name.json"
  [ "$rc" -eq 0 ] || { echo "$name: exit $rc"; tail -n 20 "$OUT/$name.err"; }
}

check train_bf16 240 python3 benchmarks/train_step.py --config="$CONFIG" --batch="$BATCH" \
  --repeats=10 --set dtype=bfloat16 --peak-tflops="$PEAK"
check ddim_bf16 180 python3 benchmarks/sampler.py --config="$CONFIG" --batch="$DDIM_BATCH" \
  --steps="$DDIM_STEPS" --repeats=2 --set dtype=bfloat16
check train_f32 120 python3 benchmarks/train_step.py --config="$CONFIG" --batch="$BATCH" \
  --repeats=10

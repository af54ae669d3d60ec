#!/usr/bin/env bash
# The GPU check (../shared/spec/gpu-checks.md): one script, run on the lent GPU machine from the
# repository root with .device/ (made by tools/gpu-prepare.sh) beside it. Writes logs and JSON
# under $OUT (default ./gpu-out) and prints a compact table last. Never changes clocks, power
# limits, persistence or MIG, and never resets the GPU.
set -uo pipefail
cd "$(dirname "$0")/.." 2>/dev/null || true
[ -d .device ] || cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"
DEV=.device
declare -a SUMMARY

step() { # name, timeout seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "==> $name"
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  tail -n 40 "$OUT/$name.log"
  SUMMARY+=("| $name | $([ $rc -eq 0 ] && echo ok || echo "FAILED (rc $rc)") | ${dt}s |")
}

echo "==> versions" | tee "$OUT/versions.log"
{
  nvidia-smi || true
  nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv || true
  echo "--- libraries the loader can find"
  ldconfig -p | grep -E 'libcuda\.so|libnvrtc|libcublas' || true
  ls -1 /usr/local/cuda*/lib64/libnvrtc* /usr/local/cuda*/lib64/libcublas* 2>/dev/null || true
  python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null || true
  nvcc --version 2>/dev/null | tail -2 || true
} >>"$OUT/versions.log" 2>&1
cat "$OUT/versions.log"

# cudarc loads libnvrtc/libcublas at run time: put the toolkit's libraries on the path.
for d in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/local/cuda-12*/lib64; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export APPARATE_CACHE_DIR="$OUT/cache"

mkdir -p "$OUT/bin"
for f in "$DEV"/bin/*.gz; do gunzip -c "$f" >"$OUT/bin/$(basename "$f" .gz)"; chmod +x "$OUT/bin/$(basename "$f" .gz)"; done

export APPARATE_WEIGHTS="$DEV" APPARATE_GPU_MODEL=minilm-l6-intent-f16.apparate
step probe-and-cuda-unit-tests 120 "$OUT/bin/lib_tests" backend::cuda --nocapture --test-threads 1
step kernel-parity 180 "$OUT/bin/op_parity" --nocapture --test-threads 1
step minilm-on-gpu 180 "$OUT/bin/golden_minilm" real_gpu --nocapture
step kernel-bench 240 "$OUT/bin/kernels_bench" --device cuda --model "$DEV/minilm-l6-intent-f16.apparate" --out "$OUT"

echo
echo "| step | result | time |"
echo "|---|---|---|"
printf '%s\n' "${SUMMARY[@]}"
grep -h '^| cuda' "$OUT/kernel-bench.log" 2>/dev/null || true

#!/usr/bin/env bash
# The GPU check: one script, run on the lent GPU machine (H200, driver 580 / CUDA 13.0, no Rust,
# no network) from the repository root with .device/ (made by tools/gpu-prepare.sh) beside it:
#   run(command="bash tools/gpu-check.sh", carry=[".device"], timeout_s=595)
#
# - Step time limits add up to BUDGET_S (582 s, under the timeout_s above, so the summary is
#   always written); the budget is printed first and every step is killed at its limit. A
#   whole run took 123 s on 2026-11-30 (before the serving steps). Each step's log is added to
#   $OUT/steps.log and $OUT/summary.md rewritten as soon as the step ends, so a run cut short
#   still brings back what it did.
# - .device must have been made from this very tree: tools/gpu-prepare.sh records a sha256 of
#   the sources it built from, and the script stops at once if the tree here differs.
# - Step `compile` builds every kernel source for the GPU once (`apparate devices --compile`,
#   NVRTC in parallel, into the module cache of this run) and reports the time per source;
#   every later process reads the cache. The cache starts as the one tools/gpu-prepare.sh
#   filled with this machine's NVRTC release for sm_90a (.device/module-cache.tar.xz), so the
#   step normally only reads it ("18 from the cache"); with another NVRTC release here the
#   keys differ and NVRTC compiles every source, as without it. If it fails (this machine's
#   NVRTC rejects a source, or it runs past its limit) it is tried once more without the Hopper
#   GEMMs' sources (the newest, needed by no default path; APPARATE_CUDA_SKIP_SOURCES), whose
#   steps are then skipped; if that fails too, nothing after it could run and the script
#   stops.
# - Binaries, the model and the NVRTC module cache go to a `mktemp -d` directory, removed at
#   exit. Eight files go to $OUT (default ./gpu-out; the device tool brings back 8 at most):
#   steps.log (every step's whole log, in order), summary.md, kernels.json, torch-ref.json,
#   profile.csv, serve-plain.json, serve-ramps.json, serve-eager.json. (The Hopper, decoder and
#   BERT-base benchmarks' JSON stays behind: their rows are in steps.log and summary.md.)
# - GPU_CHECK_ONLY=op-parity,kernel-bench,... runs only the named steps (a rerun after a fix)
#   besides probe and compile, which always run; the others are listed as skipped.
# - Fails fast: no NVIDIA driver library, no NVRTC, or a binary that cannot load (`ldd` on each
#   one before anything runs) stops the script with a message that says which.
# - The GPU tests are #[ignore]d (a machine without a GPU reports them ignored); they run here
#   with --ignored. Kernels are compiled at start-up for the device's own architecture (sm_90a
#   on compute capability 9.0) with the NVRTC found here, to a cubin.
# - Never changes clocks, power limits, persistence or MIG, and never resets the GPU.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"
DEV=${APPARATE_DEVICE_DIR:-.device}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/apparate-gpu.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT

# name:seconds, in order. The sum is the budget.
# Limits are several times what each step took on 2026-11-30 (summary tables in docs/bench/),
# except `compile`, sized from here: it normally reads the carried module cache (a second),
# and only if this machine's NVRTC is another release does it compile, in parallel, so the
# slowest source is the step (16-31 s for sm_90a on a 2-core build machine, 61 s on a slow
# day); every later step reads its cache. `compile-again` runs only if `compile` failed, and
# without the two slowest sources. torch-ref took 21-30 s for MiniLM alone; BERT-base is new;
# kernel-bench gained BERT-base's GEMM shapes and larger, 5-launch row rows (session 20).
# Most valuable first: correctness, serving, then the speed of what no run has timed yet
# (Hopper GEMMs, decode), the kernel benchmark
# (much of it re-measures run 6), the profile, and last the peer's numbers (taken twice).
STEPS=(versions:8 unpack:10 probe:10 compile:70 compile-again:40 cuda-unit:20 selftest:15
  op-parity:35 wgmma-parity:12 tma-parity:12 decoder-parity:20 cnn:20 minilm:20 serve-plain:20
  serve-ramps:20 serve-eager:20 wgmma-bench:20 decode-bench:25 encoder-bench:25 kernel-bench:85
  profile:35 torch-ref:40)
BUDGET_S=0
for s in "${STEPS[@]}"; do BUDGET_S=$((BUDGET_S + ${s#*:})); done
limit_of() { local s; for s in "${STEPS[@]}"; do [ "${s%%:*}" = "$1" ] && echo "${s#*:}"; done; }
echo "==> budget: ${BUDGET_S} s in ${#STEPS[@]} steps (${STEPS[*]}); scratch $WORK; logs $OUT"
T_START=$(date +%s)
LOGS=$WORK/logs
mkdir -p "$LOGS"
ONLY=",${GPU_CHECK_ONLY:-},"
: >"$OUT/steps.log"
# A step's whole log onto $OUT/steps.log, as soon as the step ends.
flush_log() { # name
  { echo "==================== $1"; cat "$LOGS/$1.log" 2>/dev/null; } >>"$OUT/steps.log"
}
# The benchmark rows of a log: its final table, or (a run killed at its limit) the rows it
# printed as it measured them.
bench_rows() { # log
  [ -f "$1" ] || return 0
  grep -h '^| cuda' "$1" || sed -n 's/^measured: \(| cuda.*\)$/\1/p' "$1"
}

declare -a SUMMARY
record() { # name, result, seconds, note
  SUMMARY+=("$(printf '| %-12s | %-22s | %4ss | %s |' "$1" "$2" "$3" "$4")")
}
# Runs a step under its limit with its log in $OUT; prints the log's tail.
step() { # name, command...
  local name=$1 limit rc t0 dt result note
  shift
  limit=$(limit_of "$name")
  [ -n "$limit" ] || die "step $name has no time limit in STEPS"
  if [ "$ONLY" != ",," ] && [[ $ONLY != *",$name,"* ]] && [[ $name != probe && $name != compile* ]]; then
    record "$name" skipped 0 "not in GPU_CHECK_ONLY"
    return 0
  fi
  if [ -n "${SKIP_WHY[$name]:-}" ]; then
    record "$name" skipped 0 "${SKIP_WHY[$name]}"
    return 0
  fi
  echo "==> $name (limit ${limit} s)"
  t0=$(date +%s)
  timeout -k 5 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  dt=$(($(date +%s) - t0))
  tail -n 25 "$LOGS/$name.log"
  case $rc in
    0) result=ok ;;
    124 | 137) result="TIMED OUT (${limit} s)" ;;
    *) result="FAILED (rc $rc)" ;;
  esac
  # libtest's own count line, when the step ran tests.
  note=$(grep -E '^test result:' "$LOGS/$name.log" |
    sed -E 's/.* ([0-9]+) passed; ([0-9]+) failed; ([0-9]+) ignored.*/\1 passed, \2 failed, \3 ignored/' |
    paste -sd';' -)
  record "$name" "$result" "$dt" "${note:-}"
  flush_log "$name"
  summary >"$OUT/summary.md"
  return $rc
}
# The table of steps, the serving lines and the benchmark rows so far.
summary() {
  local s
  echo
  echo "| step         | result                 | time  | tests |"
  echo "|--------------|------------------------|-------|-------|"
  printf '%s\n' "${SUMMARY[@]}"
  echo "total $(($(date +%s) - T_START)) s of a ${BUDGET_S} s budget"
  for s in serve-plain serve-ramps serve-eager; do
    grep -hE 'requests in|end to end|released at|agreement with|graphs:' "$LOGS/$s.log" 2>/dev/null |
      sed "s/^/$s: /" || true
  done
  for s in wgmma-bench decode-bench encoder-bench kernel-bench; do bench_rows "$LOGS/$s.log"; done
  grep -h '^decode graphs' "$LOGS/decode-bench.log" 2>/dev/null || true
  grep -h '^| torch' "$LOGS/torch-ref.log" 2>/dev/null || true
}
finish() { # exit status
  summary | tee "$OUT/summary.md"
  exit "$1"
}
die() { # message
  echo "error: $*" | tee -a "$OUT/steps.log" >&2
  record stopped "in ${CURRENT:-setup}" 0 "$*"
  finish 1
}
declare -A SKIP_WHY=()

# ---- 1. versions, and where the CUDA libraries are --------------------------------------------
CURRENT=versions
# Library folders that may hold libnvrtc / libcublas: the machine's toolkit first (its NVRTC
# matches its driver), then Python wheels (PyTorch's nvidia/*/lib). The NVRTC this repo fetches
# from PyPI (tools/fetch-cuda-tools.sh, about 100 MB) does not fit the 64 MiB carry.
lib_dirs() {
  local d
  for d in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/local/cuda-12*/lib64 \
    /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && echo "$d"
  done
  timeout 2 python3 - 2>/dev/null <<'EOF' || true
import glob, os, sys
for p in sys.path:
    for d in sorted(glob.glob(os.path.join(p, "nvidia", "*", "lib"))):
        print(d)
EOF
}
{
  echo "date: $(date -u +%FT%TZ)"
  timeout 5 nvidia-smi || echo "nvidia-smi: not found or failed"
  timeout 5 nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,clocks.sm,clocks.max.sm \
    --format=csv 2>/dev/null || true
  echo "--- libraries the loader knows"
  ldconfig -p 2>/dev/null | grep -E 'libcuda\.so|libnvrtc|libcublas' || echo "(none in the ldconfig cache)"
  echo "--- library folders searched"
  lib_dirs | while read -r d; do
    echo "$d: $(cd "$d" && ls -1 libnvrtc.so* libcublas.so* 2>/dev/null | paste -sd' ' -)"
  done
  timeout 3 nvcc --version 2>/dev/null | tail -2 || true
} >"$LOGS/versions.log" 2>&1
cat "$LOGS/versions.log"

# cudarc opens these by name at run time: put every folder that has one on the path, in the
# order above, so the first NVRTC found is the one listed first.
NVRTC_DIR=""
while read -r d; do
  if compgen -G "$d/libnvrtc.so*" >/dev/null || compgen -G "$d/libcublas.so*" >/dev/null; then
    export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
    [ -z "$NVRTC_DIR" ] && compgen -G "$d/libnvrtc.so*" >/dev/null && NVRTC_DIR=$d
  fi
done < <(lib_dirs)
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}" | tee -a "$LOGS/versions.log"
flush_log versions
CURRENT=libraries

# Whether the loader can find a library by this name pattern (the ldconfig cache, the library
# path, the usual driver folders).
have_lib() {
  local d
  ldconfig -p 2>/dev/null | grep -q "$1" && return 0
  local path=${LD_LIBRARY_PATH:-}
  for d in ${path//:/ } /usr/lib64 /usr/lib/x86_64-linux-gnu /usr/local/nvidia/lib64; do
    compgen -G "$d/$1*" >/dev/null && return 0
  done
  return 1
}
have_lib libcuda.so.1 ||
  die "no NVIDIA driver library (libcuda.so.1): this machine has no GPU driver, nothing to check"
have_lib libnvrtc.so ||
  die "no NVRTC library (libnvrtc.so.*) in the folders above, the library path or the ldconfig cache"
record versions ok "$(($(date +%s) - T_START))" "NVRTC from ${NVRTC_DIR:-the library path}"

# ---- 2. binaries: unpack to the scratch folder, check each one loads --------------------------
CURRENT=unpack
[ -d "$DEV/bin" ] || die "$DEV/bin is missing: run tools/gpu-prepare.sh and carry .device"
# The binaries must come from this tree: the same files, hashed as tools/gpu-prepare.sh did.
[ -f "$DEV/source.files" ] && [ -f "$DEV/source.sha256" ] ||
  die "$DEV has no source stamp (source.files, source.sha256): run tools/gpu-prepare.sh again"
here=$(tr '\n' '\0' <"$DEV/source.files" | xargs -0 sha256sum 2>&1 | sha256sum | cut -d' ' -f1)
[ "$here" = "$(cat "$DEV/source.sha256")" ] ||
  die "$DEV was built from other sources than this tree (sha256 $(cat "$DEV/source.sha256"), here $here): run tools/gpu-prepare.sh again"
t0=$(date +%s)
mkdir -p "$WORK/bin" "$WORK/cache"
# xz, or Python's lzma where the machine has no xz.
unxz_to() { # source, destination
  if command -v xz >/dev/null; then
    xz -dc "$1" >"$2"
  else
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2"
  fi
}
for f in "$DEV"/bin/*.xz; do
  [ -e "$f" ] || die "no binaries in $DEV/bin"
  b="$WORK/bin/$(basename "$f" .xz)"
  unxz_to "$f" "$b" && chmod +x "$b" || die "cannot unpack $f"
done
mkdir -p "$WORK/weights"
# The model travels as two byte planes (tools/byteplanes.py: xz packs f16 weights tighter so).
unxz_to "$DEV/minilm-l6-intent-f16.apparate.planes.xz" "$WORK/model.planes" &&
  python3 tools/byteplanes.py join "$WORK/model.planes" "$WORK/weights/minilm-l6-intent-f16.apparate" &&
  rm "$WORK/model.planes" ||
  die "cannot unpack $DEV/minilm-l6-intent-f16.apparate.planes.xz"
# The serving check's stream and ramps.
for f in stream.txt minilm-l6-intent-f16.ramps; do
  unxz_to "$DEV/$f.xz" "$WORK/$f" || die "cannot unpack $DEV/$f.xz"
done
# The module cache tools/gpu-prepare.sh filled with this machine's NVRTC release (13.0.88 when
# last seen) for sm_90a: step `compile` reads it, or compiles what it lacks (another NVRTC
# major.minor release here: every source).
prebuilt="no module cache carried"
if [ -f "$DEV/module-cache.tar.xz" ]; then
  if command -v xz >/dev/null; then
    xz -dc "$DEV/module-cache.tar.xz" | tar -x -C "$WORK/cache"
  else
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2], filter="data")' \
      "$DEV/module-cache.tar.xz" "$WORK/cache"
  fi || die "cannot unpack $DEV/module-cache.tar.xz"
  prebuilt="$(ls "$WORK/cache/nvrtc" | wc -l) modules in the carried cache"
fi
for b in "$WORK"/bin/*; do
  if ! missing=$(ldd "$b" 2>&1) || echo "$missing" | grep -qE 'not found|not a dynamic'; then
    echo "$missing" >>"$OUT/steps.log"
    die "$(basename "$b") cannot load here: $(echo "$missing" | grep -E 'not found|version|not a dynamic' | head -3 | tr '\n' ' ')"
  fi
done
record unpack ok $(($(date +%s) - t0)) "$(ls "$WORK/bin" | paste -sd' ' -); $prebuilt"
BIN=$WORK/bin
export APPARATE_CACHE_DIR="$WORK/cache" APPARATE_WEIGHTS="$WORK/weights" \
  APPARATE_GPU_MODEL=minilm-l6-intent-f16.apparate RUST_BACKTRACE=1

# ---- 3. the steps ------------------------------------------------------------------------------
# Probe: cuDriverGetVersion, the NVRTC version, the device (what `apparate devices` prints).
CURRENT=probe
step probe "$BIN/apparate" devices
grep -q '^cuda  available' "$LOGS/probe.log" || die "the CUDA backend is unavailable: $(grep '^cuda' "$LOGS/probe.log")"
# Every kernel source compiled once for this GPU with this machine's NVRTC (in parallel), into
# the run's module cache, or read from what was carried; the log lists the time per source,
# slowest first, and which came from the cache.
CURRENT=compile
if ! step compile "$BIN/apparate" devices --compile; then
  # Once more without the Hopper GEMMs (the newest sources, on no default path), so that the
  # rest still runs; their steps are skipped.
  export APPARATE_CUDA_SKIP_SOURCES=gemm_wgmma.cu,gemm_wgmma_tma.cu
  CURRENT=compile-again
  step compile-again "$BIN/apparate" devices --compile ||
    die "the kernels did not compile for this GPU (steps compile, compile-again): see steps.log"
  for s in wgmma-parity tma-parity wgmma-bench; do
    SKIP_WHY[$s]="Hopper GEMM sources left out (step compile failed)"
  done
else
  record compile-again skipped 0 "compile passed"
fi

# The cuda module's own tests (NVRTC, cache, device round trip, the async release ordering),
# then the self-test kernels (barrier, warp shuffles and votes, tensor-core fragments).
# Not `nvrtc_compiles_every_source`: it compiles every source again, for plain sm_90 (CI runs it
# with its own NVRTC); the compile step above covered this machine's NVRTC for sm_90a.
step cuda-unit "$BIN/lib_tests" --include-ignored --test-threads 1 backend::cuda:: --skip gpu_selftest \
  --skip nvrtc_compiles_every_source
step selftest "$BIN/lib_tests" --ignored --test-threads 1 gpu_selftest
# Every op on `cuda` against the CPU backend, then MiniLM end to end. The Hopper GEMM (new to
# the hardware) in a process of its own, so a fault in it cannot hide the other results.
step op-parity "$BIN/op_parity" --ignored --test-threads 1 --skip wgmma
step wgmma-parity "$BIN/op_parity" --ignored --test-threads 1 --exact wgmma_gemm_on_a_real_gpu
# Its TMA form (tensor maps from the driver, tensor copies): the first of our kernels to use
# them, so a process of its own too.
step tma-parity "$BIN/op_parity" --ignored --test-threads 1 --exact wgmma_tma_gemm_on_a_real_gpu
step decoder-parity "$BIN/decoder_parity" --ignored --test-threads 1
# ResNet-18/50 and VGG-11 (torchvision's logits, generated weights) in f32/f16/bf16.
step cnn "$BIN/golden_cnn" --ignored --test-threads 1
step minilm "$BIN/golden_minilm" --ignored --test-threads 1
# The serving engine on cuda, as a user runs it: MiniLM (f16) + intent head answering 6000
# tweets at an open-loop 2000/s (Poisson), batches of up to 16; first the plain model, then
# with the ramps trained by tools/gpu-prepare.sh, answers released at a ramp while their batch
# runs on; both with each stage replayed as a CUDA graph per batch and sequence size (the
# default), then the ramps again with graphs off. Latency percentiles, exits and agreement go
# to the log and $OUT/serve-*.json.
SERVE=(--model "$WORK/weights/minilm-l6-intent-f16.apparate" --data "$WORK/stream.txt"
  --backend cuda --dtype f16 --rate 2000 --limit 6000 --quiet)
step serve-plain "$BIN/apparate" serve-replay "${SERVE[@]}" --json "$OUT/serve-plain.json"
step serve-ramps "$BIN/apparate" serve-replay "${SERVE[@]}" --ramps "$WORK/minilm-l6-intent-f16.ramps" \
  --json "$OUT/serve-ramps.json"
step serve-eager env APPARATE_GPU_GRAPHS=off "$BIN/apparate" serve-replay "${SERVE[@]}" \
  --ramps "$WORK/minilm-l6-intent-f16.ramps" --json "$OUT/serve-eager.json"
# The Hopper GEMMs alone (plain, warp-specialised, TMA), beside split-K and cuBLAS, and a MiniLM
# forward with each (f16; a process of its own, as above).
step wgmma-bench "$BIN/kernels_bench" --device cuda --only wgmma --dtype f16 --repeats 10 \
  --model "$WORK/weights/minilm-l6-intent-f16.apparate" --out "$WORK/wgmma"
# The decoder on cuda (random weights, TinyLlama's blocks): decode steps eager with each
# attention kernel and graphed, at 1, 8 and 32 sequences.
step decode-bench "$BIN/kernels_bench" --device cuda --only decode --dtype f16 --repeats 10 \
  --out "$WORK/decode"
# End to end at BERT-base's size (12 layers, width 768; random weights written by the
# benchmark, f16): the simple and the default kernels, eager and as one CUDA graph, at batch
# 1/8/32 x 128, for the peer's BERT-base rows in torch-ref.
step encoder-bench "$BIN/kernels_bench" --device cuda --only encoder --dtype f16 --repeats 10 \
  --out "$WORK/encoder"
# Every kernel group beside its reference (cuBLAS, the copies), and the MiniLM forward with each
# kernel set; rows printed as measured, JSON to $OUT/kernels.json.
step kernel-bench "$BIN/kernels_bench" --device cuda --repeats 10 --only gemm,attention,rows,conv,minilm \
  --model "$WORK/weights/minilm-l6-intent-f16.apparate" --out "$OUT"
# Why the GEMMs run at the speed they do: Nsight Compute's sections (speed of light, occupancy,
# warp stall reasons, pipe use, shared-memory bank conflicts) for our GEMM kernels and cuBLAS's
# at 4096^3 and at MiniLM's FFN down at batch 8 (1024 x 384 x 1536: split-K and its reduction),
# f16, each launched twice (warm-up and one timed), as CSV; clocks left alone. The Hopper kernels
# only where both their parity steps passed: a fault under the profiler would lose the rest.
# (The MiniLM forward's kernel durations were profiled in runs 2 and 4: docs/bench/.)
passed() { printf '%s\n' "${SUMMARY[@]}" | grep -qE "^\| $1 +\| ok "; }
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)
if [ -n "$NCU" ]; then
  # The sections this ncu has, of those wanted; its `detailed` set if it names none of them.
  have=$(timeout 10 "$NCU" --list-sections 2>/dev/null || true)
  SECTIONS=()
  for s in SpeedOfLight Occupancy LaunchStats WarpStateStats SchedulerStats \
    ComputeWorkloadAnalysis MemoryWorkloadAnalysis_Tables; do
    grep -qw -- "$s" <<<"$have" && SECTIONS+=(--section "$s")
  done
  [ ${#SECTIONS[@]} -gt 0 ] || SECTIONS=(--set detailed)
  groups=gemm
  passed wgmma-parity && passed tma-parity && groups=gemm,wgmma
  step profile "$NCU" --clock-control none "${SECTIONS[@]}" --csv --page details \
    --kernel-name "regex:^(gemm_(pipe|wgmma|splitk)|nvjet|sm90|xmma|cutlass)" --launch-count 32 \
    --log-file "$OUT/profile.csv" \
    "$BIN/kernels_bench" --device cuda --only "$groups" --dtype f16 --launches 1 --repeats 1 \
    --gemm-shapes 4096x4096x4096,1024x384x1536 --batches none --out "$WORK/profile"
else
  record profile skipped 0 "no ncu on this machine"
fi

# The peer: PyTorch eager on a MiniLM-shaped BERT (f16/bf16, eager and sdpa attention).
step torch-ref env PYTHONUNBUFFERED=1 python3 tools/gpu_torch_ref.py --out "$OUT/torch-ref.json"
failed=0
for line in "${SUMMARY[@]}"; do
  case $line in *FAILED* | *"TIMED OUT"*) failed=1 ;; esac
done
finish $failed

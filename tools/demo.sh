#!/usr/bin/env bash
# The demo: on a fresh machine, fetch the real models and workload streams (first run: a few
# minutes), train the ramps and measure a profile if they are missing, then replay the vision
# workload (the MNIST ResNet at 30 frames/s, with a drift halfway) through the plain model and
# through Apparate, 30 s each, and print them side by side.
#   tools/demo.sh            the vision workload
#   tools/demo.sh language   MiniLM tweet sentiment with bursty arrivals
# Full comparisons (static early exits, oracle): cargo bench --bench serving -- --workload ...
set -euo pipefail
cd "$(dirname "$0")/.."
WORKLOAD=${1:-vision}
case "$WORKLOAD" in vision | language) ;; *) echo "usage: tools/demo.sh [vision|language]" >&2; exit 2 ;; esac
if [ ! -f weights/mnist-resnet.apparate ] || [ ! -f weights/minilm-l6-sentiment.apparate ] ||
   [ ! -f workloads/mnist-stream.safetensors ] || [ ! -f workloads/tweets.txt ]; then
  bash weights/fetch.sh
fi
echo "== building the benchmark (release)"
cargo bench --bench serving --no-run --quiet 2>/dev/null || cargo bench --bench serving --no-run
echo "== replaying the $WORKLOAD workload: vanilla, then Apparate (30 s each)"
cargo bench --quiet --bench serving -- --workload "$WORKLOAD" --seconds 30 --systems vanilla,apparate

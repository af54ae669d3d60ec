#!/usr/bin/env bash
# The demo: on a fresh machine, fetch the real models and workload streams (first run: a few
# minutes), train the ramps and measure a profile if they are missing, measure what the plain
# model serves on this machine (capacity, closed loop, a few seconds), then replay a workload
# through the plain model and through Apparate, 30 s each, and print them side by side.
#   tools/demo.sh              MNIST ResNet at 30 frames/s with a drift halfway (mnist-drift)
#   tools/demo.sh tweets       MiniLM tweet sentiment with bursty arrivals
#   tools/demo.sh video|movies|news   EfficientNet-Lite0 on video clips, movie reviews, news
# The offered load is a share of the measured capacity (printed: "capacity X/s measured,
# offering Y/s (share Z)"), so a slower machine gets a lighter load instead of a queue that
# grows for the whole run; LOAD=0.3 tools/demo.sh tweets picks another share.
# Full comparisons (paper mode, static early exits, oracle): cargo bench --bench serving --
# --workload ...; every workload: tools/bench-all.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKLOAD=${1:-mnist-drift}
case "$WORKLOAD" in
  mnist-drift | vision) NEEDS="weights/mnist-resnet.apparate workloads/mnist-stream.safetensors" ;;
  tweets | language) NEEDS="weights/minilm-l6-sentiment.apparate workloads/tweets.txt" ;;
  video) NEEDS="weights/efficientnet-lite0.apparate workloads/video workloads/video.json" ;;
  movies) NEEDS="weights/minilm-l6-movies.apparate workloads/movies.txt" ;;
  news) NEEDS="weights/minilm-l6-news.apparate workloads/news.txt" ;;
  *) echo "usage: tools/demo.sh [mnist-drift|video|tweets|movies|news]" >&2; exit 2 ;;
esac
for f in $NEEDS; do
  if [ ! -e "$f" ]; then
    bash weights/fetch.sh
    break
  fi
done
LOAD_ARGS=()
[ -n "${LOAD:-}" ] && LOAD_ARGS=(--load "$LOAD")
echo "== building the benchmark (release)"
cargo bench --bench serving --no-run --quiet 2>/dev/null || cargo bench --bench serving --no-run
echo "== replaying the $WORKLOAD workload: vanilla and Apparate (30 s each, interleaved in 15 s slices), at a share of this machine's capacity"
cargo bench --quiet --bench serving -- --workload "$WORKLOAD" --seconds 30 --systems vanilla,apparate "${LOAD_ARGS[@]}"

#!/usr/bin/env bash
# A tour of the CLI: fetch and convert the real models (first run only takes a minute or
# two), then classify a few sentences, embed one and classify three photos, with timings.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f weights/minilm-l6-intent.apparate ] || [ ! -f weights/minilm-l6.apparate ] ||
   [ ! -f weights/efficientnet-lite0.apparate ]; then
  bash weights/fetch.sh
else
  cargo build --release --quiet --bin apparate
fi
CLI=target/release/apparate
echo "== apparate inspect weights/minilm-l6-intent.apparate"
"$CLI" inspect weights/minilm-l6-intent.apparate
echo
echo "== apparate classify (157 intents, cpu backend)"
"$CLI" classify -m weights/minilm-l6-intent.apparate \
  "what's the weather going to be like in paris tomorrow" \
  "set a timer for ten minutes" \
  "please transfer 200 dollars from checking to savings" \
  "translate good morning into spanish" \
  "my card was stolen, freeze it right now" \
  "how many calories are in an avocado"
echo
echo "== apparate embed"
"$CLI" embed -m weights/minilm-l6.apparate "Apparate releases early answers while the batch runs on."
echo
# Whole photos: the model's own preprocessing resizes (shorter side 256) and crops (224) them.
# (The 224x224 crops beside them would be resized to 256 and cropped again.)
echo "== apparate classify (EfficientNet-Lite0, ImageNet; three scikit-image photos)"
"$CLI" classify -m weights/efficientnet-lite0.apparate --top 3 \
  tests/fixtures/efficientnet/photos/{chelsea,coffee,astronaut}.png

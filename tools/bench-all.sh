#!/usr/bin/env bash
# Every serving workload, side by side in one process per run: three seeds each (vanilla,
# apparate, apparate-paper, the static baselines, oracle, vanilla-again), then the ablation once
# per workload (apparate with each live part switched off). The JSON, plots and one log per run
# land in target/bench-results/ (serving-<workload>[-ablation]-seed<N>.json, logs/).
#
# Run time: each run loads the stream and passes the bootstrap set through the model for the
# static baselines, measures the plain model's capacity (4 s), then per system starts an engine
# (the adaptive ones pass the bootstrap set through the model again) and replays RUN_SECONDS.
# Timed on tweets (the largest bootstrap set, 2,923 texts) on a busy 2-core machine: about 80 s
# of set-up and about 70 s of engine start per adaptive system, so with the default 60 s a run
# of 7 systems takes about 11 minutes and the ablation (5 adaptive systems) about 13. The other
# workloads have smaller bootstrap sets. 20 runs in all: plan for 3 to 4 hours (extrapolated
# from those parts, not a timed full run). Missing ramps and profiles are made on the first run
# of a workload (minutes more).
# Environment: WORKLOADS (default: all five), SEEDS (default "1 2 3"), RUN_SECONDS (default 60),
# ABLATION_SEED (default 1; empty skips the ablation), LOAD (default: the benchmark's --load).
# Needs weights/fetch.sh. Exits nonzero if any run failed (the others still run).
set -uo pipefail
cd "$(dirname "$0")/.."
WORKLOADS=${WORKLOADS:-mnist-drift video tweets movies news}
SEEDS=${SEEDS:-1 2 3}
SECONDS_PER_RUN=${RUN_SECONDS:-60}
ABLATION_SEED=${ABLATION_SEED-1}
OUT=target/bench-results
mkdir -p "$OUT/logs"
EXTRA=()
[ -n "${LOAD:-}" ] && EXTRA+=(--load "$LOAD")

echo "== building the serving benchmark (release)"
cargo bench --bench serving --no-run --quiet || exit 1

failed=()
bench() { # name, then the benchmark's arguments
  local name=$1
  shift
  echo "== $name ($(date -u +%H:%M:%S) UTC)"
  if cargo bench --quiet --bench serving -- --out "$OUT" --seconds "$SECONDS_PER_RUN" "${EXTRA[@]}" "$@" \
    2>&1 | tee "$OUT/logs/$name.log"; then
    :
  else
    failed+=("$name")
  fi
}

for w in $WORKLOADS; do
  for s in $SEEDS; do
    bench "$w-seed$s" --workload "$w" --seed "$s"
  done
  if [ -n "$ABLATION_SEED" ]; then
    bench "$w-ablation-seed$ABLATION_SEED" --workload "$w" --seed "$ABLATION_SEED" --ablation
  fi
done

echo "== results in $OUT:"
ls -1 "$OUT"/serving-*.json 2>/dev/null
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]} (logs in $OUT/logs/)" >&2
  exit 1
fi

#!/usr/bin/env bash
# What the HTTP layer of `apparate serve` costs under open-loop load: at each rate, the same
# model, text and batching are driven (1) in process by `apparate serve-replay` and (2) over
# loopback HTTP by oha, an existing load tool (https://github.com/hatoo/oha) at a fixed rate with
# its latency correction (latency from each request's scheduled send time, so a slow server
# cannot slow the load down); the two alternate, ROUNDS times. Throughput and p50/p90/p99 go to
# docs/bench/serve-load-*.json and a table on standard output. Above the engine's capacity the
# queue overflows on both sides (serve-replay rejects, the server answers 429 at once): compare
# throughput there, not latency (oha's percentiles then include the fast 429s).
#
#   cargo install oha --locked --root tools/.oha     # once (or OHA=path/to/oha)
#   RATES="40 80 110" SECONDS_EACH=30 ROUNDS=2 tools/load-test.sh
#
# The model is the plain MiniLM sentiment model (no ramps: both sides compute every request to
# the end, so what differs is the transport), one tweet of median length repeated. oha and the
# server share the machine's cores: on a 2-core VM the load tool's own CPU time is part of what
# the HTTP side pays.
set -euo pipefail
cd "$(dirname "$0")/.."

RATES=${RATES:-"40 80 110"}
SECONDS_EACH=${SECONDS_EACH:-30}
ROUNDS=${ROUNDS:-2}
THREADS=${THREADS:-2}
MODEL=${MODEL:-weights/minilm-l6-sentiment.apparate}
OHA=${OHA:-tools/.oha/bin/oha}
OUT=${OUT:-docs/bench}
PORT=${PORT:-18700}
# Extra flags for `apparate serve` (e.g. "--http-threads 1"), recorded in the JSON.
SERVE_ARGS=${SERVE_ARGS:-}
BIN=target/release/apparate

[ -x "$OHA" ] || { echo "no oha at $OHA: cargo install oha --locked --root tools/.oha" >&2; exit 1; }
[ -f "$MODEL" ] || { echo "no $MODEL: run weights/fetch.sh" >&2; exit 1; }
cargo build --release --bin apparate >&2

work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
# Line 107 of the tweet stream: 109 characters, the median of its first 2,000.
text=$(sed -n 107p workloads/tweets.txt)
body=$(python3 -c 'import json,sys; print(json.dumps({"inputs":[{"name":"text","shape":[1],"datatype":"BYTES","data":[sys.argv[1]]}]}))' "$text")
cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
stamp=$(date -u +%Y%m%dT%H%M%SZ)

for round in $(seq 1 "$ROUNDS"); do
  for rate in $RATES; do
    n=$(python3 -c "print(int($rate * $SECONDS_EACH))")
    # serve-replay replays the stream after its bootstrap share (0.1 by default; no ramps here,
    # so nothing is placed): give it n requests after that share.
    total=$(python3 -c "print(int($n / 0.9) + 1)")
    python3 -c 'import sys; open(sys.argv[1], "w").write((sys.argv[2] + "\n") * int(sys.argv[3]))' \
      "$work/stream.txt" "$text" "$total"
    echo "round $round, $rate/s: serve-replay ($n requests)" >&2
    "$BIN" serve-replay -m "$MODEL" --data "$work/stream.txt" --rate "$rate" --arrivals uniform \
      --threads "$THREADS" --quiet --json "$work/replay-$round-$rate.json" >/dev/null 2>&1

    echo "round $round, $rate/s: apparate serve + oha ($n requests)" >&2
    "$BIN" serve -m "$MODEL" --name m --addr "127.0.0.1:$PORT" --grpc-addr off \
      --threads "$THREADS" $SERVE_ARGS 2>"$work/serve.log" &
    server=$!
    for _ in $(seq 1 200); do
      curl -sf "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null 2>&1 && break
      sleep 0.1
    done
    # Enough connections that none waits for another's answer (rate x worst latency).
    "$OHA" -q "$rate" -n "$n" -c 256 --latency-correction --no-tui --output-format json \
      -m POST -T application/json -d "$body" "http://127.0.0.1:$PORT/v2/models/m/infer" \
      > "$work/oha-$round-$rate.json"
    kill -TERM "$server"; wait "$server" || true
  done
done

python3 - "$work" "$OUT" "$stamp" "$cpu" "$RATES" "$ROUNDS" "$SECONDS_EACH" "$SERVE_ARGS" "$text" <<'EOF'
import json, os, sys
work, out, stamp, cpu, rates, rounds, secs, serve_args, text = sys.argv[1:]
rows = []
for r in range(1, int(rounds) + 1):
    for rate in rates.split():
        rep = json.load(open(f"{work}/replay-{r}-{rate}.json"))
        oha = json.load(open(f"{work}/oha-{r}-{rate}.json"))
        e = rep["end_to_end"]
        pct = oha["latencyPercentiles"]
        codes = oha.get("statusCodeDistribution", {})
        rows.append({
            "round": r, "rate": float(rate),
            "replay": {"throughput": rep["throughput"], "answered": rep["answered"],
                       "rejected": rep["rejected"], "p50_ms": e["p50_ms"], "p90_ms": e["p90_ms"],
                       "p99_ms": e["p99_ms"]},
            # Answers per second: 200s only (over capacity, 429s come back fast and are not
            # throughput), over the run's whole time.
            "http": {"throughput": codes.get("200", 0) / oha["summary"]["total"],
                     "ok": codes.get("200", 0), "status_codes": codes,
                     "errors": oha.get("errorDistribution", {}),
                     "p50_ms": pct["p50"] * 1e3, "p90_ms": pct["p90"] * 1e3,
                     "p99_ms": pct["p99"] * 1e3},
        })
os.makedirs(out, exist_ok=True)
path = f"{out}/serve-load-{stamp}.json"
json.dump({"cpu": cpu, "seconds_each": float(secs), "model": "minilm-l6-sentiment (plain)",
           "serve_args": serve_args,
           "text_chars": len(text), "rows": rows}, open(path, "w"), indent=1)
print(f"{cpu}; {secs} s per run; JSON: {path}\n")
print("| round | rate/s | replay /s | HTTP /s | HTTP/replay | replay p50 | HTTP p50 | replay p99 | HTTP p99 | p99 added |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for x in rows:
    a, b = x["replay"], x["http"]
    print(f"| {x['round']} | {x['rate']:.0f} | {a['throughput']:.1f} | {b['throughput']:.1f} | "
          f"{b['throughput'] / a['throughput']:.3f} | {a['p50_ms']:.1f} | {b['p50_ms']:.1f} | "
          f"{a['p99_ms']:.1f} | {b['p99_ms']:.1f} | {b['p99_ms'] - a['p99_ms']:+.1f} |")
EOF

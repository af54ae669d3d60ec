"""Writes benches/traces/bursty.csv: a synthetic per-minute request-count trace with on/off
bursts, in the spirit of the Azure Functions invocation traces (which are not available
offline). 30 minutes; a base load with slow variation, and bursts of 2.5-4x lasting 1-3 minutes.
Deterministic (seed 7). Counts are relative: the benchmark scales them to a target mean rate.
Run: python3 tools/make_trace.py
"""
import math
import os
import random

random.seed(7)
minutes = 30
base = [100 + 30 * math.sin(2 * math.pi * m / 12) for m in range(minutes)]
counts = list(base)
m = 2
while m < minutes:
    length = random.randint(1, 3)
    factor = random.uniform(2.5, 4.0)
    for k in range(m, min(minutes, m + length)):
        counts[k] = base[k] * factor
    m += length + random.randint(3, 6)
counts = [max(0, int(round(c * random.uniform(0.9, 1.1)))) for c in counts]
out = os.path.join(os.path.dirname(__file__), "..", "benches", "traces", "bursty.csv")
with open(out, "w") as f:
    f.write("minute,requests\n")
    for i, c in enumerate(counts):
        f.write(f"{i},{c}\n")
print(f"wrote {out}: {minutes} minutes, mean {sum(counts) / minutes:.1f}, max {max(counts)}")

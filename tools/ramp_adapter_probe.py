#!/usr/bin/env python3
"""Would a trained adapter make SmolLM2-135M's intermediate blocks predict its next token?

Reads the files `cargo bench --bench decode_oracle -- --dump DIR` writes: the residual stream
after blocks 14..29 for teacher-forced text (training) and for the greedy generations of the 20
fixture prompts (evaluation), the decoded tied head and the final norm's weights. For each block
it fits a linear map A (576 x 576, ridge towards the identity, "tuned lens" style) from that
block's stream to the last block's, and reports how often head(norm(h A)) gives the model's token
on the evaluation tokens, with and without A, and the depth an oracle and margin thresholds
would give. numpy only (the weights venv has it):

    weights/.venv/bin/python tools/ramp_adapter_probe.py DIR [--ridge 1.0] [--json out.json]
"""
import argparse
import json

import numpy as np

WIDTH, FIRST, BLOCKS, EPS = 576, 14, 30, 1e-5


def rmsnorm(h, gamma):
    return h / np.sqrt((h * h).mean(axis=1, keepdims=True) + EPS) * gamma


def top2(logits):
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    part = np.partition(p, -2, axis=1)
    return logits.argmax(axis=1), part[:, -1] - part[:, -2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--ridge", type=float, default=1.0)
    ap.add_argument("--json")
    ap.add_argument(
        "--in-domain",
        action="store_true",
        help="also train on the first half of the generated tokens (prompts 1-10) and "
        "evaluate on the second half only",
    )
    a = ap.parse_args()
    nb = BLOCKS - FIRST
    f32 = lambda n: np.fromfile(f"{a.dir}/{n}", dtype="<f4")
    train = f32("train_h.bin").reshape(-1, nb, WIDTH).astype(np.float64)
    ev = f32("eval_h.bin").reshape(-1, nb, WIDTH)
    tok = np.fromfile(f"{a.dir}/eval_tok.bin", dtype="<u4")
    head = f32("head.bin").reshape(-1, WIDTH)
    gamma = f32("gamma.bin")
    assert ev.shape[0] == tok.shape[0], (ev.shape, tok.shape)
    if a.in_domain:
        half = ev.shape[0] // 2
        train = np.concatenate([train, ev[:half].astype(np.float64)])
        ev, tok = ev[half:], tok[half:]
    print(f"{train.shape[0]} training tokens, {ev.shape[0]} evaluation tokens")
    target = train[:, nb - 1]
    rows = []
    plain_hits, tuned_hits = {}, {}
    for k in range(nb - 1):
        b = FIRST + k
        x = train[:, k]
        # Ridge towards the identity: min |x A - target|^2 + r |A - I|^2, r scaled by the data.
        r = a.ridge * np.trace(x.T @ x) / WIDTH
        A = np.linalg.solve(x.T @ x + r * np.eye(WIDTH), x.T @ target + r * np.eye(WIDTH))
        h = ev[:, k].astype(np.float64)
        out = {}
        for name, hh in (("plain", h), ("tuned", h @ A)):
            t, m = top2((rmsnorm(hh, gamma) @ head.T.astype(np.float64)).astype(np.float32))
            hit = t == tok
            (plain_hits if name == "plain" else tuned_hits)[b] = (hit, m)
            out[name] = float(hit.mean())
        rows.append({"block": b, **out})
        print(f"block {b:>2}: plain {100 * out['plain']:5.1f}%  tuned {100 * out['tuned']:5.1f}%", flush=True)
    n = len(tok)
    summary = {}
    for name, hits in (("plain", plain_hits), ("tuned", tuned_hits)):
        blocks = sorted(hits)
        # Oracle: earliest block (from FIRST) whose prediction is right; else the last block.
        depth = np.full(n, BLOCKS, dtype=float)
        for b in reversed(blocks):
            depth = np.where(hits[b][0], b + 1, depth)
        sweep = []
        for th in (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99):
            d = np.full(n, BLOCKS, dtype=float)
            ok = np.ones(n, dtype=bool)
            done = np.zeros(n, dtype=bool)
            for b in blocks:
                hit, m = hits[b]
                go = (~done) & (m >= th)
                d = np.where(go, b + 1, d)
                ok = np.where(go, hit, ok)
                done |= go
            sweep.append({"threshold": th, "agreement": float(ok.mean()), "depth": float(d.mean() / BLOCKS)})
        summary[name] = {"oracle_depth": float(depth.mean() / BLOCKS), "sweep": sweep}
        print(f"{name}: oracle depth {100 * depth.mean() / BLOCKS:.1f}% of the blocks")
        for s in sweep:
            print(f"  threshold {s['threshold']:.2f}: agreement {100 * s['agreement']:5.1f}%  depth {100 * s['depth']:5.1f}%")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"ridge": a.ridge, "in_domain": a.in_domain, "per_block": rows, **summary}, f, indent=1)


if __name__ == "__main__":
    main()

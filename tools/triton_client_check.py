#!/usr/bin/env python3
"""Drives `apparate serve` with Triton's own Python client (tritonclient[http]): health,
metadata, inference on a text model, the classification extension, the exit output, and
errors. Exits non-zero on the first mismatch. `tests/server.rs` (the ignored test
`triton_http_client`, run by .ci/run) starts the server and runs this; by hand:

    python3 -m venv tools/.triton-venv && tools/.triton-venv/bin/pip install "tritonclient[http]"
    target/release/apparate serve -m weights/minilm-l6-sentiment.apparate --name sentiment &
    tools/.triton-venv/bin/python tools/triton_client_check.py 127.0.0.1:8000 sentiment
"""
import sys

import numpy as np
import tritonclient.http as http
from tritonclient.utils import InferenceServerException


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}")
        sys.exit(1)
    print(f"ok: {what}")


def main():
    url, model = sys.argv[1], sys.argv[2]
    c = http.InferenceServerClient(url=url)
    check(c.is_server_live(), "server live")
    check(c.is_server_ready(), "server ready")
    check(c.is_model_ready(model), "model ready")
    meta = c.get_server_metadata()
    check(meta["name"] == "apparate" and "classification" in meta["extensions"], f"server metadata {meta}")
    mm = c.get_model_metadata(model)
    check(mm["inputs"][0]["name"] == "text" and mm["inputs"][0]["datatype"] == "BYTES", f"model metadata {mm['inputs']}")

    texts = np.array([b"what a lovely day, I loved it", b"this was awful and boring"], dtype=object)
    inp = http.InferInput("text", [2], "BYTES")
    inp.set_data_from_numpy(texts, binary_data=False)
    outs = [http.InferRequestedOutput(n, binary_data=False) for n in ("label", "class", "probability", "exit")]
    r = c.infer(model, [inp], outputs=outs, request_id="triton-1")
    labels = r.as_numpy("label")
    classes = r.as_numpy("class")
    probs = r.as_numpy("probability")
    exits = r.as_numpy("exit")
    check(r.get_response()["id"] == "triton-1", "request id echoed")
    check(labels.shape == (2,) and classes.shape == (2,) and probs.shape == (2,), f"output shapes {labels.shape}")
    check(all(0.0 <= p <= 1.0 for p in probs), f"probabilities {probs}")
    check(all(len(e) > 0 for e in exits), f"exits {exits}")
    print("labels", [l.decode() if isinstance(l, bytes) else l for l in labels], "classes", classes)

    # Triton's classification extension: "score:index:label".
    r = c.infer(model, [inp], outputs=[http.InferRequestedOutput("label", binary_data=False, class_count=1)])
    top = r.as_numpy("label")
    parts = [(t.decode() if isinstance(t, bytes) else t).split(":") for t in top]
    check(all(len(p) == 3 and int(p[1]) == int(k) for p, k in zip(parts, classes)), f"classification {top}")

    # Errors come back as the client's exception, with the server's message.
    try:
        c.infer("no-such-model", [inp])
        check(False, "unknown model refused")
    except InferenceServerException as e:
        check("no model named" in str(e), f"unknown model refused: {e}")
    bad = http.InferInput("text", [2], "FP32")
    bad.set_data_from_numpy(np.zeros(2, dtype=np.float32), binary_data=False)
    try:
        c.infer(model, [bad])
        check(False, "wrong datatype refused")
    except InferenceServerException as e:
        check("BYTES" in str(e), f"wrong datatype refused: {e}")
    # The binary tensor extension is not spoken: a clear refusal, not a misread.
    binp = http.InferInput("text", [2], "BYTES")
    binp.set_data_from_numpy(texts, binary_data=True)
    try:
        c.infer(model, [binp])
        check(False, "binary tensor data refused")
    except InferenceServerException as e:
        check("binary" in str(e), f"binary tensor data refused: {e}")
    print("all checks passed")


if __name__ == "__main__":
    main()

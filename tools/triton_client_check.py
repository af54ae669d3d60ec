#!/usr/bin/env python3
"""Drives `apparate serve` with Triton's own Python client (tritonclient[http,grpc]) over both
forms of the protocol: health, metadata, inference on a text model (JSON and binary tensors
on HTTP), an image file on an image model, the classification extension, the exit output,
errors, and a decoder's text streamed over gRPC (Triton's ModelStreamInfer, as its LLM backends
stream). Exits non-zero on the first mismatch. `tests/server.rs` (the ignored test
`triton_client`, run by .ci/run) starts the server and runs this; by hand:

    python3 -m venv tools/.triton-venv
    tools/.triton-venv/bin/pip install "tritonclient[http,grpc]==2.73.0"
    target/release/apparate serve --config serve.toml &   # a text and an image model
    tools/.triton-venv/bin/python tools/triton_client_check.py \\
        127.0.0.1:8000 127.0.0.1:8001 sentiment effnet photo.png CLASS smollm2 "PROMPT" TEXT

CLASS is the class index the reference pipeline gives the photo, TEXT the reference's greedy
answer to PROMPT.
"""
import queue
import sys

import numpy as np
import tritonclient.grpc as grpc
import tritonclient.http as http
from tritonclient.utils import InferenceServerException


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}")
        sys.exit(1)
    print(f"ok: {what}")


def text(x):
    return x.decode() if isinstance(x, bytes) else x


def drive(proto, mod, c, model, image_model, photo, want_class):
    check(c.is_server_live(), f"{proto}: server live")
    check(c.is_server_ready(), f"{proto}: server ready")
    check(c.is_model_ready(model), f"{proto}: model ready")
    meta, mm = c.get_server_metadata(), c.get_model_metadata(model)
    # The HTTP client answers dicts, the gRPC one protobuf messages.
    if proto == "http":
        name, extensions = meta["name"], meta["extensions"]
        in_name, in_type = mm["inputs"][0]["name"], mm["inputs"][0]["datatype"]
    else:
        name, extensions = meta.name, list(meta.extensions)
        in_name, in_type = mm.inputs[0].name, mm.inputs[0].datatype
    check(name == "apparate" and "classification" in extensions, f"{proto}: server metadata {name} {extensions}")
    check(in_name == "text" and in_type == "BYTES", f"{proto}: model metadata {in_name} {in_type}")

    texts = np.array([b"what a lovely day, I loved it", b"this was awful and boring"], dtype=object)
    # HTTP: JSON tensors and binary tensors (the client's default) must give the same answer.
    forms = [False, True] if proto == "http" else [None]
    answers = []
    for binary in forms:
        inp = mod.InferInput("text", [2], "BYTES")
        if binary is None:
            inp.set_data_from_numpy(texts)
            outs = [mod.InferRequestedOutput(n) for n in ("label", "class", "probability", "exit")]
        else:
            inp.set_data_from_numpy(texts, binary_data=binary)
            outs = [mod.InferRequestedOutput(n, binary_data=binary) for n in ("label", "class", "probability", "exit")]
        r = c.infer(model, [inp], outputs=outs, request_id=f"{proto}-1")
        labels, classes = r.as_numpy("label"), r.as_numpy("class")
        probs, exits = r.as_numpy("probability"), r.as_numpy("exit")
        rid = r.get_response()["id"] if proto == "http" else r.get_response().id
        check(rid == f"{proto}-1", f"{proto}: request id echoed")
        check(labels.shape == (2,) and classes.shape == (2,) and probs.shape == (2,), f"{proto}: output shapes {labels.shape}")
        check(all(0.0 <= p <= 1.0 for p in probs), f"{proto}: probabilities {probs}")
        check(all(len(e) > 0 for e in exits), f"{proto}: exits {exits}")
        answers.append(([text(l) for l in labels], [int(k) for k in classes]))
        print(proto, "binary" if binary else "", "labels", answers[-1][0], "classes", answers[-1][1])
    check(all(a == answers[0] for a in answers), f"{proto}: the same answer in every tensor form")
    classes = answers[0][1]

    # Triton's classification extension: "score:index:label".
    inp = mod.InferInput("text", [2], "BYTES")
    inp.set_data_from_numpy(texts) if proto == "grpc" else inp.set_data_from_numpy(texts, binary_data=False)
    out = mod.InferRequestedOutput("label", class_count=1) if proto == "grpc" else mod.InferRequestedOutput("label", binary_data=False, class_count=1)
    r = c.infer(model, [inp], outputs=[out])
    top = r.as_numpy("label")
    parts = [text(t).split(":") for t in np.ravel(top)]
    check(all(len(p) == 3 and int(p[1]) == k for p, k in zip(parts, classes)), f"{proto}: classification {top}")

    # An image file, as the user has it, on the image model.
    img = mod.InferInput("image", [1], "BYTES")
    img.set_data_from_numpy(np.array([photo], dtype=object))
    r = c.infer(image_model, [img])
    got = int(r.as_numpy("class")[0])
    check(got == want_class, f"{proto}: the photo's class {got} (reference {want_class})")

    # Errors come back as the client's exception, with the server's message.
    try:
        c.infer("no-such-model", [inp])
        check(False, f"{proto}: unknown model refused")
    except InferenceServerException as e:
        check("no model named" in str(e), f"{proto}: unknown model refused: {e}")
    bad = mod.InferInput("text", [2], "FP32")
    bad.set_data_from_numpy(np.zeros(2, dtype=np.float32))
    try:
        c.infer(model, [bad])
        check(False, f"{proto}: wrong datatype refused")
    except InferenceServerException as e:
        check("BYTES" in str(e), f"{proto}: wrong datatype refused: {e}")


def stream(grpc_url, llm, prompt, want):
    """Greedy text, streamed: one response per piece, then the empty final one."""
    answers = queue.Queue()
    c = grpc.InferenceServerClient(url=grpc_url)
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    inp = grpc.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    c.async_stream_infer(llm, [inp], request_id="st-1", enable_empty_final_response=True,
                         parameters={"max_tokens": 64})
    pieces = []
    while True:
        result, error = answers.get(timeout=300)
        check(error is None, f"grpc stream: no error ({error})")
        r = result.get_response()
        check(r.id == "st-1", "grpc stream: request id on every response")
        if r.parameters["triton_final_response"].bool_param:
            break
        pieces.append(text(result.as_numpy("text_output")[0]))
    c.stop_stream()
    got = "".join(pieces)
    check(len(pieces) > 1 and got == want, f"grpc stream: {len(pieces)} pieces, {got!r} (reference {want!r})")


def main():
    http_url, grpc_url, model, image_model, photo_path, want = sys.argv[1:7]
    llm, prompt, want_text = sys.argv[7:10]
    photo = open(photo_path, "rb").read()
    drive("http", http, http.InferenceServerClient(url=http_url), model, image_model, photo, int(want))
    drive("grpc", grpc, grpc.InferenceServerClient(url=grpc_url), model, image_model, photo, int(want))
    stream(grpc_url, llm, prompt, want_text)
    print("all checks passed")


if __name__ == "__main__":
    main()

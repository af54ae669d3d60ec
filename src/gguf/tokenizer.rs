//! The tokenizer a GGUF file carries (`tokenizer.ggml.*`), rebuilt as a `tokenizers`
//! tokenizer: byte-level BPE (`tokenizer.ggml.model` = `gpt2`) from the vocabulary and merges,
//! with the pre-tokenizer that `tokenizer.ggml.pre` names, and the control tokens
//! (`token_type` 3, e.g. `<|im_start|>`) as special tokens matched whole in the text.
//!
//! [`tokenizer_json`] writes it as a `tokenizer.json` document, which is what a converted model
//! file stores (the BERT models store theirs the same way).

use serde_json::{Value as Json, json};

use super::{GgufFile, Value};
use crate::error::{Error, Result};

/// GGUF's token type of control tokens (llama.cpp's `LLAMA_TOKEN_TYPE_CONTROL`).
const CONTROL: i64 = 3;

/// The pre-tokenizer of a `tokenizer.ggml.pre` name, as a `tokenizers` JSON object. Only the
/// names whose splitting has been checked against a reference are here.
fn pre_tokenizer(pre: &str) -> Option<Json> {
    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    match pre {
        // GPT-2's own: its regex inside the byte-level step.
        "default" | "gpt2" => Some(byte_level),
        // SmolLM (StarCoder's vocabulary): every digit on its own, then GPT-2's regex. Checked
        // against transformers on tests/fixtures/smollm2_golden.json.
        "smollm" | "starcoder" => Some(json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level]
        })),
        _ => None,
    }
}

fn strings<'a>(g: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    let bad = |what: &str| Error::format(g.path(), format!("metadata `{key}` {what}"));
    let items = g
        .get(key)
        .ok_or_else(|| bad("is missing"))?
        .as_array()
        .ok_or_else(|| bad("is not an array"))?;
    items
        .iter()
        .map(|v| v.as_str().ok_or_else(|| bad("holds a non-string")))
        .collect()
}

/// The file's tokenizer as a `tokenizer.json` document.
pub fn tokenizer_json(g: &GgufFile) -> Result<String> {
    let bad = |what: String| Error::format(g.path(), what);
    let model = g
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            bad("metadata `tokenizer.ggml.model` is missing: the file has no tokenizer".into())
        })?;
    if model != "gpt2" {
        return Err(bad(format!(
            "tokenizer model `{model}` is not supported (byte-level BPE, `gpt2`, is)"
        )));
    }
    let pre_name = g
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let pre = pre_tokenizer(pre_name).ok_or_else(|| {
        bad(format!(
            "pre-tokenizer `{pre_name}` is not supported (default, gpt2, smollm, starcoder are)"
        ))
    })?;
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let merges = strings(g, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(v) => v
            .as_array()
            .ok_or_else(|| bad("metadata `tokenizer.ggml.token_type` is not an array".into()))?
            .iter()
            .map(|t| t.as_f64().map(|x| x as i64))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("metadata `tokenizer.ggml.token_type` holds a non-number".into()))?,
    };
    if types.len() != tokens.len() {
        return Err(bad(format!(
            "{} token types for {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, (t, ty)) in tokens.iter().zip(&types).enumerate() {
        if vocab.insert(t.to_string(), json!(id)).is_some() {
            return Err(bad(format!("token `{t}` appears twice in the vocabulary")));
        }
        if *ty == CONTROL {
            added.push(json!({
                "id": id, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            }));
        }
    }
    for (i, m) in merges.iter().enumerate() {
        let ok = m
            .split_once(' ')
            .is_some_and(|(a, b)| vocab.contains_key(a) && vocab.contains_key(b));
        if !ok {
            return Err(bad(format!(
                "merge {i} (`{m}`) is not two vocabulary tokens separated by a space"
            )));
        }
    }
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    });
    Ok(doc.to_string())
}

/// The file's tokenizer, ready to encode (no special tokens are added: GGUF files say with
/// `tokenizer.ggml.add_bos_token` whether a BOS goes first, and chat templates write theirs).
pub fn tokenizer(g: &GgufFile) -> Result<tokenizers::Tokenizer> {
    let text = tokenizer_json(g)?;
    text.parse::<tokenizers::Tokenizer>()
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", g.path().display())))
}

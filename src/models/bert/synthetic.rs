//! Random-weight BERT model files for tests, fuzzing and benchmarks that must not depend on the
//! fetched weights. Seeded, so a failing case can be reproduced.

use std::path::Path;

use super::{BertConfig, HiddenAct};
use crate::backend::Pooling;
use crate::error::Result;
use crate::format::{
    FORMAT_VERSION, Family, FileKind, HeadMeta, ModelMeta, OwnedTensor, Preprocessing,
    TOKENIZER_ENTRY, write_model,
};
use crate::rng::SplitMix;
use crate::tensor::DType;

/// Words of the synthetic vocabulary (after the special tokens).
pub const TINY_WORDS: [&str; 12] = [
    "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "##s", "##ing", ".",
];

/// A 2-layer, 16-wide BERT with the synthetic vocabulary.
pub fn tiny_config() -> BertConfig {
    BertConfig {
        vocab_size: 4 + TINY_WORDS.len(),
        hidden_size: 16,
        num_layers: 2,
        num_heads: 4,
        intermediate_size: 24,
        max_position_embeddings: 32,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        hidden_act: HiddenAct::GeluErf,
        pooling: Pooling::Mean,
        normalize: true,
        has_pooler: true,
    }
}

/// A WordPiece `tokenizer.json` over `[PAD] [UNK] [CLS] [SEP]` + [`TINY_WORDS`], with fixed
/// padding switched on (as MiniLM's is) so tests prove we turn it off.
pub fn tiny_tokenizer_json() -> String {
    let mut vocab = serde_json::Map::new();
    for (i, w) in ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        .iter()
        .chain(TINY_WORDS.iter())
        .enumerate()
    {
        vocab.insert(w.to_string(), serde_json::json!(i));
    }
    serde_json::json!({
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": 16, "strategy": "LongestFirst", "stride": 0},
        "padding": {"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": null,
                    "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
        "added_tokens": [],
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                       "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}
            }
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": vocab}
    })
    .to_string()
}

/// The metadata a random model of `config` gets.
pub fn synthetic_meta(config: &BertConfig, head_classes: Option<usize>) -> ModelMeta {
    ModelMeta {
        format_version: FORMAT_VERSION,
        kind: FileKind::Model,
        graph: config.stage_graph(),
        family: Family::Bert(config.clone()),
        preprocessing: Preprocessing::Text {
            tokenizer_entry: TOKENIZER_ENTRY.into(),
            max_length: config.max_position_embeddings.min(16),
        },
        head: head_classes.map(|c| HeadMeta {
            labels: (0..c).map(|i| format!("class{i}")).collect(),
        }),
        provenance: Vec::new(),
    }
}

/// Random tensors for `meta` (LayerNorm gains near 1, everything else small).
pub fn random_tensors(meta: &ModelMeta, dtype: DType, seed: u64) -> Vec<(String, OwnedTensor)> {
    let mut rng = SplitMix::new(seed);
    meta.expected_tensors()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let gain = name.ends_with("norm.weight");
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    let u = rng.uniform();
                    if gain { 1.0 + 0.1 * u } else { 0.5 * u }
                })
                .collect();
            let t = OwnedTensor::from_f32(&values, shape, dtype);
            (name, t)
        })
        .collect()
}

/// Writes a random BERT model file with the synthetic tokenizer.
pub fn write_random_bert(
    path: &Path,
    config: &BertConfig,
    head_classes: Option<usize>,
    dtype: DType,
    seed: u64,
) -> Result<ModelMeta> {
    let meta = synthetic_meta(config, head_classes);
    let tensors = random_tensors(&meta, dtype, seed);
    write_model(
        path,
        &meta,
        &[(TOKENIZER_ENTRY.to_string(), tiny_tokenizer_json())],
        tensors,
    )?;
    Ok(meta)
}

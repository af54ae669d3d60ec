//! Hugging Face BERT (a `BertModel` safetensors folder, optionally a sentence-transformers
//! model) -> our model file. Q, K and V are fused into one matrix here, once, so the encoder runs
//! one projection GEMM per layer instead of three.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::checkpoint::{Checkpoint, read};
use crate::backend::Pooling;
use crate::error::{Error, Result};
use crate::format::{
    FORMAT_VERSION, Family, FileKind, HeadMeta, ModelMeta, OwnedTensor, Preprocessing, Provenance,
    TOKENIZER_ENTRY, sha256_hex, write_model,
};
use crate::models::bert::{BertConfig, HiddenAct};
use crate::tensor::DType;

/// What `convert` does beyond the defaults read from the folder.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Storage dtype of the output (default f32).
    pub dtype: DType,
    /// A classifier head to attach: a safetensors file with `weight` [classes, hidden], `bias`
    /// [classes] and a `labels` metadata entry (JSON list of class names in row order).
    pub head: Option<PathBuf>,
    /// Pooling override; default: from `1_Pooling/config.json`, else `cls`.
    pub pooling: Option<Pooling>,
    /// Describes the source in the provenance record (e.g. the package and version).
    pub source_label: Option<String>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            dtype: DType::F32,
            head: None,
            pooling: None,
            source_label: None,
        }
    }
}

/// What was written, for the CLI to report.
#[derive(Debug)]
pub struct ConvertReport {
    pub meta: ModelMeta,
    pub tensors: usize,
    pub parameters: usize,
    pub bytes: u64,
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))
}

fn usize_field(cfg: &Value, key: &str, path: &Path) -> Result<usize> {
    cfg.get(key)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| Error::format(path, format!("`{key}` missing or not an integer")))
}

/// Reads `config.json` into our BERT config.
fn bert_config(
    dir: &Path,
    pooling: Pooling,
    normalize: bool,
    has_pooler: bool,
) -> Result<BertConfig> {
    let path = dir.join("config.json");
    let cfg = read_json(&path)?;
    if let Some(t) = cfg.get("model_type").and_then(Value::as_str)
        && t != "bert"
    {
        return Err(Error::format(
            &path,
            format!("model_type `{t}` is not bert"),
        ));
    }
    let act = cfg
        .get("hidden_act")
        .and_then(Value::as_str)
        .unwrap_or("gelu");
    if act != "gelu" {
        return Err(Error::format(
            &path,
            format!("hidden_act `{act}` is not supported (only the exact erf GELU, `gelu`)"),
        ));
    }
    if let Some(p) = cfg.get("position_embedding_type").and_then(Value::as_str)
        && p != "absolute"
    {
        return Err(Error::format(
            &path,
            format!("position_embedding_type `{p}` is not supported (only `absolute`)"),
        ));
    }
    let c = BertConfig {
        vocab_size: usize_field(&cfg, "vocab_size", &path)?,
        hidden_size: usize_field(&cfg, "hidden_size", &path)?,
        num_layers: usize_field(&cfg, "num_hidden_layers", &path)?,
        num_heads: usize_field(&cfg, "num_attention_heads", &path)?,
        intermediate_size: usize_field(&cfg, "intermediate_size", &path)?,
        max_position_embeddings: usize_field(&cfg, "max_position_embeddings", &path)?,
        type_vocab_size: usize_field(&cfg, "type_vocab_size", &path).unwrap_or(2),
        layer_norm_eps: cfg
            .get("layer_norm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(1e-12),
        hidden_act: HiddenAct::GeluErf,
        pooling,
        normalize,
        has_pooler,
    };
    c.validate().map_err(|r| Error::format(&path, r))?;
    Ok(c)
}

/// sentence-transformers settings, when the folder is one: (pooling, normalize, max_seq_length).
fn sentence_transformers_settings(dir: &Path) -> Result<(Option<Pooling>, bool, Option<usize>)> {
    let pooling_path = dir.join("1_Pooling/config.json");
    let pooling = if pooling_path.exists() {
        let p = read_json(&pooling_path)?;
        let on = |k: &str| p.get(k).and_then(Value::as_bool).unwrap_or(false);
        if on("pooling_mode_max_tokens") || on("pooling_mode_mean_sqrt_len_tokens") {
            return Err(Error::format(
                &pooling_path,
                "only mean or CLS pooling is supported",
            ));
        }
        match (on("pooling_mode_mean_tokens"), on("pooling_mode_cls_token")) {
            (true, false) => Some(Pooling::Mean),
            (false, true) => Some(Pooling::Cls),
            _ => {
                return Err(Error::format(
                    &pooling_path,
                    "exactly one of mean or CLS pooling must be on",
                ));
            }
        }
    } else {
        None
    };
    let modules_path = dir.join("modules.json");
    let normalize = if modules_path.exists() {
        read_json(&modules_path)?
            .as_array()
            .map(|mods| {
                mods.iter().any(|m| {
                    m.get("type")
                        .and_then(Value::as_str)
                        .is_some_and(|t| t.ends_with(".Normalize"))
                })
            })
            .unwrap_or(false)
    } else {
        false
    };
    let sbert_path = dir.join("sentence_bert_config.json");
    let max_len = if sbert_path.exists() {
        read_json(&sbert_path)?
            .get("max_seq_length")
            .and_then(Value::as_u64)
            .map(|v| v as usize)
    } else {
        None
    };
    Ok((pooling, normalize, max_len))
}

/// Converts the Hugging Face BERT folder `dir` into our format at `out`.
pub fn convert(dir: &Path, out: &Path, opts: &ConvertOptions) -> Result<ConvertReport> {
    if !dir.is_dir() {
        return Err(Error::format(
            dir,
            "not a directory (expected a Hugging Face model folder)",
        ));
    }
    let st_path = dir.join("model.safetensors");
    let mut ck = Checkpoint::open(&st_path)?;
    let tok_path = dir.join("tokenizer.json");
    let tokenizer_json =
        String::from_utf8(read(&tok_path)?).map_err(|_| Error::format(&tok_path, "not UTF-8"))?;
    let tok_value: Value = serde_json::from_str(&tokenizer_json)
        .map_err(|e| Error::format(&tok_path, format!("invalid JSON: {e}")))?;

    // Checkpoints saved from task models prefix the encoder with `bert.`.
    let prefix = if ck
        .tensors
        .contains_key("bert.embeddings.word_embeddings.weight")
    {
        "bert."
    } else {
        ""
    };
    let has_pooler = ck
        .tensors
        .contains_key(&format!("{prefix}pooler.dense.weight"));
    let (st_pooling, normalize, st_max_len) = sentence_transformers_settings(dir)?;
    let pooling = opts.pooling.or(st_pooling).unwrap_or(Pooling::Cls);
    let config = bert_config(dir, pooling, normalize, has_pooler)?;

    let tok_max = tok_value
        .pointer("/truncation/max_length")
        .and_then(Value::as_u64)
        .map(|v| v as usize);
    let max_length = st_max_len
        .or(tok_max)
        .unwrap_or(config.max_position_embeddings)
        .min(config.max_position_embeddings);

    let (h, f) = (config.hidden_size, config.intermediate_size);
    let mut tensors: Vec<(String, OwnedTensor)> = Vec::new();
    let mut put = |name: String, shape: Vec<usize>, values: Vec<f32>| {
        tensors.push((name, OwnedTensor::from_f32(&values, shape, opts.dtype)));
    };
    let e = format!("{prefix}embeddings");
    put(
        "embeddings.word".into(),
        vec![config.vocab_size, h],
        ck.take(
            &format!("{e}.word_embeddings.weight"),
            &[config.vocab_size, h],
        )?,
    );
    put(
        "embeddings.position".into(),
        vec![config.max_position_embeddings, h],
        ck.take(
            &format!("{e}.position_embeddings.weight"),
            &[config.max_position_embeddings, h],
        )?,
    );
    put(
        "embeddings.token_type".into(),
        vec![config.type_vocab_size, h],
        ck.take(
            &format!("{e}.token_type_embeddings.weight"),
            &[config.type_vocab_size, h],
        )?,
    );
    put(
        "embeddings.norm.weight".into(),
        vec![h],
        ck.take(&format!("{e}.LayerNorm.weight"), &[h])?,
    );
    put(
        "embeddings.norm.bias".into(),
        vec![h],
        ck.take(&format!("{e}.LayerNorm.bias"), &[h])?,
    );
    for i in 0..config.num_layers {
        let src = format!("{prefix}encoder.layer.{i}");
        let dst = format!("layers.{i}");
        let mut qkv_w = Vec::with_capacity(3 * h * h);
        let mut qkv_b = Vec::with_capacity(3 * h);
        for part in ["query", "key", "value"] {
            qkv_w.extend(ck.take(&format!("{src}.attention.self.{part}.weight"), &[h, h])?);
            qkv_b.extend(ck.take(&format!("{src}.attention.self.{part}.bias"), &[h])?);
        }
        put(format!("{dst}.attention.qkv.weight"), vec![3 * h, h], qkv_w);
        put(format!("{dst}.attention.qkv.bias"), vec![3 * h], qkv_b);
        let pairs: [(&str, &str, Vec<usize>); 10] = [
            (
                "attention.output.dense.weight",
                "attention.out.weight",
                vec![h, h],
            ),
            ("attention.output.dense.bias", "attention.out.bias", vec![h]),
            (
                "attention.output.LayerNorm.weight",
                "attention.norm.weight",
                vec![h],
            ),
            (
                "attention.output.LayerNorm.bias",
                "attention.norm.bias",
                vec![h],
            ),
            ("intermediate.dense.weight", "ffn.up.weight", vec![f, h]),
            ("intermediate.dense.bias", "ffn.up.bias", vec![f]),
            ("output.dense.weight", "ffn.down.weight", vec![h, f]),
            ("output.dense.bias", "ffn.down.bias", vec![h]),
            ("output.LayerNorm.weight", "ffn.norm.weight", vec![h]),
            ("output.LayerNorm.bias", "ffn.norm.bias", vec![h]),
        ];
        for (from, to, shape) in pairs {
            let v = ck.take(&format!("{src}.{from}"), &shape)?;
            put(format!("{dst}.{to}"), shape, v);
        }
    }
    if has_pooler {
        put(
            "pooler.weight".into(),
            vec![h, h],
            ck.take(&format!("{prefix}pooler.dense.weight"), &[h, h])?,
        );
        put(
            "pooler.bias".into(),
            vec![h],
            ck.take(&format!("{prefix}pooler.dense.bias"), &[h])?,
        );
    }
    if let Some(extra) = ck
        .tensors
        .keys()
        .find(|k| k.starts_with(&format!("{prefix}encoder.layer")))
    {
        return Err(Error::tensor(
            &st_path,
            extra,
            format!(
                "not used by a {}-layer BERT (does config.json match the checkpoint?)",
                config.num_layers
            ),
        ));
    }

    let source = opts
        .source_label
        .clone()
        .unwrap_or_else(|| dir.display().to_string());
    let mut provenance = vec![
        Provenance {
            source: format!("{source}: model.safetensors"),
            sha256: sha256_hex(&read(&st_path)?),
        },
        Provenance {
            source: format!("{source}: tokenizer.json"),
            sha256: sha256_hex(tokenizer_json.as_bytes()),
        },
    ];

    let head = match &opts.head {
        None => None,
        Some(hp) => {
            let mut hk = Checkpoint::open(hp)?;
            let labels_raw = hk.metadata.get("labels").cloned().ok_or_else(|| {
                Error::format(hp, "no `labels` metadata entry (JSON list of class names)")
            })?;
            let labels: Vec<String> = serde_json::from_str(&labels_raw).map_err(|e| {
                Error::format(hp, format!("`labels` is not a JSON list of strings: {e}"))
            })?;
            let c = labels.len();
            let w = hk.take("weight", &[c, h])?;
            let b = hk.take("bias", &[c])?;
            if let Some(extra) = hk.tensors.keys().next() {
                return Err(Error::tensor(hp, extra, "unexpected tensor in a head file"));
            }
            provenance.push(Provenance {
                source: hk
                    .metadata
                    .get("source")
                    .cloned()
                    .unwrap_or_else(|| hp.display().to_string()),
                sha256: match hk.metadata.get("sha256") {
                    Some(s) => s.clone(),
                    None => sha256_hex(&read(hp)?),
                },
            });
            put("head.weight".into(), vec![c, h], w);
            put("head.bias".into(), vec![c], b);
            Some(HeadMeta { labels })
        }
    };

    let meta = ModelMeta {
        format_version: FORMAT_VERSION,
        kind: FileKind::Model,
        graph: config.stage_graph(),
        family: Family::Bert(config),
        preprocessing: Preprocessing::Text {
            tokenizer_entry: TOKENIZER_ENTRY.into(),
            max_length,
        },
        head,
        provenance,
    };
    let parameters = tensors
        .iter()
        .map(|(_, t)| t.shape.iter().product::<usize>())
        .sum();
    let count = tensors.len();
    write_model(
        out,
        &meta,
        &[(TOKENIZER_ENTRY.to_string(), tokenizer_json)],
        tensors,
    )?;
    let bytes = std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len();
    Ok(ConvertReport {
        meta,
        tensors: count,
        parameters,
        bytes,
    })
}

//! A `llama` GGUF file -> our format, the blocks kept as they are: each block's query, key and
//! value matrices become one fused matrix (their rows one after another), gate and up another,
//! stored as the GGUF's Q4_1/Q8_0 blocks (other types requantized to Q8_0, as the decoder does
//! when it loads a GGUF file); the norms f32; the tokenizer as a `tokenizer.json` entry; the chat
//! template and stop tokens in the family configuration. The result loads without touching the
//! weights (`models::llama::Llama::load_file`), memory-mapped.

use std::collections::BTreeMap;
use std::path::Path;

use super::hf_bert::ConvertReport;
use crate::chat::ChatTemplate;
use crate::error::{Error, Result};
use crate::format::llama_config::LlamaFileConfig;
use crate::format::meta::{
    FORMAT_VERSION, Family, FileKind, ModelMeta, Preprocessing, Provenance, TOKENIZER_ENTRY,
};
use crate::format::{OwnedTensor, sha256_hex, write_model};
use crate::gguf::GgufFile;
use crate::models::llama::{fused_rows, stop_tokens};
use crate::models::llama_reference::{LlamaConfig, vector};

/// Converts `input` (a GGUF file) into `out`; `source` labels the provenance (default: the
/// file name).
pub fn convert_gguf(input: &Path, out: &Path, source: Option<String>) -> Result<ConvertReport> {
    let g = GgufFile::open(input)?;
    let c = LlamaConfig::from_gguf(&g)?;
    let tokenizer_json = crate::gguf::tokenizer::tokenizer_json(&g)?;
    let template = ChatTemplate::from_gguf(&g)?;
    let tied = g.tensor("output.weight").is_none();
    let mut tensors: Vec<(String, OwnedTensor)> = Vec::new();
    let mut types = BTreeMap::new();
    let mut matrix = |name: String, parts: Vec<String>, cols: usize| -> Result<()> {
        let (ty, rows, bytes) = fused_rows(&g, &parts, cols)?;
        types.insert(name.clone(), ty.name().to_string());
        let t = OwnedTensor::from_blocks(ty, rows, cols, bytes)
            .map_err(|e| Error::tensor(out, &name, e.to_string()))?;
        tensors.push((name, t));
        Ok(())
    };
    let w = c.width;
    matrix(
        "token_embd.weight".into(),
        vec!["token_embd.weight".into()],
        w,
    )?;
    if !tied {
        matrix("output.weight".into(), vec!["output.weight".into()], w)?;
    }
    for b in 0..c.blocks {
        let n = |s: &str| format!("blk.{b}.{s}.weight");
        matrix(
            n("attn_qkv"),
            vec![n("attn_q"), n("attn_k"), n("attn_v")],
            w,
        )?;
        matrix(n("attn_output"), vec![n("attn_output")], w)?;
        matrix(n("ffn_gate_up"), vec![n("ffn_gate"), n("ffn_up")], w)?;
        matrix(n("ffn_down"), vec![n("ffn_down")], c.ffn)?;
    }
    let mut norms = vec!["output_norm.weight".to_string()];
    for b in 0..c.blocks {
        norms.push(format!("blk.{b}.attn_norm.weight"));
        norms.push(format!("blk.{b}.ffn_norm.weight"));
    }
    for n in norms {
        let v = vector(&g, &n, w)?;
        tensors.push((
            n,
            OwnedTensor::from_f32(&v, vec![w], crate::tensor::DType::F32),
        ));
    }
    let (bos_token, eos_token, chat_template) = match template {
        Some(t) => (
            t.bos().to_string(),
            t.eos().to_string(),
            Some(t.source().to_string()),
        ),
        None => (String::new(), String::new(), None),
    };
    let config = LlamaFileConfig {
        blocks: c.blocks,
        width: c.width,
        ffn: c.ffn,
        heads: c.heads,
        kv_heads: c.kv_heads,
        head_dim: c.head_dim,
        rope_base: c.rope_base,
        eps: c.eps,
        vocab: c.vocab,
        context: c.context,
        tied,
        matrix_types: types,
        stop_tokens: stop_tokens(&g),
        chat_template,
        bos_token,
        eos_token,
    };
    let source = source.unwrap_or_else(|| {
        input.file_name().map_or_else(
            || input.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    });
    let bytes = std::fs::read(input).map_err(|e| Error::io(input, e))?;
    let meta = ModelMeta {
        format_version: FORMAT_VERSION,
        kind: FileKind::Model,
        graph: config.stage_graph(),
        preprocessing: Preprocessing::Text {
            tokenizer_entry: TOKENIZER_ENTRY.into(),
            max_length: c.context,
        },
        family: Family::Llama(config),
        head: None,
        provenance: vec![Provenance {
            source,
            sha256: sha256_hex(&bytes),
        }],
    };
    drop(bytes);
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

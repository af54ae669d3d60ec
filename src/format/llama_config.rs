//! LLaMA-family decoder hyper-parameters as stored in a model file (converted from GGUF), and
//! what they imply: the tensor set, with the block-quantized matrices named, and the stage
//! graph (embedding, one stage per block, head; the block outputs are the ramp-eligible
//! points).
//!
//! Tensors (GGUF's names where they exist; the fused ones are new): `token_embd.weight`
//! `[vocab, width]`; per block `blk.N.attn_norm.weight` `[width]`, `blk.N.attn_qkv.weight`
//! `[(heads + 2 kv_heads) head_dim, width]` (query, key and value rows one after another),
//! `blk.N.attn_output.weight` `[width, width]`, `blk.N.ffn_norm.weight` `[width]`,
//! `blk.N.ffn_gate_up.weight` `[2 ffn, width]` (gate rows, then up rows),
//! `blk.N.ffn_down.weight` `[width, ffn]`; `output_norm.weight` `[width]`; `output.weight`
//! `[vocab, width]` unless the head is tied to the embedding. Matrices are block-quantized (Q4_1
//! or Q8_0, `matrix_types`), the norms f32.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::gguf::GgmlType;
use crate::graph::StageGraph;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaFileConfig {
    pub blocks: usize,
    pub width: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope_base: f32,
    pub eps: f32,
    pub vocab: usize,
    pub context: usize,
    /// The output layer is the token embedding.
    pub tied: bool,
    /// Block type of each matrix (`Q4_1` or `Q8_0`), by tensor name.
    pub matrix_types: BTreeMap<String, String>,
    /// Tokens that end a generation (end of sequence, end of turn).
    pub stop_tokens: Vec<u32>,
    /// The chat template (Jinja) of an instruct model, with the texts of the special tokens it
    /// refers to.
    #[serde(default)]
    pub chat_template: Option<String>,
    #[serde(default)]
    pub bos_token: String,
    #[serde(default)]
    pub eos_token: String,
}

const MAX_DIM: usize = 1 << 20;
const MAX_BLOCKS: usize = 1024;

impl LlamaFileConfig {
    pub fn validate(&self) -> Result<(), String> {
        let dims = [
            ("blocks", self.blocks, MAX_BLOCKS),
            ("width", self.width, MAX_DIM),
            ("ffn", self.ffn, MAX_DIM),
            ("heads", self.heads, MAX_DIM),
            ("kv_heads", self.kv_heads, MAX_DIM),
            ("head_dim", self.head_dim, MAX_DIM),
            ("vocab", self.vocab, 1 << 24),
            ("context", self.context, 1 << 24),
        ];
        for (name, v, max) in dims {
            if v == 0 || v > max {
                return Err(format!("llama {name} = {v} is outside 1..={max}"));
            }
        }
        if self.heads * self.head_dim != self.width
            || !self.heads.is_multiple_of(self.kv_heads)
            || !self.head_dim.is_multiple_of(2)
        {
            return Err(format!(
                "{} heads of {} (and {} key/value heads) do not make a width of {}",
                self.heads, self.head_dim, self.kv_heads, self.width
            ));
        }
        let sane = self.rope_base > 1.0 && self.rope_base.is_finite() && self.eps > 0.0;
        if !sane {
            return Err(format!(
                "rope base {} and eps {} must be positive (base above 1)",
                self.rope_base, self.eps
            ));
        }
        let matrices: Vec<String> = self.matrices().into_iter().map(|(n, _)| n).collect();
        for n in &matrices {
            match self.matrix_types.get(n).map(|t| GgmlType::from_name(t)) {
                Some(Some(GgmlType::Q4_1 | GgmlType::Q8_0)) => {}
                Some(_) => {
                    return Err(format!(
                        "matrix `{n}` has block type `{}` (Q4_1 or Q8_0)",
                        self.matrix_types[n]
                    ));
                }
                None => return Err(format!("matrix `{n}` has no block type")),
            }
        }
        if let Some(extra) = self.matrix_types.keys().find(|k| !matrices.contains(k)) {
            return Err(format!(
                "block type given for `{extra}`, not a matrix of this model"
            ));
        }
        if let Some(&t) = self.stop_tokens.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(format!(
                "stop token {t} is outside the vocabulary of {}",
                self.vocab
            ));
        }
        Ok(())
    }

    /// The block-quantized matrices with their `[rows, cols]`.
    pub fn matrices(&self) -> Vec<(String, Vec<usize>)> {
        let (w, f) = (self.width, self.ffn);
        let qkv = (self.heads + 2 * self.kv_heads) * self.head_dim;
        let mut v = vec![("token_embd.weight".to_string(), vec![self.vocab, w])];
        for b in 0..self.blocks {
            v.push((format!("blk.{b}.attn_qkv.weight"), vec![qkv, w]));
            v.push((format!("blk.{b}.attn_output.weight"), vec![w, w]));
            v.push((format!("blk.{b}.ffn_gate_up.weight"), vec![2 * f, w]));
            v.push((format!("blk.{b}.ffn_down.weight"), vec![w, f]));
        }
        if !self.tied {
            v.push(("output.weight".to_string(), vec![self.vocab, w]));
        }
        v
    }

    /// Every tensor the file must hold, with its (logical) shape.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let w = self.width;
        let mut v = self.matrices();
        for b in 0..self.blocks {
            v.push((format!("blk.{b}.attn_norm.weight"), vec![w]));
            v.push((format!("blk.{b}.ffn_norm.weight"), vec![w]));
        }
        v.push(("output_norm.weight".to_string(), vec![w]));
        v
    }

    pub fn stage_graph(&self) -> StageGraph {
        StageGraph::chain(
            std::iter::once("embed".to_string())
                .chain((0..self.blocks).map(|i| format!("blk.{i}")))
                .chain(std::iter::once("head".to_string())),
        )
    }
}

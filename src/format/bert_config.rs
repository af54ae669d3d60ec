//! BERT hyper-parameters as stored in the model file, and what they imply: the tensor set and
//! the stage graph.

use serde::{Deserialize, Serialize};

use crate::backend::Pooling;
use crate::graph::StageGraph;

/// Hidden activation of the feed-forward block. Only the exact (erf) GELU is implemented;
/// anything else is refused at conversion rather than silently approximated.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    GeluErf,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: HiddenAct,
    /// How token states become the sentence vector.
    pub pooling: Pooling,
    /// L2-normalise the pooled vector (sentence-transformers' `Normalize` module).
    pub normalize: bool,
    /// The file holds BERT's pooler (`dense + tanh` on `[CLS]`); kept to initialise ramp heads.
    pub has_pooler: bool,
}

/// Upper bounds that no real BERT reaches; they stop absurd metadata from driving allocations.
const MAX_DIM: usize = 1 << 20;
const MAX_LAYERS: usize = 1024;

impl BertConfig {
    pub fn validate(&self) -> Result<(), String> {
        let dims = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_heads", self.num_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ];
        for (name, v) in dims {
            if v == 0 || v > MAX_DIM {
                return Err(format!(
                    "bert config: {name} = {v} is outside 1..={MAX_DIM}"
                ));
            }
        }
        if self.num_layers == 0 || self.num_layers > MAX_LAYERS {
            return Err(format!(
                "bert config: num_layers = {} is outside 1..={MAX_LAYERS}",
                self.num_layers
            ));
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return Err(format!(
                "bert config: hidden_size {} is not divisible by num_heads {}",
                self.hidden_size, self.num_heads
            ));
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps < 1.0) {
            return Err(format!(
                "bert config: layer_norm_eps {} must be in (0, 1)",
                self.layer_norm_eps
            ));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Every tensor of a BERT model file in our layout (Q, K and V fused into one matrix so
    /// the projection is one GEMM), with shapes.
    pub fn expected_tensors(&self, head_classes: Option<usize>) -> Vec<(String, Vec<usize>)> {
        let (h, f) = (self.hidden_size, self.intermediate_size);
        let mut t = vec![
            ("embeddings.word".to_string(), vec![self.vocab_size, h]),
            (
                "embeddings.position".to_string(),
                vec![self.max_position_embeddings, h],
            ),
            (
                "embeddings.token_type".to_string(),
                vec![self.type_vocab_size, h],
            ),
            ("embeddings.norm.weight".to_string(), vec![h]),
            ("embeddings.norm.bias".to_string(), vec![h]),
        ];
        for i in 0..self.num_layers {
            let p = format!("layers.{i}");
            t.extend([
                (format!("{p}.attention.qkv.weight"), vec![3 * h, h]),
                (format!("{p}.attention.qkv.bias"), vec![3 * h]),
                (format!("{p}.attention.out.weight"), vec![h, h]),
                (format!("{p}.attention.out.bias"), vec![h]),
                (format!("{p}.attention.norm.weight"), vec![h]),
                (format!("{p}.attention.norm.bias"), vec![h]),
                (format!("{p}.ffn.up.weight"), vec![f, h]),
                (format!("{p}.ffn.up.bias"), vec![f]),
                (format!("{p}.ffn.down.weight"), vec![h, f]),
                (format!("{p}.ffn.down.bias"), vec![h]),
                (format!("{p}.ffn.norm.weight"), vec![h]),
                (format!("{p}.ffn.norm.bias"), vec![h]),
            ]);
        }
        if self.has_pooler {
            t.push(("pooler.weight".to_string(), vec![h, h]));
            t.push(("pooler.bias".to_string(), vec![h]));
        }
        if let Some(c) = head_classes {
            t.push(("head.weight".to_string(), vec![c, h]));
            t.push(("head.bias".to_string(), vec![c]));
        }
        t
    }

    /// `embeddings -> layer.0 -> ... -> layer.{n-1} -> head`; every encoder layer's output is a
    /// ramp-eligible point.
    pub fn stage_graph(&self) -> StageGraph {
        StageGraph::chain(
            std::iter::once("embeddings".to_string())
                .chain((0..self.num_layers).map(|i| format!("layer.{i}")))
                .chain(std::iter::once("head".to_string())),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn minilm() -> BertConfig {
        BertConfig {
            vocab_size: 30522,
            hidden_size: 384,
            num_layers: 6,
            num_heads: 12,
            intermediate_size: 1536,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_act: HiddenAct::GeluErf,
            pooling: Pooling::Mean,
            normalize: true,
            has_pooler: true,
        }
    }

    #[test]
    fn one_ramp_point_per_encoder_layer() {
        let g = minilm().stage_graph();
        assert_eq!(
            g.ramp_points,
            (0..6).map(|i| format!("layer.{i}")).collect::<Vec<_>>()
        );
    }

    #[test]
    fn tensor_count() {
        assert_eq!(minilm().expected_tensors(None).len(), 5 + 6 * 12 + 2);
        assert_eq!(minilm().expected_tensors(Some(157)).len(), 5 + 6 * 12 + 4);
    }

    #[test]
    fn rejects_bad_configs() {
        let mut c = minilm();
        c.num_heads = 7;
        assert!(c.validate().unwrap_err().contains("divisible"));
        let mut c = minilm();
        c.vocab_size = usize::MAX;
        assert!(c.validate().unwrap_err().contains("vocab_size"));
    }
}

//! The BERT encoder family (BERT, MiniLM, ...): token ids -> hidden states -> pooled sentence
//! vector -> optional classifier head. Written once against [`Backend`]; exposed stage by stage
//! so the runtime can run ramps between encoder layers.

pub mod synthetic;

/// The configuration lives with the file format that stores it (`format` depends on no model).
pub use crate::format::bert_config::{BertConfig, HiddenAct};

use crate::backend::{Activation, Backend, BatchShape};
use crate::error::{Error, Result};
use crate::format::{Family, ModelFile};

/// A padded batch of token sequences ready for the encoder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncoderInput {
    /// `[batch * seq]` token ids, each input padded on the right.
    pub ids: Vec<u32>,
    /// `[batch * seq]` segment ids (all zero for single sentences).
    pub type_ids: Vec<u32>,
    pub shape: BatchShape,
}

impl EncoderInput {
    /// Builds a batch from per-input ids and attention masks as tokenizers produce them. The
    /// mask of each input must be ones followed by zeros (right padding); `pad_id` fills up to
    /// the longest input.
    pub fn from_ids_and_masks(
        ids: &[Vec<u32>],
        masks: &[Vec<u32>],
        pad_id: u32,
    ) -> Result<EncoderInput> {
        if ids.is_empty() {
            return Err(Error::Input("empty batch".into()));
        }
        if ids.len() != masks.len() {
            return Err(Error::Input(format!(
                "{} id sequences but {} attention masks",
                ids.len(),
                masks.len()
            )));
        }
        let mut lengths = Vec::with_capacity(ids.len());
        for (i, (ids, mask)) in ids.iter().zip(masks).enumerate() {
            if ids.len() != mask.len() {
                return Err(Error::Input(format!(
                    "input {i}: {} ids but a mask of {}",
                    ids.len(),
                    mask.len()
                )));
            }
            let len = mask.iter().take_while(|&&m| m != 0).count();
            if mask[len..].iter().any(|&m| m != 0) {
                return Err(Error::Input(format!(
                    "input {i}: attention mask must be ones then zeros (right padding)"
                )));
            }
            if len == 0 {
                return Err(Error::Input(format!("input {i} has no tokens")));
            }
            lengths.push(len);
        }
        let seq = *lengths.iter().max().expect("non-empty");
        let mut flat = Vec::with_capacity(ids.len() * seq);
        for (ids, &len) in ids.iter().zip(&lengths) {
            flat.extend_from_slice(&ids[..len]);
            flat.extend(std::iter::repeat_n(pad_id, seq - len));
        }
        Ok(EncoderInput {
            type_ids: vec![0; flat.len()],
            ids: flat,
            shape: BatchShape { seq, lengths },
        })
    }

    /// The same batch padded on the right to `seq` positions with `pad_id` (segment 0); the
    /// lengths stay, so the padding is masked as any other. A `seq` at or below the current
    /// one changes nothing.
    pub fn pad_to(&mut self, seq: usize, pad_id: u32) {
        let old = self.shape.seq;
        if seq <= old {
            return;
        }
        let batch = self.shape.batch();
        let widen = |v: &[u32], fill: u32| -> Vec<u32> {
            let mut out = Vec::with_capacity(batch * seq);
            for row in v.chunks(old) {
                out.extend_from_slice(row);
                out.extend(std::iter::repeat_n(fill, seq - old));
            }
            out
        };
        self.ids = widen(&self.ids, pad_id);
        self.type_ids = widen(&self.type_ids, 0);
        self.shape.seq = seq;
    }
}

struct Linear<T> {
    w: T,
    b: T,
}

struct Norm<T> {
    gamma: T,
    beta: T,
}

struct Layer<T> {
    qkv: Linear<T>,
    attn_out: Linear<T>,
    attn_norm: Norm<T>,
    up: Linear<T>,
    down: Linear<T>,
    ffn_norm: Norm<T>,
}

struct Embeddings<T> {
    word: T,
    position: T,
    token_type: T,
    norm: Norm<T>,
}

/// A loaded BERT encoder on backend `B`.
pub struct Bert<B: Backend> {
    backend: B,
    config: BertConfig,
    eps: f32,
    embeddings: Embeddings<B::Tensor>,
    layers: Vec<Layer<B::Tensor>>,
    pooler: Option<Linear<B::Tensor>>,
    head: Option<Linear<B::Tensor>>,
    labels: Vec<String>,
}

impl<B: Backend> Bert<B> {
    /// Loads every weight of `file` onto `backend` (f16/bf16 upcast where the backend computes
    /// in f32), refusing non-finite values.
    pub fn load(backend: B, file: &ModelFile) -> Result<Bert<B>> {
        let Family::Bert(config) = &file.meta().family else {
            return Err(Error::format(
                file.path(),
                format!("a {} model, not a BERT encoder", file.meta().family.name()),
            ));
        };
        let config = config.clone();
        let w = |name: &str| backend.load_weight(&file.finite_tensor(name)?);
        let lin = |p: &str| -> Result<Linear<B::Tensor>> {
            Ok(Linear {
                w: w(&format!("{p}.weight"))?,
                b: w(&format!("{p}.bias"))?,
            })
        };
        let norm = |p: &str| -> Result<Norm<B::Tensor>> {
            Ok(Norm {
                gamma: w(&format!("{p}.weight"))?,
                beta: w(&format!("{p}.bias"))?,
            })
        };
        let embeddings = Embeddings {
            word: w("embeddings.word")?,
            position: w("embeddings.position")?,
            token_type: w("embeddings.token_type")?,
            norm: norm("embeddings.norm")?,
        };
        let layers = (0..config.num_layers)
            .map(|i| {
                let p = format!("layers.{i}");
                Ok(Layer {
                    qkv: lin(&format!("{p}.attention.qkv"))?,
                    attn_out: lin(&format!("{p}.attention.out"))?,
                    attn_norm: norm(&format!("{p}.attention.norm"))?,
                    up: lin(&format!("{p}.ffn.up"))?,
                    down: lin(&format!("{p}.ffn.down"))?,
                    ffn_norm: norm(&format!("{p}.ffn.norm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let pooler = if config.has_pooler {
            Some(lin("pooler")?)
        } else {
            None
        };
        let (head, labels) = match &file.meta().head {
            Some(h) => (Some(lin("head")?), h.labels.clone()),
            None => (None, Vec::new()),
        };
        Ok(Bert {
            eps: config.layer_norm_eps as f32,
            backend,
            config,
            embeddings,
            layers,
            pooler,
            head,
            labels,
        })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Class names of the head, in output order; empty without a head.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    pub fn has_head(&self) -> bool {
        self.head.is_some()
    }

    /// Stage `embeddings`: token states `[batch * seq, hidden]`.
    pub fn embed(&self, input: &EncoderInput) -> Result<B::Tensor> {
        let e = &self.embeddings;
        self.backend.embed(
            &input.ids,
            &input.type_ids,
            &input.shape,
            &e.word,
            &e.position,
            &e.token_type,
            &e.norm.gamma,
            &e.norm.beta,
            self.eps,
        )
    }

    /// Stage `layer.{i}`: one post-LN transformer block.
    pub fn layer(&self, i: usize, x: &B::Tensor, shape: &BatchShape) -> Result<B::Tensor> {
        let l = self.layers.get(i).ok_or_else(|| {
            Error::Input(format!(
                "layer {i} does not exist ({} layers)",
                self.layers.len()
            ))
        })?;
        let be = &self.backend;
        let qkv = be.linear(x, &l.qkv.w, Some(&l.qkv.b), Activation::None)?;
        let ctx = be.attention(&qkv, shape, self.config.num_heads)?;
        let attn = be.linear(&ctx, &l.attn_out.w, Some(&l.attn_out.b), Activation::None)?;
        let x = be.add_layernorm(&attn, x, &l.attn_norm.gamma, &l.attn_norm.beta, self.eps)?;
        let up = be.linear(&x, &l.up.w, Some(&l.up.b), Activation::GeluErf)?;
        let down = be.linear(&up, &l.down.w, Some(&l.down.b), Activation::None)?;
        be.add_layernorm(&down, &x, &l.ffn_norm.gamma, &l.ffn_norm.beta, self.eps)
    }

    /// The sentence vector `[batch, hidden]`: pooling, then L2 normalisation if configured.
    pub fn pool(&self, x: &B::Tensor, shape: &BatchShape) -> Result<B::Tensor> {
        let pooled = self.backend.pool(x, shape, self.config.pooling)?;
        if self.config.normalize {
            self.backend.l2_normalize(&pooled)
        } else {
            Ok(pooled)
        }
    }

    /// BERT's own pooler, `tanh(W h_cls + b)`, when the file has one (used to seed ramp heads).
    pub fn pooler(&self, cls: &B::Tensor) -> Result<Option<B::Tensor>> {
        self.pooler
            .as_ref()
            .map(|p| self.backend.linear(cls, &p.w, Some(&p.b), Activation::Tanh))
            .transpose()
    }

    /// Class probabilities `[batch, classes]` from sentence vectors, if the model has a head.
    pub fn classify(&self, pooled: &B::Tensor) -> Result<Option<B::Tensor>> {
        let Some(h) = &self.head else {
            return Ok(None);
        };
        let logits = self
            .backend
            .linear(pooled, &h.w, Some(&h.b), Activation::None)?;
        self.backend.softmax(&logits).map(Some)
    }

    /// All stages: sentence vectors and (with a head) class probabilities, on the host.
    pub fn forward(&self, input: &EncoderInput) -> Result<EncoderOutput> {
        let (pooled, probs) = self.forward_tensors(input)?;
        self.output(input, &pooled, probs.as_ref())
    }

    /// All stages, left on the backend: the `[batch, width]` sentence vectors and (with a head)
    /// the `[batch, classes]` probabilities. Only device work: what a graph can hold
    /// ([`crate::backend::Backend::graphed`]).
    pub fn forward_tensors(&self, input: &EncoderInput) -> Result<(B::Tensor, Option<B::Tensor>)> {
        let max = self.config.max_position_embeddings;
        if input.shape.seq > max {
            return Err(Error::Input(format!(
                "sequence of {} tokens is longer than the model's {max} positions",
                input.shape.seq
            )));
        }
        let mut x = self.embed(input)?;
        for i in 0..self.layers.len() {
            x = self.layer(i, &x, &input.shape)?;
        }
        let pooled = self.pool(&x, &input.shape)?;
        let probs = self.classify(&pooled)?;
        Ok((pooled, probs))
    }

    /// What [`Bert::forward`] returns, from [`Bert::forward_tensors`]' tensors.
    pub fn output(
        &self,
        input: &EncoderInput,
        pooled: &B::Tensor,
        probs: Option<&B::Tensor>,
    ) -> Result<EncoderOutput> {
        Ok(EncoderOutput {
            batch: input.shape.batch(),
            width: self.config.hidden_size,
            embeddings: self.backend.download(pooled)?,
            classes: self.labels.len(),
            probs: probs.map(|p| self.backend.download(p)).transpose()?,
        })
    }
}

/// Host-side results of [`Bert::forward`].
#[derive(Clone, Debug)]
pub struct EncoderOutput {
    pub batch: usize,
    pub width: usize,
    /// `[batch, width]` sentence vectors.
    pub embeddings: Vec<f32>,
    pub classes: usize,
    /// `[batch, classes]` probabilities when the model has a head.
    pub probs: Option<Vec<f32>>,
}

impl EncoderOutput {
    /// Sentence vector of input `i`. Panics if `i >= batch`, like slice indexing.
    pub fn embedding(&self, i: usize) -> &[f32] {
        &self.embeddings[i * self.width..(i + 1) * self.width]
    }

    /// `(class index, probability)` of the most likely class of input `i`.
    pub fn top1(&self, i: usize) -> Option<(usize, f32)> {
        self.top_k(i, 1).into_iter().next()
    }

    /// The `k` most likely classes of input `i`, best first. Panics if `i >= batch`.
    pub fn top_k(&self, i: usize, k: usize) -> Vec<(usize, f32)> {
        let Some(p) = &self.probs else {
            return Vec::new();
        };
        let row = &p[i * self.classes..(i + 1) * self.classes];
        let mut idx: Vec<usize> = (0..row.len()).collect();
        idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        idx.into_iter().take(k).map(|c| (c, row[c])).collect()
    }
}

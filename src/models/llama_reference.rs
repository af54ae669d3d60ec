//! A plain f32 forward pass of a LLaMA-family decoder read from a GGUF file, on the host: every
//! block-quantized weight decoded to f32 once ([`crate::quant::dequantize_row`]), one token at a
//! time with a growing key/value cache, no batching, no threads. It is the oracle the backend
//! implementation of the decoder family will be checked against, and it settles the file's
//! conventions against an independent implementation (tests/gguf_smollm2.rs compares it with
//! transformers): weight orientation, rotary pairs, grouped-query heads, the tied output.
//! Slow by design (about 0.06 s per token for SmolLM2-135M on the 2-core VM: 157 tokens in
//! about 9 s in tests/gguf_smollm2.rs); not a serving path.

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, GgufTensor};
use crate::quant::dequantize_rows;

/// The hyper-parameters a `llama` GGUF file declares.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
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
}

impl LlamaConfig {
    pub fn from_gguf(g: &GgufFile) -> Result<LlamaConfig> {
        let arch = g.architecture().unwrap_or("(none)");
        if arch != "llama" {
            return Err(Error::format(
                g.path(),
                format!("architecture `{arch}`: only `llama` is read"),
            ));
        }
        let n = |k: &str| g.require_u64(&format!("llama.{k}")).map(|v| v as usize);
        let width = n("embedding_length")?;
        let heads = n("attention.head_count")?;
        let kv_heads = n("attention.head_count_kv").unwrap_or(heads);
        let bad = |what: String| Error::format(g.path(), what);
        if heads == 0 || kv_heads == 0 || width % heads != 0 || heads % kv_heads != 0 {
            return Err(bad(format!(
                "width {width} with {heads} heads and {kv_heads} key/value heads do not divide"
            )));
        }
        let head_dim = width / heads;
        if head_dim % 2 != 0 {
            return Err(bad(format!("head dimension {head_dim} is odd")));
        }
        let vocab = g
            .tensor("token_embd.weight")
            .map(|t| t.shape()[0])
            .ok_or_else(|| bad("tensor `token_embd.weight` is missing".into()))?;
        Ok(LlamaConfig {
            blocks: n("block_count")?,
            width,
            ffn: n("feed_forward_length")?,
            heads,
            kv_heads,
            head_dim,
            // llama.cpp's default when the key is absent; present, it must be a number.
            rope_base: match g.get("llama.rope.freq_base") {
                None => 10000.0,
                Some(_) => g.require_f64("llama.rope.freq_base")? as f32,
            },
            eps: g.require_f64("llama.attention.layer_norm_rms_epsilon")? as f32,
            vocab,
            context: n("context_length")?,
        })
    }
}

/// A matrix of `rows` x `cols`, row-major (a GGUF `[cols, rows]` tensor: rows are outputs).
struct Matrix {
    cols: usize,
    data: Vec<f32>,
}

impl Matrix {
    fn load(g: &GgufFile, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let t = tensor(g, name)?;
        if t.shape() != [rows, cols] {
            return Err(Error::tensor(
                g.path(),
                name,
                format!("shape {:?}, expected [{rows}, {cols}]", t.shape()),
            ));
        }
        Ok(Matrix {
            cols,
            data: decode(g, t, rows * cols)?,
        })
    }

    /// `self * x`.
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        self.data
            .chunks_exact(self.cols)
            .map(|r| dot(r, x))
            .collect()
    }
}

pub(crate) fn tensor<'a>(g: &'a GgufFile, name: &str) -> Result<&'a GgufTensor> {
    g.tensor(name)
        .ok_or_else(|| Error::tensor(g.path(), name, "missing"))
}

pub(crate) fn decode(g: &GgufFile, t: &GgufTensor, n: usize) -> Result<Vec<f32>> {
    let mut out = vec![0f32; n];
    dequantize_rows(t.ggml_type, g.data(t), t.dims[0] as usize, &mut out)
        .map_err(|e| Error::tensor(g.path(), t.name.clone(), e))?;
    Ok(out)
}

pub(crate) fn vector(g: &GgufFile, name: &str, n: usize) -> Result<Vec<f32>> {
    let t = tensor(g, name)?;
    if t.shape() != [n] {
        return Err(Error::tensor(
            g.path(),
            name,
            format!("shape {:?}, expected [{n}]", t.shape()),
        ));
    }
    decode(g, t, n)
}

use crate::backend::cpu::simd::dot;

fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let s = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| v * s * w).collect()
}

struct Block {
    attn_norm: Vec<f32>,
    q: Matrix,
    k: Matrix,
    v: Matrix,
    o: Matrix,
    ffn_norm: Vec<f32>,
    gate: Matrix,
    up: Matrix,
    down: Matrix,
}

/// The decoder with its weights decoded, and one sequence's key/value cache.
pub struct ReferenceLlama {
    pub cfg: LlamaConfig,
    embed: Matrix,
    blocks: Vec<Block>,
    out_norm: Vec<f32>,
    /// Per block: keys and values of every position so far, `kv_heads * head_dim` each.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    pos: usize,
    /// `base^(-2i/head_dim)` for each pair `i` of a head, computed once at load.
    inv_freq: Vec<f32>,
}

impl ReferenceLlama {
    /// Decodes every weight of `g` (a `llama` file with tied or separate output weights).
    pub fn load(g: &GgufFile) -> Result<ReferenceLlama> {
        let cfg = LlamaConfig::from_gguf(g)?;
        let (w, kv) = (cfg.width, cfg.kv_heads * cfg.head_dim);
        let mut blocks = Vec::with_capacity(cfg.blocks);
        for b in 0..cfg.blocks {
            let m = |n: &str, r, c| Matrix::load(g, &format!("blk.{b}.{n}.weight"), r, c);
            blocks.push(Block {
                attn_norm: vector(g, &format!("blk.{b}.attn_norm.weight"), w)?,
                q: m("attn_q", w, w)?,
                k: m("attn_k", kv, w)?,
                v: m("attn_v", kv, w)?,
                o: m("attn_output", w, w)?,
                ffn_norm: vector(g, &format!("blk.{b}.ffn_norm.weight"), w)?,
                gate: m("ffn_gate", cfg.ffn, w)?,
                up: m("ffn_up", cfg.ffn, w)?,
                down: m("ffn_down", w, cfg.ffn)?,
            });
        }
        if g.tensor("output.weight").is_some() {
            return Err(Error::tensor(
                g.path(),
                "output.weight",
                "a separate output matrix is not read yet (tied embeddings are)",
            ));
        }
        Ok(ReferenceLlama {
            embed: Matrix::load(g, "token_embd.weight", cfg.vocab, w)?,
            out_norm: vector(g, "output_norm.weight", w)?,
            keys: vec![Vec::new(); cfg.blocks],
            values: vec![Vec::new(); cfg.blocks],
            pos: 0,
            inv_freq: (0..cfg.head_dim / 2)
                .map(|i| cfg.rope_base.powf(-2.0 * i as f32 / cfg.head_dim as f32))
                .collect(),
            blocks,
            cfg,
        })
    }

    /// Forgets the sequence.
    pub fn reset(&mut self) {
        self.keys.iter_mut().for_each(Vec::clear);
        self.values.iter_mut().for_each(Vec::clear);
        self.pos = 0;
    }

    /// Rotates each adjacent pair `(x[2i], x[2i+1])` of every head by `pos * base^(-2i/d)`.
    /// Adjacent pairs, not halves: llama.cpp's converter permutes the query and key rows of
    /// Hugging Face checkpoints so that GGUF files use this pairing (transformers undoes the
    /// permutation when it loads one and rotates halves).
    fn rope(&self, x: &mut [f32]) {
        let d = self.cfg.head_dim;
        // The angles depend on the position only: once per call, not per head.
        let turns: Vec<(f32, f32)> = self
            .inv_freq
            .iter()
            .map(|f| (self.pos as f32 * f).sin_cos())
            .collect();
        for head in x.chunks_mut(d) {
            for (i, &(s, c)) in turns.iter().enumerate() {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * c - b * s;
                head[2 * i + 1] = a * s + b * c;
            }
        }
    }

    /// Feeds one token; returns the logits of the next.
    pub fn step(&mut self, token: u32) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let t = token as usize;
        if t >= c.vocab {
            return Err(Error::Input(format!(
                "token id {token} is outside the vocabulary of {}",
                c.vocab
            )));
        }
        if self.pos >= c.context {
            return Err(Error::Input(format!(
                "the sequence is at the context length {}",
                c.context
            )));
        }
        let (d, kvd, group) = (c.head_dim, c.kv_heads * c.head_dim, c.heads / c.kv_heads);
        let mut x = self.embed.data[t * c.width..(t + 1) * c.width].to_vec();
        for (b, blk) in self.blocks.iter().enumerate() {
            let h = rms_norm(&x, &blk.attn_norm, c.eps);
            let mut q = blk.q.apply(&h);
            let mut k = blk.k.apply(&h);
            let v = blk.v.apply(&h);
            self.rope(&mut q);
            self.rope(&mut k);
            self.keys[b].extend_from_slice(&k);
            self.values[b].extend_from_slice(&v);
            let n = self.pos + 1;
            let scale = 1.0 / (d as f32).sqrt();
            let mut att = vec![0f32; c.width];
            for head in 0..c.heads {
                let kvh = head / group;
                let qh = &q[head * d..(head + 1) * d];
                let mut s: Vec<f32> = (0..n)
                    .map(|p| {
                        dot(
                            qh,
                            &self.keys[b][p * kvd + kvh * d..p * kvd + (kvh + 1) * d],
                        ) * scale
                    })
                    .collect();
                let m = s.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                let mut z = 0f32;
                for v in &mut s {
                    *v = (*v - m).exp();
                    z += *v;
                }
                let out = &mut att[head * d..(head + 1) * d];
                for (p, w) in s.iter().enumerate() {
                    let vv = &self.values[b][p * kvd + kvh * d..p * kvd + (kvh + 1) * d];
                    for (o, v) in out.iter_mut().zip(vv) {
                        *o += w / z * v;
                    }
                }
            }
            for (xi, o) in x.iter_mut().zip(blk.o.apply(&att)) {
                *xi += o;
            }
            let h = rms_norm(&x, &blk.ffn_norm, c.eps);
            let gate = blk.gate.apply(&h);
            let up = blk.up.apply(&h);
            let act: Vec<f32> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            for (xi, o) in x.iter_mut().zip(blk.down.apply(&act)) {
                *xi += o;
            }
        }
        self.pos += 1;
        let h = rms_norm(&x, &self.out_norm, c.eps);
        // Tied: the output layer is the token embedding.
        Ok(self.embed.apply(&h))
    }
}

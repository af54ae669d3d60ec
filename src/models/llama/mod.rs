//! The LLaMA-family decoder on any [`DecoderBackend`]: RMSNorm, rotary embeddings,
//! grouped-query attention over a paged key/value cache ([`cache`]), the SwiGLU MLP and a tied
//! (or separate) output head, with the block-quantized weights of a GGUF file kept as blocks.
//!
//! A step ([`Llama::forward`]) runs any mix of sequences at once: a prompt chunk of one, the
//! next token of others (iteration-level batching); every row attends to its own sequence's
//! cache. The query, key and value projections of a block are one fused matrix (their rows
//! concatenated), and so are the gate and up projections, so a block is five products.
//! Stages are blocks: the ramp-eligible points are the block outputs.

pub mod cache;
pub mod generate;
pub mod sampling;

use crate::backend::decoder::{DecoderBackend, Heads, KvPlan};
use crate::error::{Error, Result};
use crate::format::llama_config::LlamaFileConfig;
use crate::format::{Family, ModelFile};
use crate::gguf::{GgmlType, GgufFile};
pub use crate::models::llama_reference::LlamaConfig;
use crate::models::llama_reference::{tensor, vector};
pub use cache::{KvCache, KvCacheConfig, SeqCache};

impl From<&LlamaFileConfig> for LlamaConfig {
    fn from(c: &LlamaFileConfig) -> LlamaConfig {
        LlamaConfig {
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
        }
    }
}
pub use generate::{GenerateConfig, GenerateStats, Sequence, generate};
pub use sampling::{Sampler, Sampling};

struct Block<B: DecoderBackend> {
    attn_norm: B::Tensor,
    qkv: B::QTensor,
    o: B::QTensor,
    ffn_norm: B::Tensor,
    gate_up: B::QTensor,
    down: B::QTensor,
}

/// The hidden state of a step's rows between blocks: the residual stream `h` and the last
/// block's output `delta`, not yet added (the addition is fused into the next RMSNorm).
pub struct Hidden<B: DecoderBackend> {
    h: B::Tensor,
    delta: Option<B::Tensor>,
}

/// Part of a step: `tokens` of one sequence at positions `start..start + tokens.len()`, its
/// cache blocks `table` (reserved to cover them).
#[derive(Copy, Clone, Debug)]
pub struct Chunk<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    pub table: &'a [u32],
}

pub struct Llama<B: DecoderBackend> {
    pub cfg: LlamaConfig,
    be: B,
    embed: B::QTensor,
    /// A separate output matrix; `None` when the head is tied to the embedding.
    head: Option<B::QTensor>,
    blocks: Vec<Block<B>>,
    out_norm: B::Tensor,
}

/// The rows of `names` (each `[rows_i, cols]`) one after another, as one block-quantized matrix:
/// kept as they are when all share a type with kernels, else every part requantized to Q8_0
/// (f32/f16 weights, or a mix of types).
pub(crate) fn fused_rows(
    g: &GgufFile,
    names: &[String],
    cols: usize,
) -> Result<(GgmlType, usize, Vec<u8>)> {
    let ts = names
        .iter()
        .map(|n| tensor(g, n))
        .collect::<Result<Vec<_>>>()?;
    for t in &ts {
        let s = t.shape();
        if s.len() != 2 || s[1] != cols {
            return Err(Error::tensor(
                g.path(),
                t.name.clone(),
                format!("shape {s:?}, expected [rows, {cols}]"),
            ));
        }
    }
    let rows: usize = ts.iter().map(|t| t.shape()[0]).sum();
    let ty = ts[0].ggml_type;
    if ts.iter().all(|t| t.ggml_type == ty) && matches!(ty, GgmlType::Q4_1 | GgmlType::Q8_0) {
        let bytes = ts.iter().flat_map(|t| g.data(t).iter().copied()).collect();
        return Ok((ty, rows, bytes));
    }
    let mut bytes = Vec::new();
    for t in &ts {
        let values = crate::models::llama_reference::decode(g, t, t.shape()[0] * cols)?;
        bytes.extend(crate::quant::quantize_q8_0(&values));
    }
    Ok((GgmlType::Q8_0, rows, bytes))
}

/// The tokens of a GGUF file that end a generation: end of sequence and, where named, end of
/// turn.
pub fn stop_tokens(g: &GgufFile) -> Vec<u32> {
    let mut v: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
        .iter()
        .filter_map(|k| g.get(k).and_then(|v| v.as_u64()))
        .map(|v| v as u32)
        .collect();
    v.dedup();
    v
}

impl<B: DecoderBackend> Llama<B> {
    /// Loads a `llama` GGUF file onto `be`.
    pub fn load(be: B, g: &GgufFile) -> Result<Llama<B>> {
        let cfg = LlamaConfig::from_gguf(g)?;
        let w = cfg.width;
        let q = |names: &[String], cols: usize| -> Result<B::QTensor> {
            let (ty, rows, bytes) = fused_rows(g, names, cols)?;
            be.load_quantized(ty, rows, cols, &bytes)
                .map_err(|e| Error::tensor(g.path(), names.join(" + "), e.to_string()))
        };
        let norm = |name: &str| be.upload(&vector(g, name, w)?, &[w]);
        let mut blocks = Vec::with_capacity(cfg.blocks);
        for b in 0..cfg.blocks {
            let n = |s: &str| format!("blk.{b}.{s}.weight");
            blocks.push(Block {
                attn_norm: norm(&n("attn_norm"))?,
                qkv: q(&[n("attn_q"), n("attn_k"), n("attn_v")], w)?,
                o: q(&[n("attn_output")], w)?,
                ffn_norm: norm(&n("ffn_norm"))?,
                gate_up: q(&[n("ffn_gate"), n("ffn_up")], w)?,
                down: q(&[n("ffn_down")], cfg.ffn)?,
            });
        }
        let head = match g.tensor("output.weight") {
            Some(_) => Some(q(&["output.weight".into()], w)?),
            None => None,
        };
        let model = Llama {
            embed: q(&["token_embd.weight".into()], w)?,
            head,
            out_norm: norm("output_norm.weight")?,
            blocks,
            cfg,
            be,
        };
        model.check_shapes(g)?;
        Ok(model)
    }

    /// Loads a model file converted from GGUF (`apparate convert model.gguf`): the blocks go
    /// to the backend straight from the memory-mapped file.
    pub fn load_file(be: B, file: &ModelFile) -> Result<Llama<B>> {
        let Family::Llama(fc) = &file.meta().family else {
            return Err(Error::format(
                file.path(),
                format!("a {} model, not a llama decoder", file.meta().family.name()),
            ));
        };
        let cfg = LlamaConfig::from(fc);
        let q = |name: &str| -> Result<B::QTensor> {
            let (ty, [rows, cols], bytes) = file.blocks(name)?;
            be.load_quantized(ty, rows, cols, bytes)
                .map_err(|e| Error::tensor(file.path(), name, e.to_string()))
        };
        let norm = |name: &str| {
            let v = file.finite_tensor(name)?;
            be.upload(&v.to_f32(), &[cfg.width])
        };
        let blocks = (0..cfg.blocks)
            .map(|b| {
                let n = |s: &str| format!("blk.{b}.{s}.weight");
                Ok(Block {
                    attn_norm: norm(&n("attn_norm"))?,
                    qkv: q(&n("attn_qkv"))?,
                    o: q(&n("attn_output"))?,
                    ffn_norm: norm(&n("ffn_norm"))?,
                    gate_up: q(&n("ffn_gate_up"))?,
                    down: q(&n("ffn_down"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head = if fc.tied {
            None
        } else {
            Some(q("output.weight")?)
        };
        Ok(Llama {
            embed: q("token_embd.weight")?,
            head,
            out_norm: norm("output_norm.weight")?,
            blocks,
            cfg,
            be,
        })
    }

    /// A model of `cfg`'s shape with random weights, blocks of type `ty` (Q4_1 or Q8_0) and the
    /// head tied to the embedding: for speed measurements of shapes whose files are not at
    /// hand (the kernel benchmark times TinyLlama's blocks on a GPU this way). Every block gets
    /// the same weights (drawn once; uploaded per block, so memory traffic is as a real model's).
    /// Its output is noise.
    pub fn random(be: B, cfg: LlamaConfig, ty: GgmlType, seed: u64) -> Result<Llama<B>> {
        let mut rng = crate::rng::SplitMix::new(seed);
        let mut draw = |rows: usize, cols: usize| -> Result<(usize, usize, Vec<u8>)> {
            let v: Vec<f32> = (0..rows * cols)
                .map(|_| (rng.uniform() * 2.0 - 1.0) * 0.05)
                .collect();
            let bytes = crate::quant::quantize(ty, &v)
                .map_err(|e| Error::Input(format!("random {rows} x {cols} weights: {e}")))?;
            Ok((rows, cols, bytes))
        };
        let h = &cfg;
        let mats = [
            draw((h.heads + 2 * h.kv_heads) * h.head_dim, h.width)?,
            draw(h.width, h.heads * h.head_dim)?,
            draw(2 * h.ffn, h.width)?,
            draw(h.width, h.ffn)?,
        ];
        let embed = draw(h.vocab, h.width)?;
        let q = |(rows, cols, bytes): &(usize, usize, Vec<u8>)| {
            be.load_quantized(ty, *rows, *cols, bytes)
        };
        let ones = || be.upload(&vec![1.0; h.width], &[h.width]);
        let blocks = (0..h.blocks)
            .map(|_| {
                Ok(Block {
                    attn_norm: ones()?,
                    qkv: q(&mats[0])?,
                    o: q(&mats[1])?,
                    ffn_norm: ones()?,
                    gate_up: q(&mats[2])?,
                    down: q(&mats[3])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Llama {
            embed: q(&embed)?,
            head: None,
            out_norm: ones()?,
            blocks,
            cfg,
            be,
        })
    }

    /// The fused matrices have the shapes the configuration implies.
    fn check_shapes(&self, g: &GgufFile) -> Result<()> {
        let c = &self.cfg;
        let hd = self.heads();
        for (b, blk) in self.blocks.iter().enumerate() {
            for (what, t, rows) in [
                ("attn_q + attn_k + attn_v", &blk.qkv, hd.qkv_width()),
                ("attn_output", &blk.o, c.width),
                ("ffn_gate + ffn_up", &blk.gate_up, 2 * c.ffn),
                ("ffn_down", &blk.down, c.width),
            ] {
                let got = self.be.qinfo(t).rows;
                if got != rows {
                    return Err(Error::tensor(
                        g.path(),
                        format!("blk.{b}.{what}"),
                        format!("{got} rows, expected {rows}"),
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn backend(&self) -> &B {
        &self.be
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn heads(&self) -> Heads {
        Heads {
            heads: self.cfg.heads,
            kv_heads: self.cfg.kv_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    /// A key/value cache for this model on its backend.
    pub fn new_cache(&self, cfg: KvCacheConfig) -> Result<KvCache<B>> {
        KvCache::new(&self.be, self.cfg.blocks, self.heads().kv_width(), cfg)
    }

    /// One step: every chunk's tokens through every block, their keys and values written to
    /// `cache`; returns the logits `[chunks, vocab]` of each chunk's last token. The caller
    /// has reserved the chunks' blocks ([`KvCache::reserve`]) and records the new lengths.
    ///
    /// A decode step (one token of each sequence) repeats its shape step after step, so on a
    /// backend that graphs runs ([`crate::backend::Backend::graphed`]) it is one graph per
    /// (model, cache, sequences, table width): the block tables padded to the next power of two
    /// blocks (with block 0, never read: rows read only up to their position), so the step's
    /// buffers and launches stay the same until a table outgrows its width. The plan and the
    /// token ids are uploaded inside the graph; the logits live in its buffers until the same
    /// shape's next step. Prompt chunks vary in length and run eagerly.
    pub fn forward(&self, cache: &mut KvCache<B>, chunks: &[Chunk<'_>]) -> Result<B::Tensor> {
        let decode = !chunks.is_empty() && chunks.iter().all(|c| c.tokens.len() == 1);
        if !(decode && self.be.graphs_enabled()) {
            return self.forward_observed(cache, chunks, |_, _| Ok(()));
        }
        let width = chunks
            .iter()
            .map(|c| c.table.len())
            .max()
            .unwrap_or(1)
            .next_power_of_two();
        let key = format!(
            "{:p} {:p} decode {}x{width}",
            self as *const Self,
            cache as *const KvCache<B>,
            chunks.len()
        );
        self.be.graphed(&key, &mut || {
            self.step(cache, chunks, width, &mut |_, _| Ok(()))
        })
    }

    /// [`Llama::forward`], calling `observe(block, hidden)` after each block with the step's
    /// hidden state (every row): where ramps read the model ([`Llama::head_logits`]).
    pub fn forward_observed(
        &self,
        cache: &mut KvCache<B>,
        chunks: &[Chunk<'_>],
        mut observe: impl FnMut(usize, &Hidden<B>) -> Result<()>,
    ) -> Result<B::Tensor> {
        self.step(cache, chunks, 0, &mut observe)
    }

    /// A step with every block table padded to `width` blocks (0: as they are).
    fn step(
        &self,
        cache: &mut KvCache<B>,
        chunks: &[Chunk<'_>],
        width: usize,
        observe: &mut dyn FnMut(usize, &Hidden<B>) -> Result<()>,
    ) -> Result<B::Tensor> {
        let (plan, ids, last) = self.plan(cache, chunks, width)?;
        let mut hid = Hidden {
            h: self.be.embed_quantized(&ids, &self.embed)?,
            delta: None,
        };
        for b in 0..self.blocks.len() {
            hid = self.block(b, cache, &plan, hid)?;
            observe(b, &hid)?;
        }
        self.head_logits(&hid, &last)
    }

    /// The step's plan (checked; tables padded to `width` blocks with block 0), its token ids
    /// and each chunk's last row.
    fn plan(
        &self,
        cache: &KvCache<B>,
        chunks: &[Chunk<'_>],
        width: usize,
    ) -> Result<(B::Plan, Vec<u32>, Vec<u32>)> {
        let c = &self.cfg;
        let mut plan = KvPlan::new(cache.block_size(), cache.blocks());
        let mut ids = Vec::new();
        let mut last = Vec::with_capacity(chunks.len());
        for ch in chunks {
            if ch.tokens.is_empty() {
                return Err(Error::Input("a chunk without tokens".into()));
            }
            if ch.start + ch.tokens.len() > c.context {
                return Err(Error::Input(format!(
                    "{} positions are more than the model's context of {}",
                    ch.start + ch.tokens.len(),
                    c.context
                )));
            }
            if ch.table.len() < width {
                let mut table = ch.table.to_vec();
                table.resize(width, 0);
                plan.push(&table, ch.start, ch.tokens.len())?;
            } else {
                plan.push(ch.table, ch.start, ch.tokens.len())?;
            }
            ids.extend_from_slice(ch.tokens);
            last.push((ids.len() - 1) as u32);
        }
        if ids.is_empty() {
            return Err(Error::Input("a step without chunks".into()));
        }
        Ok((self.be.upload_plan(&plan)?, ids, last))
    }

    /// Block `b` on the rows of `plan`: their keys and values go to the cache's layer `b`.
    fn block(
        &self,
        b: usize,
        cache: &mut KvCache<B>,
        plan: &B::Plan,
        hid: Hidden<B>,
    ) -> Result<Hidden<B>> {
        let (be, c, blk) = (&self.be, &self.cfg, &self.blocks[b]);
        let layer = &mut cache.layers[b];
        let Hidden { mut h, delta } = hid;
        let (sum, n) = be.rms_norm(&h, delta.as_ref(), &blk.attn_norm, c.eps)?;
        if let Some(s) = sum {
            h = s;
        }
        let mut qkv = be.qlinear(&n, &blk.qkv)?;
        be.rope(
            &mut qkv,
            plan,
            c.heads + c.kv_heads,
            c.head_dim,
            c.rope_base,
        )?;
        let a = be.kv_attention(&qkv, layer, plan, self.heads())?;
        let o = be.qlinear(&a, &blk.o)?;
        let (sum, n) = be.rms_norm(&h, Some(&o), &blk.ffn_norm, c.eps)?;
        let h = sum.expect("a residual was given");
        let act = be.silu_mul(&be.qlinear(&n, &blk.gate_up)?)?;
        let delta = Some(be.qlinear(&act, &blk.down)?);
        Ok(Hidden { h, delta })
    }

    /// The residual stream (`h + delta`) of `rows` of a hidden state: `[rows, width]`, what a
    /// trained ramp adapter reads.
    pub fn hidden_rows(&self, hid: &Hidden<B>, rows: &[u32]) -> Result<B::Tensor> {
        let be = &self.be;
        let h = be.select_rows(&hid.h, rows)?;
        let Some(d) = &hid.delta else {
            return Ok(h);
        };
        let d = be.select_rows(d, rows)?;
        let (sum, _) = be.rms_norm(&h, Some(&d), &self.out_norm, self.cfg.eps)?;
        Ok(sum.expect("a residual was given"))
    }

    /// The final RMSNorm and the output head on `rows` of a hidden state: `[rows, vocab]`
    /// logits. After the last block these are the model's; after an earlier one, a ramp's.
    pub fn head_logits(&self, hid: &Hidden<B>, rows: &[u32]) -> Result<B::Tensor> {
        let be = &self.be;
        let last_rows = be.select_rows(&hid.h, rows)?;
        let last_delta = match &hid.delta {
            Some(d) => Some(be.select_rows(d, rows)?),
            None => None,
        };
        let (_, n) = be.rms_norm(
            &last_rows,
            last_delta.as_ref(),
            &self.out_norm,
            self.cfg.eps,
        )?;
        be.qlinear(&n, self.head.as_ref().unwrap_or(&self.embed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::capture::{GraphConfig, GraphDevice};
    use crate::backend::emu::{EmuConfig, EmuDevice};
    use crate::backend::gpu::GpuBackend;
    use crate::tensor::DType;
    use std::sync::Arc;

    /// A random two-block decoder with Q8_0 weights: 4 query heads over 2 key/value heads of
    /// 16.
    fn tiny<B: DecoderBackend>(be: B, seed: u64) -> Llama<B> {
        let cfg = LlamaConfig {
            blocks: 2,
            width: 64,
            ffn: 96,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            rope_base: 10000.0,
            eps: 1e-5,
            vocab: 48,
            context: 64,
        };
        Llama::random(be, cfg, GgmlType::Q8_0, seed).unwrap()
    }

    /// Two sequences' prompts (one chunk each), then `steps` greedy decode steps of both at
    /// once; every step's logits.
    fn decode<B: DecoderBackend>(m: &Llama<B>, steps: usize) -> Vec<Vec<f32>> {
        let cfg = KvCacheConfig {
            block_size: 4,
            budget_bytes: 1 << 20,
        };
        let mut cache = m.new_cache(cfg).unwrap();
        let mut seqs = [SeqCache::default(), SeqCache::default()];
        let prompts: [&[u32]; 2] = [&[1, 2, 3], &[4, 5, 6, 7, 8]];
        let mut out = Vec::new();
        let mut next = Vec::new();
        let argmax =
            |v: &[f32]| (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b }) as u32;
        for (seq, prompt) in seqs.iter_mut().zip(prompts) {
            cache.reserve(seq, prompt.len()).unwrap();
            let chunk = Chunk {
                tokens: prompt,
                start: 0,
                table: seq.table(),
            };
            let logits =
                m.be.download(&m.forward(&mut cache, &[chunk]).unwrap())
                    .unwrap();
            cache.set_len(seq, prompt.len());
            next.push(argmax(&logits));
            out.push(logits);
        }
        for _ in 0..steps {
            for seq in &mut seqs {
                let len = seq.len();
                cache.reserve(seq, len + 1).unwrap();
            }
            let tokens: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
            let chunks: Vec<Chunk<'_>> = seqs
                .iter()
                .zip(&tokens)
                .map(|(s, t)| Chunk {
                    tokens: t,
                    start: s.len(),
                    table: s.table(),
                })
                .collect();
            let logits =
                m.be.download(&m.forward(&mut cache, &chunks).unwrap())
                    .unwrap();
            for seq in &mut seqs {
                let len = seq.len();
                cache.set_len(seq, len + 1);
            }
            next = logits.chunks(m.cfg.vocab).map(argmax).collect();
            out.push(logits);
        }
        out
    }

    /// Decode steps on a backend that graphs runs: recorded per (sequences, table width) and
    /// replayed, with the same logits as the plain device step for step, no replay abandoned
    /// as the sequences grow inside their tables (the flash kernel's chunks follow the tables,
    /// not the positions), a new graph when a table outgrows its width. (Without the padded
    /// tables, replays were abandoned as the tables grew: checked once by mutation.)
    #[test]
    fn graphed_decode_steps_match_the_plain_device() {
        let emu = || Arc::new(EmuDevice::new(EmuConfig::default()).unwrap());
        let plain = tiny(GpuBackend::shared(emu(), DType::F32), 5);
        let graphs = Arc::new(GraphDevice::with_config(
            emu(),
            GraphConfig {
                eager_runs: 0,
                ..GraphConfig::default()
            },
        ));
        let graphed = tiny(GpuBackend::shared(graphs.clone(), DType::F32), 5);
        let (want, got) = (decode(&plain, 8), decode(&graphed, 8));
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "step {i}");
        }
        // Positions 3..11 and 5..13 in blocks of 4: tables of 1-3 and 2-4 blocks, padded to
        // widths 2 and 4, so two graphs, each recorded once and replayed for the other steps.
        let s = graphs.stats();
        assert_eq!((s.recorded, s.rerecorded), (2, 0), "{s:?}");
        assert_eq!(s.replayed, 6, "{s:?}");
    }
}

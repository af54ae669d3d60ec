//! Generation for one sequence at a time: the prompt prefilled in chunks, then one token per
//! step, each handed to the caller as soon as it is chosen. (Many sequences at once go through
//! [`crate::generation::Engine`], which batches their steps.)

use std::time::Instant;

use super::cache::{KvCache, SeqCache};
use super::sampling::{Sampler, Sampling};
use super::{Chunk, Llama};
use crate::backend::decoder::DecoderBackend;
use crate::error::{Error, Result};

/// Settings of a generation.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateConfig {
    /// Tokens to generate at most. Default 256.
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// Prompt tokens per prefill step. Default 256: long prompts go in pieces so one step's
    /// activations stay small (and, batched, so running sequences are not stalled by them).
    pub prefill_chunk: usize,
    /// Tokens that end the generation (emitted, then stop); usually the end-of-sequence and
    /// end-of-turn tokens of the model.
    pub stop: Vec<u32>,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        GenerateConfig {
            max_tokens: 256,
            sampling: Sampling::default(),
            prefill_chunk: 256,
            stop: Vec::new(),
        }
    }
}

/// What a generation did, for the speed report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub prefill_secs: f64,
    pub generated: usize,
    /// Time of the decode steps (after the first token, which the prefill produced).
    pub decode_secs: f64,
    /// The generation ended on a stop token (else on `max_tokens` or the caller).
    pub stopped: bool,
}

/// One sequence's place in the cache, fed a piece at a time.
pub struct Sequence {
    cache: SeqCache,
}

impl Default for Sequence {
    fn default() -> Self {
        Self::new()
    }
}

impl Sequence {
    pub fn new() -> Sequence {
        Sequence {
            cache: SeqCache::default(),
        }
    }

    /// Positions so far.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Feeds `tokens` (in steps of at most `chunk`) and returns the logits after the last one
    /// (`[1, vocab]`, on the backend).
    pub fn feed<B: DecoderBackend>(
        &mut self,
        model: &Llama<B>,
        cache: &mut KvCache<B>,
        tokens: &[u32],
        chunk: usize,
    ) -> Result<B::Tensor> {
        if tokens.is_empty() {
            return Err(Error::Input("no tokens to feed".into()));
        }
        let mut out = None;
        for piece in tokens.chunks(chunk.max(1)) {
            let start = self.cache.len();
            cache.reserve(&mut self.cache, start + piece.len())?;
            let logits = model.forward(
                cache,
                &[Chunk {
                    tokens: piece,
                    start,
                    table: self.cache.table(),
                }],
            )?;
            cache.set_len(&mut self.cache, start + piece.len());
            out = Some(logits);
        }
        Ok(out.expect("at least one piece"))
    }

    /// Gives the sequence's blocks back to the cache.
    pub fn release<B: DecoderBackend>(&mut self, cache: &mut KvCache<B>) {
        cache.release(&mut self.cache);
    }
}

/// The next token from a `[1, vocab]` logits tensor: greedy on the backend, else sampled on
/// the host.
fn choose<B: DecoderBackend>(be: &B, logits: &B::Tensor, sampler: &mut Sampler) -> Result<u32> {
    if sampler.config().is_greedy() {
        Ok(be.argmax(logits)?[0])
    } else {
        Ok(sampler.sample(&be.download(logits)?))
    }
}

/// Generates from `prompt`, calling `emit` with each token as soon as it is chosen; `emit`
/// returns false to stop early. The sequence's cache blocks are released at the end, whatever
/// the outcome.
pub fn generate<B: DecoderBackend>(
    model: &Llama<B>,
    cache: &mut KvCache<B>,
    prompt: &[u32],
    cfg: &GenerateConfig,
    mut emit: impl FnMut(u32) -> bool,
) -> Result<GenerateStats> {
    let mut sampler = Sampler::new(cfg.sampling)?;
    let mut seq = Sequence::new();
    let result = (|| {
        let mut stats = GenerateStats {
            prompt_tokens: prompt.len(),
            ..GenerateStats::default()
        };
        if cfg.max_tokens == 0 {
            return Ok(stats);
        }
        let t0 = Instant::now();
        let logits = seq.feed(model, cache, prompt, cfg.prefill_chunk)?;
        let mut next = choose(model.backend(), &logits, &mut sampler)?;
        stats.prefill_secs = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        loop {
            stats.generated += 1;
            let go_on = emit(next);
            if cfg.stop.contains(&next) {
                stats.stopped = true;
                break;
            }
            if !go_on || stats.generated >= cfg.max_tokens {
                break;
            }
            if seq.len() + 1 > model.cfg.context {
                break;
            }
            let logits = seq.feed(model, cache, &[next], 1)?;
            next = choose(model.backend(), &logits, &mut sampler)?;
        }
        stats.decode_secs = t1.elapsed().as_secs_f64();
        Ok(stats)
    })();
    seq.release(cache);
    result
}

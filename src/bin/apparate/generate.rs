//! `apparate generate`: text from a decoder model (a `llama` GGUF file), streamed to standard
//! output token by token; the prefill and decode speed to standard error.

use std::io::Read as _;
use std::path::PathBuf;

use apparate::backend::decoder::DecoderBackend;
use apparate::generation::LanguageModel;
use apparate::models::llama::{GenerateConfig, KvCacheConfig, Sampling, generate};
use apparate::select::{DecoderJob, with_decoder_backend};
use apparate::{Error, Result};
use clap::Args;

use super::{DeviceArgs, emit};

#[derive(Args)]
pub struct GenerateArgs {
    /// The model: a `llama` GGUF file (e.g. weights/smollm2-135m-instruct.q4_1.gguf) or a model
    /// file converted from one.
    #[arg(short, long)]
    model: PathBuf,
    /// The prompt; `-` reads it from standard input.
    prompt: String,
    /// Feed the prompt as it is, without the model's chat template.
    #[arg(long)]
    raw: bool,
    /// A system message before the prompt (chat template only).
    #[arg(long)]
    system: Option<String>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy (the most likely token every step).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample only among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample only among the most likely tokens whose probabilities add up to p (1: all).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampler (the same seed, prompt and settings give the same text).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating after the end-of-turn token (up to --max-tokens).
    #[arg(long)]
    ignore_eos: bool,
    /// Print token ids instead of text, one per line.
    #[arg(long)]
    ids: bool,
    /// Most memory the key/value cache may take, in MiB (it takes what the prompt and
    /// --max-tokens need, up to this).
    #[arg(long, default_value_t = 256)]
    kv_cache_mib: usize,
    /// CPU only: quantize activations to 8 bits in the weight products, as llama.cpp does
    /// (faster at large batches, but the output drifts from the f32 model's).
    #[arg(long)]
    q8_activations: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

struct Job(GenerateArgs, String);

impl DecoderJob for Job {
    type Output = ();
    fn run<B: DecoderBackend + 'static>(self, be: B, what: String) -> Result<()> {
        let Job(a, prompt) = self;
        let t0 = std::time::Instant::now();
        let tm = LanguageModel::open(be, &a.model)?;
        eprintln!(
            "loaded {} ({} blocks, width {}, vocabulary {}) on the {what} in {:.2} s",
            a.model.display(),
            tm.model.cfg.blocks,
            tm.model.cfg.width,
            tm.model.cfg.vocab,
            t0.elapsed().as_secs_f64()
        );
        if tm.template.is_none() && !a.raw {
            eprintln!("(the model has no chat template: the prompt goes in as it is)");
        }
        let ids = tm.prompt_ids(&prompt, a.raw, a.system.as_deref())?;
        // One generation needs prompt + max_tokens positions: the cache is that large, with
        // --kv-cache-mib as its ceiling (so a huge ceiling allocates nothing extra).
        let kv = KvCacheConfig::default();
        let per_position = tm.model.cfg.blocks
            * 2
            * tm.model.heads().kv_width()
            * tm.model.backend().value_bytes();
        let positions = (ids.len() + a.max_tokens).min(tm.model.cfg.context);
        let need = positions.div_ceil(kv.block_size) * kv.block_size * per_position;
        let mut cache = tm.model.new_cache(KvCacheConfig {
            budget_bytes: (a.kv_cache_mib << 20).min(need),
            ..kv
        })?;
        if ids.len() + a.max_tokens > cache.capacity().min(tm.model.cfg.context) {
            return Err(Error::Input(format!(
                "{} prompt tokens + {} to generate do not fit the {} positions of the cache \
                 (--kv-cache-mib {}) and the model's context of {}",
                ids.len(),
                a.max_tokens,
                cache.capacity(),
                a.kv_cache_mib,
                tm.model.cfg.context
            )));
        }
        let cfg = GenerateConfig {
            max_tokens: a.max_tokens,
            sampling: Sampling {
                temperature: a.temperature,
                top_k: a.top_k,
                top_p: a.top_p,
                seed: a.seed,
            },
            stop: if a.ignore_eos {
                Vec::new()
            } else {
                tm.stop.clone()
            },
            ..GenerateConfig::default()
        };
        let mut text = tm.text_stream();
        let mut failed: Option<Error> = None;
        let stats = generate(&tm.model, &mut cache, &ids, &cfg, |t| {
            let piece = if a.ids {
                Ok(format!("{t}\n"))
            } else {
                text.push(t)
            };
            match piece.and_then(|p| emit(&p)) {
                Ok(()) => true,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        if !a.ids {
            emit("\n")?;
        }
        let decoded = stats.generated.saturating_sub(1);
        eprintln!(
            "prefill: {} tokens in {:.3} s ({:.1} tokens/s); decode: {} tokens in {:.3} s ({:.1} tokens/s, {:.1} ms/token){}",
            stats.prompt_tokens,
            stats.prefill_secs,
            stats.prompt_tokens as f64 / stats.prefill_secs.max(1e-9),
            decoded,
            stats.decode_secs,
            decoded as f64 / stats.decode_secs.max(1e-9),
            stats.decode_secs * 1e3 / decoded.max(1) as f64,
            if stats.stopped {
                "; ended at the end-of-turn token"
            } else {
                ""
            }
        );
        // Decode steps are graphs on the GPU backends (prompt chunks run eagerly).
        if let Some(g) = tm.model.backend().graph_probe().map(|p| p())
            && tm.model.backend().graphs_enabled()
        {
            eprintln!(
                "graphs: {} decode steps recorded, {} replayed as one graph launch, {} eager, {} replays abandoned",
                g.recorded, g.replayed, g.eager, g.rerecorded
            );
        }
        Ok(())
    }
}

pub fn run(a: GenerateArgs) -> Result<()> {
    Sampling {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    }
    .check()?;
    super::check_count("--max-tokens", a.max_tokens, 1, 1 << 20)?;
    super::check_count("--kv-cache-mib", a.kv_cache_mib, 1, 1 << 20)?;
    if a.q8_activations && !matches!(a.device.backend, super::BackendArg::Cpu) {
        return Err(Error::config(
            "--q8-activations",
            "on",
            "the cpu backend (the GPU kernels take f32 activations)",
        ));
    }
    let prompt = if a.prompt == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| Error::Io {
                path: "<stdin>".into(),
                source: e,
            })?;
        s
    } else {
        a.prompt.clone()
    };
    let choice = a.device.choice()?;
    if a.q8_activations {
        let apparate::select::BackendChoice::Cpu { threads } = choice else {
            unreachable!("checked above")
        };
        let be = apparate::backend::CpuBackend::new(apparate::backend::CpuConfig {
            threads,
            ..Default::default()
        })?
        .with_q8_activations(true);
        let what = format!("cpu backend, {} threads, 8-bit activations", be.threads());
        return Job(a, prompt).run(be, what);
    }
    with_decoder_backend(&choice, Job(a, prompt))
}

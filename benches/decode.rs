//! Decoder speed on the CPU (issue 14's speed table): SmolLM2-135M Q4_1 from its GGUF file,
//! prefill tokens/s at 128 and 512 prompt tokens (one sequence, one step), and decode tokens/s
//! and time per output token (TPT) with 1, 8 and 32 sequences decoding together (each after a
//! 32-token prompt; one step = one token of every sequence). Median of the repeats.
//! `tools/bench_decode_llamacpp.py` measures llama.cpp the same way on the same file;
//! docs/results.md has both side by side.
//!
//! ```sh
//! cargo bench --bench decode -- [--threads N] [--q8] [--steps 32] [--repeats 3] [--json out.json]
//!     [--prefill 128,512] [--batches 1,8,32]
//! ```

use std::time::Instant;

use apparate::backend::decoder::DecoderBackend;
use apparate::backend::{CpuBackend, CpuConfig};
use apparate::gguf::GgufFile;
use apparate::models::llama::{Chunk, KvCacheConfig, Llama, SeqCache};

struct Opts {
    threads: Option<usize>,
    q8: bool,
    steps: usize,
    repeats: usize,
    json: Option<String>,
    model: String,
    prefill: Vec<usize>,
    batches: Vec<usize>,
}

fn list(v: &str, flag: &str) -> Vec<usize> {
    v.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("{flag}: a comma-separated list of counts"))
        })
        .collect()
}

fn opts() -> Opts {
    let mut o = Opts {
        threads: None,
        q8: false,
        steps: 32,
        repeats: 3,
        json: None,
        model: "weights/smollm2-135m-instruct.q4_1.gguf".into(),
        prefill: vec![128, 512],
        batches: vec![1, 8, 32],
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let val = |i: usize| args.get(i + 1).cloned().expect("a value after the flag");
        match args[i].as_str() {
            "--threads" => o.threads = Some(val(i).parse().expect("--threads N")),
            "--steps" => o.steps = val(i).parse().expect("--steps N"),
            "--repeats" => o.repeats = val(i).parse().expect("--repeats N"),
            "--json" => o.json = Some(val(i)),
            "--model" => o.model = val(i),
            "--prefill" => o.prefill = list(&val(i), "--prefill"),
            "--batches" => o.batches = list(&val(i), "--batches"),
            "--q8" => {
                o.q8 = true;
                i -= 1;
            }
            "--bench" => i -= 1,
            other => panic!("unknown flag {other}"),
        }
        i += 2;
    }
    o
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A prompt of `n` ordinary token ids (a fixed pseudo-random walk over the vocabulary).
fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 1000 + (i * 7919 + salt * 104_729) % 40_000)
        .collect()
}

fn main() {
    let o = opts();
    let be = CpuBackend::new(CpuConfig {
        threads: o.threads,
        ..Default::default()
    })
    .expect("cpu backend")
    .with_q8_activations(o.q8);
    let threads = be.threads();
    let g = GgufFile::open(&o.model).expect("the SmolLM2 GGUF (run weights/fetch.sh)");
    let model = Llama::load(be, &g).expect("model");
    let mut cache = model
        .new_cache(KvCacheConfig {
            budget_bytes: 1 << 30,
            ..KvCacheConfig::default()
        })
        .unwrap();
    println!(
        "decoder speed, SmolLM2-135M Q4_1, cpu, {threads} threads, {} activations, median of {}",
        if o.q8 { "8-bit" } else { "f32" },
        o.repeats
    );
    let mut rows = Vec::new();
    for &n in &o.prefill {
        let p = prompt(n, 1);
        let t: Vec<f64> = (0..o.repeats)
            .map(|_| {
                let mut s = SeqCache::default();
                cache.reserve(&mut s, n).unwrap();
                let t0 = Instant::now();
                let l = model
                    .forward(
                        &mut cache,
                        &[Chunk {
                            tokens: &p,
                            start: 0,
                            table: s.table(),
                        }],
                    )
                    .unwrap();
                model.backend().argmax(&l).unwrap();
                let dt = t0.elapsed().as_secs_f64();
                cache.release(&mut s);
                dt
            })
            .collect();
        let secs = median(t);
        println!(
            "prefill {n:>4} tokens: {:>8.1} ms  {:>8.1} tokens/s",
            secs * 1e3,
            n as f64 / secs
        );
        rows.push(serde_json::json!({"kind": "prefill", "tokens": n, "secs": secs, "tokens_per_s": n as f64 / secs}));
    }
    for &batch in &o.batches {
        let t: Vec<f64> = (0..o.repeats)
            .map(|_| {
                let mut seqs: Vec<SeqCache> = (0..batch).map(|_| SeqCache::default()).collect();
                let mut next = Vec::new();
                for (i, s) in seqs.iter_mut().enumerate() {
                    let p = prompt(32, i as u32 + 2);
                    cache.reserve(s, 32 + o.steps + 1).unwrap();
                    let l = model
                        .forward(
                            &mut cache,
                            &[Chunk {
                                tokens: &p,
                                start: 0,
                                table: s.table(),
                            }],
                        )
                        .unwrap();
                    next.push(model.backend().argmax(&l).unwrap()[0]);
                }
                let t0 = Instant::now();
                for step in 0..o.steps {
                    let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
                    let chunks: Vec<Chunk<'_>> = seqs
                        .iter()
                        .zip(&toks)
                        .map(|(s, t)| Chunk {
                            tokens: t,
                            start: 32 + step,
                            table: s.table(),
                        })
                        .collect();
                    let l = model.forward(&mut cache, &chunks).unwrap();
                    next = model.backend().argmax(&l).unwrap();
                }
                let dt = t0.elapsed().as_secs_f64();
                for s in &mut seqs {
                    cache.release(s);
                }
                dt
            })
            .collect();
        let secs = median(t) / o.steps as f64;
        println!(
            "decode batch {batch:>2}: {:>8.2} ms per step (TPT)  {:>8.1} tokens/s",
            secs * 1e3,
            batch as f64 / secs
        );
        rows.push(serde_json::json!({"kind": "decode", "batch": batch, "tpt_secs": secs, "tokens_per_s": batch as f64 / secs}));
    }
    if let Some(p) = o.json {
        let doc = serde_json::json!({
            "engine": "apparate",
            "threads": threads,
            "activations": if o.q8 { "q8" } else { "f32" },
            "steps": o.steps,
            "repeats": o.repeats,
            "rows": rows,
        });
        std::fs::write(&p, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
        println!("wrote {p}");
    }
}

//! MiniLM forward on the CPU backend at batch 1/8/32 x sequence 32/128: median, p99 and
//! throughput, with the peers' numbers (PyTorch, ONNX Runtime) for the same shapes side by side
//! when given, and the CPU's model and feature flags recorded with them.
//!
//!     cargo bench --bench encoder -- [--model FILE] [--threads N] [--min-repeats N]
//!                                     [--min-seconds S] [--peers FILE] [--out DIR]
//!                                     [--shapes 1x32,8x128,...]
//!
//! `tools/bench-encoder.sh` runs the peers (tools/bench_encoder_peers.py) and then this, so all
//! are measured on the same machine in one go. Results: `<out>/encoder.json`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use apparate::backend::{Backend, BatchShape, CpuBackend, CpuConfig};
use apparate::format::ModelFile;
use apparate::models::bert::{Bert, EncoderInput};
use apparate::rng::SplitMix;

#[path = "common/peers.rs"]
mod peers;
#[path = "common/placement.rs"]
mod placement;
use peers::{HostCpu, Peers};

const BATCHES: [usize; 3] = [1, 8, 32];
const SEQS: [usize; 2] = [32, 128];
const WARMUP: usize = 2;

struct Opts {
    model: PathBuf,
    threads: Option<usize>,
    min_repeats: usize,
    min_seconds: f64,
    /// The peers' timings (tools/bench_encoder_peers.py's JSON).
    peers: Option<PathBuf>,
    out: PathBuf,
    /// Only these (batch, seq) shapes; default: every combination of BATCHES x SEQS.
    shapes: Vec<(usize, usize)>,
}

fn parse() -> Result<Opts, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut o = Opts {
        model: root.join("weights/minilm-l6.apparate"),
        threads: None,
        min_repeats: 10,
        min_seconds: 2.0,
        peers: None,
        out: root.join("target/bench-results"),
        shapes: BATCHES
            .iter()
            .flat_map(|&b| SEQS.iter().map(move |&s| (b, s)))
            .collect(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--model" => o.model = val()?.into(),
            "--threads" => o.threads = Some(val()?.parse().map_err(|e| format!("--threads: {e}"))?),
            "--min-repeats" => {
                o.min_repeats = val()?.parse().map_err(|e| format!("--min-repeats: {e}"))?
            }
            "--min-seconds" => {
                o.min_seconds = val()?.parse().map_err(|e| format!("--min-seconds: {e}"))?
            }
            "--peers" => o.peers = Some(val()?.into()),
            "--out" => o.out = val()?.into(),
            "--shapes" => {
                o.shapes = val()?
                    .split(',')
                    .map(|s| {
                        let (b, q) = s
                            .split_once('x')
                            .ok_or(format!("--shapes: `{s}` is not BxS"))?;
                        let p = |v: &str| v.parse::<usize>().map_err(|e| format!("--shapes: {e}"));
                        let (b, q) = (p(b)?, p(q)?);
                        if b == 0 || q < 2 {
                            return Err(format!("--shapes: `{s}` needs batch >= 1 and seq >= 2"));
                        }
                        Ok((b, q))
                    })
                    .collect::<Result<_, String>>()?
            }
            "--bench" => {} // passed by `cargo bench`
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(o)
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// The `torch` object results had before they had `peers`: PyTorch's version and threads.
fn torch_summary(peers: &Peers) -> serde_json::Value {
    let p = peers.json();
    match p.get("torch") {
        Some(t) => serde_json::json!({"version": t["version"], "threads": p["threads"]}),
        None => serde_json::Value::Null,
    }
}

fn main() {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&o) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(o: &Opts) -> Result<(), Box<dyn std::error::Error>> {
    if !o.model.exists() {
        return Err(format!(
            "{} is missing: run weights/fetch.sh first",
            o.model.display()
        )
        .into());
    }
    let backend = CpuBackend::new(CpuConfig {
        threads: o.threads,
        ..Default::default()
    })?;
    let file = ModelFile::open(&o.model)?;
    let model = Bert::load(backend.clone(), &file)?;
    let vocab = model.config().vocab_size;
    let peers = Peers::load(o.peers.as_deref())?;
    let cpu = HostCpu::read();
    peers.warn_if_not_comparable(&cpu, backend.threads());
    let device = backend.device_id();
    eprintln!("encoder benchmark: {} on {device}", o.model.display());
    let mut rows = Vec::new();
    let mut rng = SplitMix::new(2024);
    for &(batch, seq) in &o.shapes {
        {
            // Full-length inputs: [CLS] random word pieces [SEP].
            let ids: Vec<Vec<u32>> = (0..batch)
                .map(|_| {
                    let mut v = vec![101u32];
                    // Ordinary word pieces: MiniLM's ids below 1000 are special and unused.
                    let lo = 1000.min(vocab / 2);
                    v.extend((0..seq - 2).map(|_| (lo + rng.below(vocab - lo)) as u32));
                    v.push(102);
                    v
                })
                .collect();
            let masks: Vec<Vec<u32>> = ids.iter().map(|s| vec![1; s.len()]).collect();
            let input = EncoderInput::from_ids_and_masks(&ids, &masks, 0)?;
            assert_eq!(
                input.shape,
                BatchShape {
                    seq,
                    lengths: vec![seq; batch]
                }
            );
            for _ in 0..WARMUP {
                model.forward(&input)?;
            }
            let rt_before = placement::round_trip_ns(backend.threads());
            let mut times = Vec::new();
            let start = Instant::now();
            while times.len() < o.min_repeats || start.elapsed().as_secs_f64() < o.min_seconds {
                let t = Instant::now();
                std::hint::black_box(model.forward(&input)?);
                times.push(t.elapsed());
            }
            let rt_after = placement::round_trip_ns(backend.threads());
            times.sort();
            let median = percentile(&times, 0.5);
            let p99 = percentile(&times, 0.99);
            let thr = batch as f64 / median.as_secs_f64();
            eprintln!(
                "  batch {batch:>2} seq {seq:>3}: median {:>8.2} ms  p99 {:>8.2} ms  {thr:>8.1} seq/s  ({} runs)",
                ms(median),
                ms(p99),
                times.len()
            );
            let mut row = serde_json::json!({
                "batch": batch, "seq": seq, "runs": times.len(),
                "median_ms": ms(median), "p99_ms": ms(p99),
                "mean_ms": ms(times.iter().sum::<Duration>()) / times.len() as f64,
                "throughput_seq_per_s": thr,
                // The cores' placement before and after (`placement`; null for one thread).
                "core_round_trip_ns": [rt_before, rt_after],
            });
            peers.add_columns(&mut row, ms(median), |r| {
                r["batch"].as_u64() == Some(batch as u64) && r["seq"].as_u64() == Some(seq as u64)
            });
            rows.push(row);
        }
    }
    let result = serde_json::json!({
        "benchmark": "encoder",
        "model": o.model.display().to_string(),
        "backend": "cpu",
        "threads": backend.threads(),
        "device": device,
        "cpu": cpu.json(),
        "apparate_simd": peers::simd_env(),
        "commit": git_commit(),
        "warmup": WARMUP,
        "peers": peers.json(),
        // Kept from before ONNX Runtime joined, for readers of older results.
        "torch": torch_summary(&peers),
        "results": rows,
    });
    std::fs::create_dir_all(&o.out)?;
    let path = o.out.join("encoder.json");
    std::fs::write(&path, serde_json::to_string_pretty(&result)?)?;

    println!();
    println!("MiniLM-L6 forward, {device}, commit {}", git_commit());
    println!("{}", cpu.describe());
    if let Some(p) = peers.describe() {
        println!("{p}");
    }
    let (peer_names, peer_aligns) = peers.header();
    println!("| batch | seq | median ms | p99 ms | seq/s {peer_names}| core round trip ns |");
    println!("|---:|---:|---:|---:|---:{peer_aligns}|---:|");
    for r in &rows {
        let f = |k: &str| r[k].as_f64();
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.1} {}| {} |",
            r["batch"],
            r["seq"],
            f("median_ms").unwrap_or(0.0),
            f("p99_ms").unwrap_or(0.0),
            f("throughput_seq_per_s").unwrap_or(0.0),
            peers.cells(r),
            placement::cell(r),
        );
    }
    println!("(p99 over the runs shown; with few runs it is close to the maximum)");
    println!(
        "(core round trip: a cache line between two threads, before / after the shape; \
         about 60 ns where two cores share an L3, several hundred where they do not)"
    );
    println!("full results: {}", path.display());
    Ok(())
}

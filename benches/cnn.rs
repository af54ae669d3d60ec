//! CNN forward speed: ResNet-18, ResNet-50 and EfficientNet-Lite0 at batch 1/8/32 (224x224) on
//! the CPU backend (or `--device cuda` on a GPU), with the peers' numbers (PyTorch, ONNX Runtime,
//! both on the CPU) for the same models and shapes side by side when given, and the CPU's model
//! and feature flags recorded with them.
//!
//!     cargo bench --bench cnn -- --model NAME=FILE... [--device cpu|cuda] [--peers FILE]
//!                                 [--batches 1,8,32] [--min-repeats N] [--min-seconds S]
//!                                 [--out DIR]
//!
//! `tools/bench-cnn.sh` exports the torchvision models, runs the peers
//! (tools/bench_cnn_peers.py), converts and runs this. Results: `<out>/cnn.json`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use apparate::backend::cuda::{CudaConfig, CudaDevice};
use apparate::backend::gpu::GpuBackend;
use apparate::backend::{Backend, CpuBackend, CpuConfig};
use apparate::format::{Family, ModelFile};
use apparate::models::cnn::Cnn;
use apparate::rng::SplitMix;
use apparate::tensor::DType;

#[path = "common/peers.rs"]
mod peers;
use peers::{HostCpu, Peers};

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Opts {
    models: Vec<(String, PathBuf)>,
    device: String,
    /// The peers' timings (tools/bench_cnn_peers.py's cnn-peers.json).
    peers: Option<PathBuf>,
    batches: Vec<usize>,
    min_repeats: usize,
    min_seconds: f64,
    out: PathBuf,
}

fn parse() -> Res<Opts> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut o = Opts {
        models: Vec::new(),
        device: "cpu".into(),
        peers: None,
        batches: vec![1, 8, 32],
        min_repeats: 3,
        min_seconds: 2.0,
        out: root.join("target/bench-results"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--model" => {
                let v = val()?;
                let (n, p) = v
                    .split_once('=')
                    .ok_or(format!("--model `{v}` is not NAME=FILE"))?;
                o.models.push((n.to_string(), p.into()));
            }
            "--device" => o.device = val()?,
            "--peers" => o.peers = Some(val()?.into()),
            "--batches" => {
                o.batches = val()?
                    .split(',')
                    .map(|b| b.parse())
                    .collect::<Result<_, _>>()?
            }
            "--min-repeats" => o.min_repeats = val()?.parse()?,
            "--min-seconds" => o.min_seconds = val()?.parse()?,
            "--out" => o.out = val()?.into(),
            "--bench" => {}
            other => return Err(format!("unknown argument `{other}`").into()),
        }
    }
    if o.models.is_empty() {
        let eff = root.join("weights/efficientnet-lite0.apparate");
        if eff.exists() {
            o.models.push(("efficientnet-lite0".into(), eff));
        }
        o.models.push((
            "mnist-resnet".into(),
            root.join("weights/mnist-resnet.apparate"),
        ));
    }
    Ok(o)
}

fn run_all<B: Backend + Clone>(
    be: B,
    o: &Opts,
    peers: &Peers,
    rows: &mut Vec<serde_json::Value>,
) -> Res<()> {
    let mut rng = SplitMix::new(3);
    for (name, path) in &o.models {
        let file = ModelFile::open(path)?;
        let Family::Cnn(cfg) = &file.meta().family else {
            return Err(format!("{} is not a CNN", path.display()).into());
        };
        let i = cfg.input.clone();
        let cnn = Cnn::load(be.clone(), &file)?;
        for &batch in &o.batches {
            let x: Vec<f32> = (0..batch * i.height * i.width * i.channels)
                .map(|_| rng.uniform())
                .collect();
            cnn.forward(&x, batch)?; // warm-up
            let mut times = Vec::new();
            let start = Instant::now();
            while times.len() < o.min_repeats || start.elapsed().as_secs_f64() < o.min_seconds {
                let t = Instant::now();
                std::hint::black_box(cnn.forward(&x, batch)?);
                times.push(t.elapsed());
            }
            times.sort();
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            let median = ms(times[times.len() / 2]);
            let p99 = ms(times[((times.len() - 1) as f64 * 0.99).round() as usize]);
            eprintln!(
                "  {name} batch {batch:>2}: median {median:>9.2} ms  p99 {p99:>9.2} ms  ({} runs)",
                times.len()
            );
            let mut row = serde_json::json!({
                "model": name, "batch": batch, "input": [i.height, i.width, i.channels],
                "runs": times.len(), "median_ms": median, "p99_ms": p99,
                "images_per_s": batch as f64 / median * 1e3,
            });
            peers.add_columns(&mut row, median, |r| {
                r["model"].as_str() == Some(name.as_str())
                    && r["batch"].as_u64() == Some(batch as u64)
            });
            rows.push(row);
        }
    }
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let o = parse()?;
    let peers = Peers::load(o.peers.as_deref())?;
    let cpu = HostCpu::read();
    let mut rows = Vec::new();
    let device = match o.device.as_str() {
        "cpu" => {
            let be = CpuBackend::new(CpuConfig::default())?;
            peers.warn_if_not_comparable(&cpu, be.threads());
            let d = be.device_id();
            run_all(be, &o, &peers, &mut rows)?;
            d
        }
        "cuda" => {
            let dev = CudaDevice::new(CudaConfig::default())?;
            let d = format!("cuda: {} (f32)", dev.info().device_name);
            run_all(GpuBackend::new(dev, DType::F32), &o, &peers, &mut rows)?;
            d
        }
        other => return Err(format!("unknown device `{other}` (cpu or cuda)").into()),
    };
    println!("\nCNN forward, {device}");
    println!("{}", cpu.describe());
    if let Some(p) = peers.describe() {
        println!("{p}");
    }
    let (peer_names, peer_aligns) = peers.header();
    println!("| model | batch | median ms | p99 ms | images/s {peer_names}|");
    println!("|---|---:|---:|---:|---:{peer_aligns}|");
    for r in &rows {
        let f = |k: &str| r[k].as_f64();
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.1} {}|",
            r["model"].as_str().unwrap_or("?"),
            r["batch"],
            f("median_ms").unwrap_or(0.0),
            f("p99_ms").unwrap_or(0.0),
            f("images_per_s").unwrap_or(0.0),
            peers.cells(r),
        );
    }
    std::fs::create_dir_all(&o.out)?;
    let path = o.out.join("cnn.json");
    let result = serde_json::json!({
        "device": device,
        // The host CPU even on `--device cuda`: the peers' numbers are CPU ones.
        "cpu": cpu.json(),
        "apparate_simd": peers::simd_env(),
        "peers": peers.json(),
        "results": rows,
    });
    std::fs::write(&path, serde_json::to_string_pretty(&result)?)?;
    println!("full results: {}", path.display());
    Ok(())
}

//! CNN forward speed: ResNet-18, ResNet-50 and EfficientNet-Lite0 at batch 1/8/32 (224x224) on
//! the CPU backend (or `--device cuda` on a GPU), with the peers' numbers (PyTorch, ONNX Runtime,
//! both on the CPU) for the same models and shapes side by side when given, and the CPU's model
//! and feature flags recorded with them.
//!
//!     cargo bench --bench cnn -- --model NAME=FILE... [--device cpu|cuda] [--peers FILE]
//!                                 [--batches 1,8,32] [--min-repeats N] [--min-seconds S]
//!                                 [--out DIR]
//!     cargo bench --bench cnn -- --convs [--batches 1,8,32] [--min-seconds S]
//!
//! `tools/bench-cnn.sh` exports the torchvision models, runs the peers
//! (tools/bench_cnn_peers.py), converts and runs this. Results: `<out>/cnn.json`.
//!
//! `--convs` instead times the 3x3 stride-1 convolutions of ResNet-18/50 and VGG-11 (224x224
//! inputs) one at a time on the CPU backend, direct against Winograd (`APPARATE_WINOGRAD` off
//! and on), and says which one `auto` picks: the measurements behind that rule
//! (`winograd::pays`), to repeat on another CPU.

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
#[path = "common/placement.rs"]
mod placement;
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
    /// Time single 3x3 convolutions (direct vs Winograd) instead of the models.
    convs: bool,
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
        convs: false,
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
            "--convs" => o.convs = true,
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

/// `host_threads`: the CPU threads the backend runs on (1 for a GPU: no placement probe).
fn run_all<B: Backend + Clone>(
    be: B,
    host_threads: usize,
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
            let rt_before = placement::round_trip_ns(host_threads);
            let mut times = Vec::new();
            let start = Instant::now();
            while times.len() < o.min_repeats || start.elapsed().as_secs_f64() < o.min_seconds {
                let t = Instant::now();
                std::hint::black_box(cnn.forward(&x, batch)?);
                times.push(t.elapsed());
            }
            let rt_after = placement::round_trip_ns(host_threads);
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
                // The cores' placement before and after (`placement`; null for one thread).
                "core_round_trip_ns": [rt_before, rt_after],
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

/// The 3x3 stride-1 convolutions (input side, in and out channels) of ResNet-18/50 and
/// VGG-11 at 224x224.
const CONVS: [(usize, usize, usize); 10] = [
    (224, 3, 64),
    (112, 64, 128),
    (56, 64, 64),
    (56, 128, 256),
    (56, 256, 256),
    (28, 128, 128),
    (28, 256, 512),
    (28, 512, 512),
    (14, 256, 256),
    (7, 512, 512),
];

/// Median seconds of `f` over at least 3 runs and `min_seconds`, after one warm-up.
fn median_of(min_seconds: f64, mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    f()?;
    let (start, mut times) = (Instant::now(), Vec::new());
    while times.len() < 3 || start.elapsed().as_secs_f64() < min_seconds {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// `--convs`: each of [`CONVS`] at each batch, direct and Winograd, with bias and ReLU (as in
/// the models).
fn run_convs(o: &Opts) -> Res<()> {
    use apparate::backend::{Activation, Conv2d, Winograd};
    let cpu = HostCpu::read();
    let be = |w| {
        CpuBackend::new(CpuConfig {
            winograd: Some(w),
            ..Default::default()
        })
    };
    let (direct, wino, auto) = (be(Winograd::Off)?, be(Winograd::On)?, be(Winograd::Auto)?);
    println!("\n3x3 stride-1 convolutions, {}", direct.device_id());
    println!("{}", cpu.describe());
    println!(
        "| input | cin -> cout | batch | direct ms | Winograd ms | Winograd / direct | auto picks |"
    );
    println!("|---|---|---:|---:|---:|---:|---|");
    let mut rng = SplitMix::new(5);
    let p = Conv2d {
        stride: [1, 1],
        padding: [1, 1],
        groups: 1,
        padding_extra: [0, 0],
    };
    for &(side, cin, cout) in &CONVS {
        for &n in &o.batches {
            let mut vals = |len: usize| (0..len).map(|_| rng.uniform() - 0.5).collect::<Vec<f32>>();
            let (xv, wv, bv) = (
                vals(n * side * side * cin),
                vals(cout * 9 * cin),
                vals(cout),
            );
            let mut secs = [0.0; 2];
            for (s, be) in secs.iter_mut().zip([&direct, &wino]) {
                let x = be.upload(&xv, &[n, side, side, cin])?;
                let w = be.upload(&wv, &[cout, 3, 3, cin])?;
                let b = be.upload(&bv, &[cout])?;
                *s = median_of(o.min_seconds, || {
                    std::hint::black_box(be.conv2d(
                        &x,
                        &w,
                        Some(&b),
                        &p,
                        None,
                        Activation::Relu,
                    )?);
                    Ok(())
                })?;
            }
            let x = auto.upload(&xv, &[n, side, side, cin])?;
            let w = auto.upload(&wv, &[cout, 3, 3, cin])?;
            let picks = if auto.winograd_for(&x, &w, &p)? {
                "Winograd"
            } else {
                "direct"
            };
            println!(
                "| {side}x{side} | {cin} -> {cout} | {n} | {:.3} | {:.3} | {:.2} | {picks} |",
                secs[0] * 1e3,
                secs[1] * 1e3,
                secs[1] / secs[0]
            );
        }
    }
    Ok(())
}

fn run() -> Res<()> {
    let o = parse()?;
    if o.convs {
        return run_convs(&o);
    }
    let peers = Peers::load(o.peers.as_deref())?;
    let cpu = HostCpu::read();
    let mut rows = Vec::new();
    let device = match o.device.as_str() {
        "cpu" => {
            let be = CpuBackend::new(CpuConfig::default())?;
            peers.warn_if_not_comparable(&cpu, be.threads());
            let d = be.device_id();
            let threads = be.threads();
            run_all(be, threads, &o, &peers, &mut rows)?;
            d
        }
        "cuda" => {
            let dev = CudaDevice::new(CudaConfig::default())?;
            let d = format!("cuda: {} (f32)", dev.info().device_name);
            run_all(GpuBackend::new(dev, DType::F32), 1, &o, &peers, &mut rows)?;
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
    println!("| model | batch | median ms | p99 ms | images/s {peer_names}| core round trip ns |");
    println!("|---|---:|---:|---:|---:{peer_aligns}|---:|");
    for r in &rows {
        let f = |k: &str| r[k].as_f64();
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.1} {}| {} |",
            r["model"].as_str().unwrap_or("?"),
            r["batch"],
            f("median_ms").unwrap_or(0.0),
            f("p99_ms").unwrap_or(0.0),
            f("images_per_s").unwrap_or(0.0),
            peers.cells(r),
            placement::cell(r),
        );
    }
    println!(
        "(core round trip: a cache line between two threads, before / after the shape; \
         about 60 ns where two cores share an L3, several hundred where they do not)"
    );
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

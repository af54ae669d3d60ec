//! Kernel benchmarks of the GPU path: our GEMM against cuBLAS (same shapes and layouts),
//! add+LayerNorm and softmax against a plain copy (achieved bandwidth), and the MiniLM forward at
//! batch 1/8/32. On a real GPU these are the numbers; on the emulated device (no GPU here) they
//! only smoke-test the code paths with tiny shapes, and say so.
//!
//!     cargo bench --bench kernels -- [--device auto|cuda|emu] [--dtype f32|f16|bf16]...
//!                                     [--repeats N] [--model FILE] [--out DIR]
//!
//! Timing: device events around each launch after warm-up, median of the repeats.

use std::path::PathBuf;
use std::sync::Arc;

use apparate::backend::cuda::{CudaConfig, CudaDevice};
use apparate::backend::device::{Device, KernelArg, LaunchConfig};
use apparate::backend::emu::{EmuConfig, EmuDevice};
use apparate::backend::gpu::GpuBackend;
use apparate::backend::{Activation, Backend};
use apparate::format::ModelFile;
use apparate::models::bert::synthetic::SplitMix;
use apparate::models::bert::{Bert, EncoderInput};
use apparate::tensor::DType;

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Opts {
    device: String,
    dtypes: Vec<DType>,
    repeats: usize,
    model: PathBuf,
    out: PathBuf,
}

fn parse() -> Res<Opts> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut o = Opts {
        device: "auto".into(),
        dtypes: vec![],
        repeats: 20,
        model: root.join("weights/minilm-l6.apparate"),
        out: root.join("target/bench-results"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--device" => o.device = val()?,
            "--dtype" => o.dtypes.push(val()?.parse()?),
            "--repeats" => o.repeats = val()?.parse()?,
            "--model" => o.model = val()?.into(),
            "--out" => o.out = val()?.into(),
            "--bench" => {}
            other => return Err(format!("unknown argument `{other}`").into()),
        }
    }
    if o.dtypes.is_empty() {
        o.dtypes = vec![DType::F32, DType::F16, DType::BF16];
    }
    Ok(o)
}

/// Median milliseconds of `repeats` runs of `f`, timed with device events, after 2 warm-ups.
fn time<D: Device>(dev: &D, repeats: usize, mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    for _ in 0..2 {
        f()?;
    }
    dev.synchronize()?;
    let mut ms = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let a = dev.record_event()?;
        f()?;
        let b = dev.record_event()?;
        ms.push(dev.elapsed_ms(&a, &b)?);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

struct Row {
    what: String,
    ours_ms: f64,
    metric: String,
    reference: String,
}

/// The yardstick for GEMMs: cuBLAS on a real GPU, nothing on the emulated one.
trait Yardstick: Device {
    fn reference_gemm(
        &self,
        _dt: DType,
        _m: usize,
        _n: usize,
        _k: usize,
        _bufs: [&Self::Buf; 3],
    ) -> Option<apparate::Result<()>> {
        None
    }
}
impl Yardstick for EmuDevice {}
impl Yardstick for CudaDevice {
    fn reference_gemm(
        &self,
        dt: DType,
        m: usize,
        n: usize,
        k: usize,
        b: [&Self::Buf; 3],
    ) -> Option<apparate::Result<()>> {
        Some(self.cublas_gemm(dt, m, n, k, b[0], b[1], b[2]))
    }
}

fn bench_device<D: Yardstick>(
    name: &str,
    dev: Arc<D>,
    real: bool,
    o: &Opts,
    rows: &mut Vec<Row>,
) -> Res<()> {
    let repeats = if real { o.repeats } else { 1 };
    let mut rng = SplitMix::new(7);
    for &dt in &o.dtypes {
        let be = GpuBackend::shared(dev.clone(), dt);
        // GEMMs: MiniLM's at batch 8 x 128 tokens, BERT-base's, and the 4096^3 target shape.
        let shapes: &[(usize, usize, usize)] = if real {
            &[
                (1024, 1152, 384),
                (1024, 1536, 384),
                (1024, 384, 1536),
                (1024, 3072, 768),
                (4096, 4096, 4096),
            ]
        } else {
            &[(64, 96, 128)]
        };
        for &(m, n, k) in shapes {
            let x: Vec<f32> = (0..m * k).map(|_| rng.uniform()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.uniform() * 0.1).collect();
            let xt = be.upload(&x, &[m, k])?;
            let wt = be.upload(&w, &[n, k])?;
            let ours = time(&*dev, repeats, || {
                be.linear(&xt, &wt, None, Activation::None)?;
                Ok(())
            })?;
            let flops = 2.0 * (m * n * k) as f64;
            let yb = dev.alloc(m * n * dt.size())?;
            let xb = dev.upload(&dt.encode(&x))?;
            let wb = dev.upload(&dt.encode(&w))?;
            let reference = match dev.reference_gemm(dt, m, n, k, [&xb, &wb, &yb]) {
                None => "-".to_string(),
                Some(Err(e)) => format!("cuBLAS failed: {e}"),
                Some(Ok(())) => {
                    let t = time(&*dev, repeats, || {
                        dev.reference_gemm(dt, m, n, k, [&xb, &wb, &yb])
                            .expect("cuda")?;
                        Ok(())
                    })?;
                    format!(
                        "cuBLAS {:.3} ms, {:.1} TFLOP/s; ours {:.0}%",
                        t,
                        flops / t / 1e9,
                        100.0 * t / ours
                    )
                }
            };
            rows.push(Row {
                what: format!("{name} {dt} gemm {m}x{n}x{k}"),
                ours_ms: ours,
                metric: format!("{:.2} TFLOP/s", flops / ours / 1e9),
                reference,
            });
        }
        // Memory-bound kernels against a plain copy of the same bytes.
        let (r, c) = if real { (8192, 1024) } else { (64, 384) };
        let a = be.upload(&vec![0.5; r * c], &[r, c])?;
        let b = be.upload(&vec![0.25; r * c], &[r, c])?;
        let g = be.upload(&vec![1.0; c], &[c])?;
        let z = be.upload(&vec![0.0; c], &[c])?;
        let words = (r * c * dt.size()).div_ceil(4);
        let src = dev.alloc(words * 4)?;
        let dst = dev.alloc(words * 4)?;
        let copy_ms = time(&*dev, repeats, || {
            // SAFETY: copy_u32(src, dst, n) with two buffers of `words` u32 each.
            unsafe {
                dev.launch(
                    "copy_u32",
                    LaunchConfig::linear(((words as u32).div_ceil(256)).min(65535), 256, 0),
                    &[
                        KernelArg::Ptr(dev.address(&src)),
                        KernelArg::Ptr(dev.address(&dst)),
                        KernelArg::U32(words as u32),
                    ],
                )
            }?;
            Ok(())
        })?;
        let tensor_bytes = (r * c * dt.size()) as f64;
        let copy_bw = 2.0 * tensor_bytes / copy_ms / 1e6;
        let ln = time(&*dev, repeats, || {
            be.add_layernorm(&a, &b, &g, &z, 1e-12)?;
            Ok(())
        })?;
        let ln_bw = 3.0 * tensor_bytes / ln / 1e6;
        rows.push(Row {
            what: format!("{name} {dt} add_layernorm {r}x{c}"),
            ours_ms: ln,
            metric: format!("{ln_bw:.0} GB/s"),
            reference: format!(
                "copy {copy_bw:.0} GB/s; ours {:.0}%",
                100.0 * ln_bw / copy_bw
            ),
        });
        let sm = time(&*dev, repeats, || {
            be.softmax(&a)?;
            Ok(())
        })?;
        let sm_bw = 2.0 * tensor_bytes / sm / 1e6;
        rows.push(Row {
            what: format!("{name} {dt} softmax {r}x{c}"),
            ours_ms: sm,
            metric: format!("{sm_bw:.0} GB/s"),
            reference: format!(
                "copy {copy_bw:.0} GB/s; ours {:.0}%",
                100.0 * sm_bw / copy_bw
            ),
        });
        // The MiniLM forward.
        if o.model.exists() {
            let file = ModelFile::open(&o.model)?;
            let model = Bert::load(be.clone(), &file)?;
            let shapes: &[(usize, usize)] = if real {
                &[(1, 128), (8, 128), (32, 128)]
            } else {
                &[(1, 16)]
            };
            for &(batch, seq) in shapes {
                let ids: Vec<Vec<u32>> = (0..batch)
                    .map(|_| {
                        (0..seq)
                            .map(|p| {
                                if p == 0 {
                                    101
                                } else if p == seq - 1 {
                                    102
                                } else {
                                    2000 + rng.below(20000) as u32
                                }
                            })
                            .collect()
                    })
                    .collect();
                let masks: Vec<Vec<u32>> = ids.iter().map(|s| vec![1; s.len()]).collect();
                let input = EncoderInput::from_ids_and_masks(&ids, &masks, 0)?;
                let t = time(&*dev, repeats, || {
                    model.forward(&input)?;
                    Ok(())
                })?;
                rows.push(Row {
                    what: format!("{name} {dt} MiniLM forward batch {batch} seq {seq}"),
                    ours_ms: t,
                    metric: format!("{:.0} seq/s", batch as f64 / t * 1e3),
                    reference: "-".into(),
                });
            }
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
    let mut rows = Vec::new();
    let cuda = match o.device.as_str() {
        "emu" => None,
        _ => match CudaDevice::new(CudaConfig::default()) {
            Ok(d) => Some(d),
            Err(e) if o.device == "auto" => {
                eprintln!(
                    "no GPU ({e}); smoke-testing on the emulated device (numbers are not GPU numbers)"
                );
                None
            }
            Err(e) => return Err(e.into()),
        },
    };
    let device_desc = match cuda {
        Some(d) => {
            let desc = format!(
                "{} (sm_{}{})",
                d.info().device_name,
                d.info().compute_capability.0,
                d.info().compute_capability.1
            );
            bench_device("cuda", Arc::new(d), true, &o, &mut rows)?;
            desc
        }
        None => {
            bench_device(
                "emu",
                Arc::new(EmuDevice::new(EmuConfig::default())?),
                false,
                &o,
                &mut rows,
            )?;
            "emulated device (smoke test only)".to_string()
        }
    };
    println!("\nkernel benchmarks on {device_desc}");
    println!("| what | ours median ms | rate | reference |");
    println!("|---|---:|---:|---|");
    let mut json = Vec::new();
    for r in &rows {
        println!(
            "| {} | {:.3} | {} | {} |",
            r.what, r.ours_ms, r.metric, r.reference
        );
        json.push(serde_json::json!({"what": r.what, "ours_ms": r.ours_ms, "rate": r.metric, "reference": r.reference}));
    }
    std::fs::create_dir_all(&o.out)?;
    let path = o.out.join("kernels.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&serde_json::json!({"device": device_desc, "rows": json}))?,
    )?;
    println!("full results: {}", path.display());
    Ok(())
}

//! Kernel benchmarks of the GPU path: our GEMM against cuBLAS (same shapes and layouts),
//! add+LayerNorm, softmax, RMSNorm and the decoder's paged attention against a plain copy
//! (achieved bandwidth), encoder attention, convolutions, the MiniLM forward at batch 1/8/32,
//! and (group `encoder`) a BERT-base-sized encoder with random weights at the same batches. On a real GPU these are the numbers; on the emulated device (no GPU here) they
//! only smoke-test the code paths with tiny shapes, and say so.
//!
//!     cargo bench --bench kernels -- [--device auto|cuda|emu] [--dtype f32|f16|bf16]...
//!                                     [--repeats N] [--model FILE] [--out DIR] [--table]
//!                                     [--only gemm,attention,rows,conv,minilm,encoder,decode,wgmma]
//!                                     [--batches 1,8,32|none] [--default-kernels]
//!                                     [--gemm-shapes MxNxK,...] [--launches N]
//!
//! Timing: inputs and outputs are allocated before the clock starts (the `*_into` launchers
//! write into a preallocated output), then `launches` back-to-back launches run between two
//! device events; a row reports the median over `repeats` such batches of the time per launch.
//! `--launches 1 --repeats 1` runs each kernel twice (a warm-up and one timed launch): what a
//! profiler run wants (tools/gpu-check.sh, step `profile`), with `--gemm-shapes` naming the
//! GEMM shapes instead of the usual list.
//! On a GPU the working sets are far above L2 (the copy yardstick moves 1 GiB).
//!
//! The `wgmma` group is the Hopper GEMM alone (its GEMM rows beside split-K and cuBLAS, and a
//! MiniLM forward with it), on a device that has wgmma: a kernel that has not yet run on a GPU
//! gets its own process in the GPU check, so a fault in it cannot take the other rows down.
//!
//! `--table` instead times every case of the op table (`tests/op_cases`, the cases the parity
//! test checks) on `cpu` and on the GPU device, per dtype: the perf mode of that table. Those
//! cases go through the public ops, which allocate their outputs as the engine's calls do.

#[path = "../tests/op_cases/mod.rs"]
mod op_cases;

use std::path::PathBuf;
use std::sync::Arc;

use apparate::backend::capture::{GraphConfig, GraphDevice};
use apparate::backend::cuda::{CudaConfig, CudaDevice};
use apparate::backend::decoder::{DecoderBackend, Heads, KvPlan};
use apparate::backend::device::Device;
use apparate::backend::emu::{EmuConfig, EmuDevice};
use apparate::backend::gpu::{
    AttentionKernel, ConvKernel, FlashTile, GemmKernel, GpuBackend, PipeTile, RowKernel,
    elementwise,
};
use apparate::backend::{Activation, Backend, BatchShape, CpuBackend, CpuConfig};
use apparate::format::ModelFile;
use apparate::gguf::GgmlType;
use apparate::models::bert::{Bert, EncoderInput};
use apparate::models::llama::{Chunk, KvCacheConfig, Llama, LlamaConfig, SeqCache};
use apparate::rng::SplitMix;
use apparate::tensor::DType;

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Opts {
    device: String,
    dtypes: Vec<DType>,
    repeats: usize,
    model: PathBuf,
    out: PathBuf,
    table: bool,
    /// Which groups run (`gemm`, `attention`, `rows`, `conv`, `minilm`, `encoder`, `decode`,
    /// `wgmma`); all when empty. The copy yardstick runs with `rows`, `attention` or `decode` (the groups
    /// read against it). A profiler run (`ncu`) names few groups to keep its kernel count small.
    only: Vec<String>,
    /// MiniLM and BERT-base batch sizes (128 tokens each) on a GPU.
    batches: Vec<usize>,
    /// MiniLM with the default kernels only (a profiler run), not each variant.
    default_kernels: bool,
    /// GEMM shapes (M, N, K) instead of the usual list, when not empty.
    gemm_shapes: Vec<(usize, usize, usize)>,
    /// Launches per timed batch instead of the default (20 on a GPU).
    launches: Option<usize>,
}

impl Opts {
    fn runs(&self, group: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|g| g == group)
    }
}

fn parse() -> Res<Opts> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut o = Opts {
        device: "auto".into(),
        dtypes: vec![],
        repeats: 5,
        model: root.join("weights/minilm-l6.apparate"),
        out: root.join("target/bench-results"),
        table: false,
        only: vec![],
        batches: vec![1, 8, 32],
        default_kernels: false,
        gemm_shapes: vec![],
        launches: None,
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
            "--table" => o.table = true,
            "--default-kernels" => o.default_kernels = true,
            // `none`: no MiniLM forwards (the `wgmma` group's GEMM rows alone).
            "--batches" => {
                let v = val()?;
                o.batches = if v == "none" { "" } else { v.as_str() }
                    .split(',')
                    .filter(|b| !b.is_empty())
                    .map(|b| b.parse().map_err(|e| format!("--batches `{b}`: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--only" => {
                for g in val()?.split(',') {
                    const GROUPS: [&str; 8] = [
                        "gemm",
                        "attention",
                        "rows",
                        "conv",
                        "minilm",
                        "encoder",
                        "decode",
                        "wgmma",
                    ];
                    if !GROUPS.contains(&g) {
                        return Err(
                            format!("--only: unknown group `{g}` ({})", GROUPS.join(", ")).into(),
                        );
                    }
                    o.only.push(g.to_string());
                }
            }
            "--gemm-shapes" => {
                for shape in val()?.split(',') {
                    let dims: Vec<usize> = shape
                        .split('x')
                        .map(|d| d.parse::<usize>())
                        .collect::<Result<_, _>>()
                        .map_err(|e| format!("--gemm-shapes `{shape}`: {e}"))?;
                    match dims[..] {
                        [m, n, k] if m > 0 && n > 0 && k > 0 => o.gemm_shapes.push((m, n, k)),
                        _ => {
                            return Err(format!(
                                "--gemm-shapes `{shape}`: not MxNxK with three positive sizes"
                            )
                            .into());
                        }
                    }
                }
            }
            "--launches" => {
                let n: usize = val()?.parse()?;
                if n == 0 {
                    return Err("--launches must be at least 1".into());
                }
                o.launches = Some(n);
            }
            "--bench" => {}
            other => return Err(format!("unknown argument `{other}`").into()),
        }
    }
    if o.dtypes.is_empty() {
        o.dtypes = vec![DType::F32, DType::F16, DType::BF16];
    }
    if o.repeats == 0 {
        return Err("--repeats must be at least 1".into());
    }
    Ok(o)
}

/// How many launches one timed batch holds, and how many batches a row takes the median of.
#[derive(Copy, Clone)]
struct Plan {
    launches: usize,
    repeats: usize,
}

/// Milliseconds per call of `f`: after a warm-up call, `repeats` batches of `launches`
/// back-to-back calls, each batch between two device events; the median batch over its
/// launch count. `f` must not allocate (or the allocator is what is timed).
fn time<D: Device + ?Sized>(dev: &D, plan: Plan, f: impl FnMut() -> Res<()>) -> Res<f64> {
    time_host(dev, plan, f).map(|(device_ms, _)| device_ms)
}

/// [`time`], and the host's milliseconds per call spent queuing the batch (the wall clock from
/// the first call to the last returning, before waiting for the device): near the device time,
/// the calls are bound by the host (launch overhead), far below it, by the device.
fn time_host<D: Device + ?Sized>(
    dev: &D,
    plan: Plan,
    mut f: impl FnMut() -> Res<()>,
) -> Res<(f64, f64)> {
    f()?;
    dev.synchronize()?;
    let mut ms = Vec::with_capacity(plan.repeats);
    let mut host = Vec::with_capacity(plan.repeats);
    for _ in 0..plan.repeats {
        let a = dev.record_event()?;
        let t0 = std::time::Instant::now();
        for _ in 0..plan.launches {
            f()?;
        }
        host.push(t0.elapsed().as_secs_f64() * 1e3 / plan.launches as f64);
        let b = dev.record_event()?;
        ms.push(dev.elapsed_ms(&a, &b)? / plan.launches as f64);
    }
    ms.sort_by(f64::total_cmp);
    host.sort_by(f64::total_cmp);
    Ok((ms[ms.len() / 2], host[host.len() / 2]))
}

struct Row {
    what: String,
    ours_ms: f64,
    metric: String,
    reference: String,
}

/// Records a row and prints it at once (on stderr, marked `measured:`): a run cut short by its
/// time limit still shows what it measured.
fn push(rows: &mut Vec<Row>, r: Row) {
    eprintln!(
        "measured: | {} | {:.4} | {} | {} |",
        r.what, r.ours_ms, r.metric, r.reference
    );
    rows.push(r);
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

/// The copy yardsticks: `bytes` read and `bytes` written by `copy_u32` (4-byte words, one per
/// thread) and by `copy_vec16` (16-byte vectors, four per thread); GB/s of each. Random data:
/// Hopper compresses uniform data in L2/DRAM, so a constant-filled source would flatter a kernel.
fn copy_bandwidth<D: Device>(
    dev: &D,
    plan: Plan,
    bytes: usize,
    rng: &mut SplitMix,
) -> Res<[f64; 2]> {
    let words = bytes / 4;
    let data: Vec<u32> = (0..words)
        .map(|_| rng.below(u32::MAX as usize) as u32)
        .collect();
    let src = dev.upload(bytemuck::cast_slice(&data))?;
    let dst = dev.alloc(words * 4)?;
    let words_ms = time(dev, plan, || {
        elementwise::copy_words(dev, &src, &dst, words)?;
        Ok(())
    })?;
    let vectors_ms = time(dev, plan, || {
        elementwise::copy_vectors(dev, &src, &dst, bytes / 16)?;
        Ok(())
    })?;
    Ok([words_ms, vectors_ms].map(|ms| 2.0 * bytes as f64 / ms / 1e6))
}

fn bench_device<D: Yardstick>(
    name: &str,
    dev: Arc<D>,
    real: bool,
    o: &Opts,
    rows: &mut Vec<Row>,
) -> Res<()> {
    let plan = if real {
        Plan {
            launches: o.launches.unwrap_or(20),
            repeats: o.repeats,
        }
    } else {
        Plan {
            launches: o.launches.unwrap_or(2),
            repeats: 1,
        }
    };
    // 1 GiB moved each way on a GPU: far above any L2, so this is DRAM bandwidth.
    let copy_bytes = if real { 1 << 30 } else { 1 << 20 };
    let mut rng = SplitMix::new(7);
    // The memory-bound kernels are read against the faster of the two copies; only the groups
    // that have such kernels pay for them (a profiler run of the GEMMs does not: 2 GiB of
    // buffers it would save and restore around every replay).
    let copy_bw = if o.runs("rows") || o.runs("attention") || o.runs("decode") {
        let copies = copy_bandwidth(&*dev, plan, copy_bytes, &mut rng)?;
        for (kernel, bw) in ["copy_u32", "copy_vec16"].into_iter().zip(copies) {
            push(
                rows,
                Row {
                    what: format!("{name} copy {} MiB ({kernel})", copy_bytes >> 20),
                    ours_ms: 2.0 * copy_bytes as f64 / bw / 1e6,
                    metric: format!("{bw:.0} GB/s"),
                    reference: "-".into(),
                },
            );
        }
        copies[0].max(copies[1])
    } else {
        f64::NAN
    };
    // The memory-bound kernels' inputs, made once for every dtype: 256k rows of 1024, so that
    // each kernel moves 1-4 GiB (512 MiB a tensor in f16, 1 GiB in f32), far above the 50 MB
    // L2, as the copy does. Random values: Hopper compresses uniform data, which would flatter
    // the kernels.
    let row_inputs = if o.runs("rows") {
        let (r, c) = if real { (262144, 1024) } else { (64, 384) };
        let mut rand = || -> Vec<f32> { (0..r * c).map(|_| rng.uniform()).collect() };
        Some((r, c, rand(), rand()))
    } else {
        None
    };
    for &dt in &o.dtypes {
        let be = GpuBackend::shared(dev.clone(), dt);
        // GEMMs: MiniLM's four at batch 8 x 128 tokens (QKV, attention output, FFN up and
        // down; FFN down also at batch 1), BERT-base's four at batch 8, and the 4096^3 target.
        let shapes: &[(usize, usize, usize)] = if !o.gemm_shapes.is_empty() {
            &o.gemm_shapes
        } else if real {
            &[
                (128, 384, 1536),
                (1024, 1152, 384),
                (1024, 384, 384),
                (1024, 1536, 384),
                (1024, 384, 1536),
                (1024, 2304, 768),
                (1024, 768, 768),
                (1024, 3072, 768),
                (1024, 768, 3072),
                (4096, 4096, 4096),
            ]
        } else {
            &[(64, 96, 128)]
        };
        let wgmma = o.runs("wgmma") && dev.has_wgmma() && dt != DType::F32;
        if o.runs("wgmma") && !wgmma {
            eprintln!(
                "{name} {dt}: wgmma group skipped (needs f16/bf16 on a device with wgmma: \
                 compute capability 9.0 or the emulated device)"
            );
        }
        for &(m, n, k) in shapes.iter().filter(|_| o.runs("gemm") || wgmma) {
            let x: Vec<f32> = (0..m * k).map(|_| rng.uniform()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.uniform() * 0.1).collect();
            let xt = be.upload(&x, &[m, k])?;
            let wt = be.upload(&w, &[n, k])?;
            let yt = be.alloc(vec![m, n])?;
            // The f16/bf16 kernels side by side (f32 has one); the Hopper one in the `wgmma`
            // group (beside split-K again: the same run's reference).
            // Split-K also with the big tile's other warp layout (64 x 64 warp tiles; it
            // differs only where the big tile runs, with 128 x 128 tiles enough to fill the GPU:
            // 1024 x 2304 x 768, 1024 x 3072 x 768 and 4096^3 here on an H200).
            let (usual, w64) = (PipeTile::Warp64x32, PipeTile::Warp64x64);
            let mut kernels: Vec<(GemmKernel, PipeTile)> = Vec::new();
            if o.runs("gemm") {
                kernels.push((GemmKernel::Simple, usual));
                if dt != DType::F32 {
                    kernels.extend([
                        (GemmKernel::Pipelined, usual),
                        (GemmKernel::PipelinedSplitK, usual),
                        (GemmKernel::PipelinedSplitK, w64),
                    ]);
                }
            }
            if wgmma {
                if !o.runs("gemm") {
                    kernels.push((GemmKernel::PipelinedSplitK, usual));
                }
                kernels.extend(
                    [GemmKernel::Wgmma, GemmKernel::WgmmaWs, GemmKernel::WgmmaTma]
                        .map(|k| (k, usual)),
                );
            }
            let mut ours = Vec::new();
            for &(kernel, tile) in &kernels {
                let be = be.clone().with_gemm(kernel).with_pipe_tile(tile);
                let ms = time(&*dev, plan, || {
                    be.linear_into(&xt, &wt, None, Activation::None, &yt)?;
                    Ok(())
                })?;
                let mut label = format!("{kernel:?}").to_lowercase();
                if tile == w64 {
                    label.push_str(" warps 64x64");
                }
                ours.push((label, ms));
            }
            let flops = 2.0 * (m * n * k) as f64;
            let yb = dev.alloc(m * n * dt.size())?;
            let xb = dev.upload(&dt.encode(&x))?;
            let wb = dev.upload(&dt.encode(&w))?;
            let cublas_ms = match dev.reference_gemm(dt, m, n, k, [&xb, &wb, &yb]) {
                None => None,
                Some(Err(e)) => return Err(format!("cuBLAS failed: {e}").into()),
                Some(Ok(())) => Some(time(&*dev, plan, || {
                    dev.reference_gemm(dt, m, n, k, [&xb, &wb, &yb])
                        .expect("cuda")?;
                    Ok(())
                })?),
            };
            for (kernel, ms) in ours {
                push(
                    rows,
                    Row {
                        what: format!("{name} {dt} gemm {m}x{n}x{k} {kernel}"),
                        ours_ms: ms,
                        metric: format!("{:.2} TFLOP/s", flops / ms / 1e9),
                        reference: cublas_ms.map_or("-".into(), |t| {
                            format!(
                                "cuBLAS {t:.3} ms, {:.1} TFLOP/s; ours {:.0}%",
                                flops / t / 1e9,
                                100.0 * t / ms
                            )
                        }),
                    },
                );
            }
        }
        if o.runs("attention") {
            attention(name, &be, real, plan, &mut rng, rows)?;
            // Decoders run in f16/bf16: f32 only as the emulator's smoke test.
            if !real || dt != DType::F32 {
                decode_attention(name, &be, real, plan, copy_bw, &mut rng, rows)?;
            }
        }
        // Memory-bound kernels against the copy.
        if let Some((r, c, host_a, host_b)) = &row_inputs {
            let (r, c) = (*r, *c);
            let a = be.upload(host_a, &[r, c])?;
            let b = be.upload(host_b, &[r, c])?;
            let g = be.upload(&vec![1.0; c], &[c])?;
            let z = be.upload(&vec![0.0; c], &[c])?;
            let y = be.alloc(vec![r, c])?;
            let tensor_bytes = (r * c * dt.size()) as f64;
            let h = be.alloc(vec![r, c])?;
            // The rows as a batch of 128-token inputs (16 off a GPU) for the embedding and the
            // pooling: BERT's vocabulary (1000 words off a GPU), random word ids, type 0.
            let seq = if real { 128 } else { 16 };
            let shape = BatchShape {
                seq,
                lengths: vec![seq; r / seq],
            };
            let vocab = if real { 30522 } else { 1000 };
            let ids: Vec<u32> = (0..r).map(|_| rng.below(vocab) as u32).collect();
            let types = vec![0u32; r];
            let table = |rows: usize, rng: &mut SplitMix| -> Res<_> {
                let v: Vec<f32> = (0..rows * c).map(|_| rng.uniform()).collect();
                Ok(be.upload(&v, &[rows, c])?)
            };
            let (word, position, token_type) = (
                table(vocab, &mut rng)?,
                table(seq, &mut rng)?,
                table(2, &mut rng)?,
            );
            // (op, tensors of r x c moved: read and written, time per launch), each row kernel
            // (the block kernel is the warp kernel's reference). A launch moves 1-4 GiB here
            // (0.3-1.3 ms), so 5 per timed batch keep the event overhead negligible.
            let plan = Plan {
                launches: plan.launches.min(5),
                ..plan
            };
            let mut memory_bound = Vec::new();
            for kernel in [RowKernel::Block, RowKernel::Warp] {
                let be = be.clone().with_rows(kernel);
                let k = format!("{kernel:?}").to_lowercase();
                memory_bound.extend([
                    (
                        format!("add_layernorm ({k})"),
                        3.0,
                        time(&*dev, plan, || {
                            Ok(be.add_layernorm_into(&a, &b, &g, &z, 1e-12, &y)?)
                        })?,
                    ),
                    (
                        format!("softmax ({k})"),
                        2.0,
                        time(&*dev, plan, || Ok(be.softmax_into(&a, &y)?))?,
                    ),
                    // x and the residual read, their sum and the normalised rows written.
                    (
                        format!("add_rms_norm ({k})"),
                        4.0,
                        time(&*dev, plan, || {
                            Ok(be.rms_norm_into(&a, Some(&b), &g, 1e-6, Some(&h), &y)?)
                        })?,
                    ),
                    // Word rows gathered and the normalised rows written (the position and type
                    // rows come from L2); the time includes the upload of the word and type ids
                    // (1 MiB each) and
                    // the output's allocation from the pool, as the model's call pays them.
                    (
                        format!("embed_layernorm ({k}, with the ids' uploads)"),
                        2.0,
                        time(&*dev, plan, || {
                            be.embed(
                                &ids,
                                &types,
                                &shape,
                                &word,
                                &position,
                                &token_type,
                                &g,
                                &z,
                                1e-12,
                            )?;
                            Ok(())
                        })?,
                    ),
                    // Token states read; one vector per input written (1/128 of them).
                    (
                        format!("mean pool ({k})"),
                        1.0,
                        time(&*dev, plan, || {
                            be.pool(&a, &shape, apparate::backend::Pooling::Mean)?;
                            Ok(())
                        })?,
                    ),
                ]);
            }
            for (op, tensors, ms) in memory_bound {
                let bw = tensors * tensor_bytes / ms / 1e6;
                push(
                    rows,
                    Row {
                        what: format!("{name} {dt} {op} {r}x{c}"),
                        ours_ms: ms,
                        metric: format!("{bw:.0} GB/s"),
                        reference: format!(
                            "copy {copy_bw:.0} GB/s; ours {:.0}%",
                            100.0 * bw / copy_bw
                        ),
                    },
                );
            }
        }
        if o.runs("conv") {
            conv(name, &be, real, plan, &mut rng, rows)?;
        }
        if (o.runs("minilm") || o.runs("wgmma")) && !o.batches.is_empty() && o.model.exists() {
            minilm(name, &be, real, plan, o, &mut rng, rows)?;
        }
        if o.runs("encoder") && !o.batches.is_empty() {
            bert_base(name, &be, real, plan, o, &mut rng, rows)?;
        }
        // Decoders run in f16 on a GPU (bf16 moves the same bytes).
        if o.runs("decode") && (!real || dt == DType::F16) {
            decode(name, &be, real, plan, o, rows)?;
        }
    }
    Ok(())
}

/// The attention op alone, both f16/bf16 kernels (the flash one with each of its blocks):
/// MiniLM's heads (d = 32) at 128 tokens, BERT-base's (d = 64) at 512, and d = 128 at 2048;
/// all keys valid. Rate: the 4 b h s^2 d multiply-add FLOPs of QK^T and PV.
fn attention<D: Device>(
    name: &str,
    be: &GpuBackend<D>,
    real: bool,
    plan: Plan,
    rng: &mut SplitMix,
    rows: &mut Vec<Row>,
) -> Res<()> {
    let shapes: &[(usize, usize, usize, usize)] = if real {
        &[
            (8, 128, 12, 32),
            (32, 128, 12, 32),
            (8, 512, 12, 64),
            (2, 2048, 16, 128),
        ]
    } else {
        &[(2, 33, 2, 32)]
    };
    for &(batch, seq, heads, d) in shapes {
        // The simple kernel takes tens of milliseconds at 2048 tokens (83 ms in f32 in run 6:
        // 17 s of a row): only the flash one there, so nothing in f32 (which has no flash).
        // The flash one with each of its blocks (the wide one stops at head size 64).
        use {AttentionKernel as A, FlashTile as F};
        let kernels: &[(A, F)] = match (be.dtype(), seq, d) {
            (DType::F32, 2048, _) => &[],
            (DType::F32, _, _) => &[(A::Simple, F::Narrow)],
            (_, 2048, 128) => &[(A::Flash, F::Narrow)],
            (_, _, 128) => &[(A::Simple, F::Narrow), (A::Flash, F::Narrow)],
            _ => &[
                (A::Simple, F::Narrow),
                (A::Flash, F::Narrow),
                (A::Flash, F::Wide),
            ],
        };
        if kernels.is_empty() {
            continue;
        }
        let width = heads * d;
        let qkv: Vec<f32> = (0..batch * seq * 3 * width)
            .map(|_| rng.uniform() * 2.0 - 1.0)
            .collect();
        let qkv = be.upload(&qkv, &[batch * seq, 3 * width])?;
        let shape = BatchShape {
            seq,
            lengths: vec![seq; batch],
        };
        let flops = 4.0 * (batch * heads * seq * seq * d) as f64;
        for &(kernel, tile) in kernels {
            let be = be.clone().with_attention(kernel).with_flash_tile(tile);
            let label = match kernel {
                A::Simple => "simple".to_string(),
                A::Flash => format!("flash {}", format!("{tile:?}").to_lowercase()),
            };
            let ms = time(be.device(), plan, || {
                be.attention(&qkv, &shape, heads)?;
                Ok(())
            })?;
            push(
                rows,
                Row {
                    what: format!(
                        "{name} {} attention b{batch} s{seq} h{heads} d{d} {label}",
                        be.dtype(),
                    ),
                    ours_ms: ms,
                    metric: format!("{:.2} TFLOP/s", flops / ms / 1e9),
                    reference: "-".into(),
                },
            );
        }
    }
    Ok(())
}

/// The decoder's attention over its paged cache, both kernels: a decode step (one row per
/// sequence, every sequence at the same position) of TinyLlama's heads (32 query heads over 4
/// key/value heads of 64) at 1, 8 and 32 sequences of 512 and 4096 positions (blocks of 16).
/// Memory-bound: read against the copy, counting the keys and values read once (each key/value
/// head serves its 8 query heads: the flash kernel's later heads read a chunk from L1, the
/// simple kernel's from L2). Each call also stores
/// the step's keys and values (kv_store) and allocates its output, as the engine's does.
fn decode_attention<D: Device>(
    name: &str,
    be: &GpuBackend<D>,
    real: bool,
    plan: Plan,
    copy_bw: f64,
    rng: &mut SplitMix,
    rows: &mut Vec<Row>,
) -> Res<()> {
    let heads = Heads {
        heads: 32,
        kv_heads: 4,
        head_dim: 64,
    };
    let shapes: &[(usize, usize)] = if real {
        &[
            (1, 512),
            (8, 512),
            (32, 512),
            (1, 4096),
            (8, 4096),
            (32, 4096),
        ]
    } else {
        &[(2, 40)]
    };
    let block = 16;
    for &(seqs, context) in shapes {
        let per_seq = context.div_ceil(block);
        let mut kv = be.alloc_kv_layer(seqs * per_seq * block, heads.kv_width())?;
        // Random keys and values (a zeroed cache would compress on Hopper).
        let n = seqs * per_seq * block * heads.kv_width();
        let fill: Vec<f32> = (0..n).map(|_| rng.uniform() * 2.0 - 1.0).collect();
        kv.k = be.upload(&fill, &[seqs * per_seq * block, heads.kv_width()])?;
        kv.v = be.upload(&fill, &[seqs * per_seq * block, heads.kv_width()])?;
        let mut step = KvPlan::new(block, seqs * per_seq);
        for s in 0..seqs {
            let table: Vec<u32> = (s * per_seq..(s + 1) * per_seq).map(|b| b as u32).collect();
            step.push(&table, context - 1, 1)?;
        }
        let step = be.upload_plan(&step)?;
        let q: Vec<f32> = (0..seqs * heads.qkv_width())
            .map(|_| rng.uniform() * 2.0 - 1.0)
            .collect();
        let q = be.upload(&q, &[seqs, heads.qkv_width()])?;
        let bytes = (2 * seqs * context * heads.kv_width() * be.dtype().size()) as f64;
        for kernel in [AttentionKernel::Simple, AttentionKernel::Flash] {
            let be = be.clone().with_attention(kernel);
            let ms = time(be.device(), plan, || {
                be.kv_attention(&q, &mut kv, &step, heads)?;
                Ok(())
            })?;
            let bw = bytes / ms / 1e6;
            push(
                rows,
                Row {
                    what: format!(
                        "{name} {} decode attention {seqs} x {context} h32/4 d64 {}",
                        be.dtype(),
                        format!("{kernel:?}").to_lowercase()
                    ),
                    ours_ms: ms,
                    metric: format!("{bw:.0} GB/s"),
                    reference: format!("copy {copy_bw:.0} GB/s; ours {:.0}%", 100.0 * bw / copy_bw),
                },
            );
        }
    }
    Ok(())
}

/// Dense convolutions through im2col + GEMM, with each row kernel set (the block set runs the
/// reference im2col, the warp set the fast one; the GEMM is the same), and in f16/bf16 as an
/// implicit GEMM (`conv_pipe_*`, no im2col buffer; not for the stem's 3 channels, which keeps
/// im2col): ResNet-50's stem (7 x 7, stride 2, 3 channels: element units), a conv2_x and a
/// conv4_x 3 x 3 (16-byte units), at batch 32. Through the op, so each call allocates its
/// output and im2col buffer (from the pool on CUDA).
fn conv<D: Device>(
    name: &str,
    be: &GpuBackend<D>,
    real: bool,
    plan: Plan,
    rng: &mut SplitMix,
    rows: &mut Vec<Row>,
) -> Res<()> {
    // (x [n, h, w, cin], cout, kernel, stride, padding)
    let shapes: &[([usize; 4], usize, usize, usize, usize)] = if real {
        &[
            ([32, 224, 224, 3], 64, 7, 2, 3),
            ([32, 56, 56, 64], 64, 3, 1, 1),
            ([32, 14, 14, 256], 256, 3, 1, 1),
        ]
    } else {
        &[([1, 9, 9, 3], 8, 7, 2, 3), ([1, 8, 8, 16], 16, 3, 1, 1)]
    };
    for &(x, cout, k, stride, pad) in shapes {
        let cin = x[3];
        let xs: Vec<f32> = (0..x.iter().product()).map(|_| rng.uniform()).collect();
        let ws: Vec<f32> = (0..cout * k * k * cin)
            .map(|_| rng.uniform() * 0.1)
            .collect();
        let xt = be.upload(&xs, &x)?;
        let wt = be.upload(&ws, &[cout, k, k, cin])?;
        let p = apparate::backend::Conv2d {
            stride: [stride; 2],
            padding: [pad; 2],
            groups: 1,
            padding_extra: [0; 2],
        };
        let mut ms = Vec::new();
        let usual = PipeTile::Warp64x32;
        let mut kernels = vec![
            ("im2col block", RowKernel::Block, ConvKernel::Im2col, usual),
            ("im2col warp", RowKernel::Warp, ConvKernel::Im2col, usual),
        ];
        if be.dtype() != DType::F32 && cin % 8 == 0 {
            kernels.push((
                "implicit GEMM",
                RowKernel::Warp,
                ConvKernel::Implicit,
                usual,
            ));
            kernels.push((
                "implicit GEMM warps 64x64",
                RowKernel::Warp,
                ConvKernel::Implicit,
                PipeTile::Warp64x64,
            ));
        }
        for &(_, rows_kernel, conv_kernel, tile) in &kernels {
            let be = be
                .clone()
                .with_rows(rows_kernel)
                .with_conv(conv_kernel)
                .with_pipe_tile(tile);
            ms.push(time(be.device(), plan, || {
                be.conv2d(&xt, &wt, None, &p, None, Activation::Relu)?;
                Ok(())
            })?);
        }
        let (oh, ow) = p
            .output_size(x[1], x[2], k, k)
            .ok_or("kernel does not fit")?;
        let flops = 2.0 * (x[0] * oh * ow * cout * k * k * cin) as f64;
        for ((kernel, ..), t) in kernels.iter().zip(&ms) {
            push(
                rows,
                Row {
                    what: format!(
                        "{name} {} conv {:?} -> {cout} k{k} s{stride} ({kernel})",
                        be.dtype(),
                        x
                    ),
                    ours_ms: *t,
                    metric: format!("{:.1} TFLOP/s", flops / t / 1e9),
                    reference: format!("block im2col {:.3} ms; this {:.2}x", ms[0], ms[0] / t),
                },
            );
        }
    }
    Ok(())
}

/// Decode steps of a decoder with random Q4_1 weights (`Llama::random`, no file needed):
/// TinyLlama-1.1B's blocks (width 2048, FFN 5632, 32 query heads over 4 key/value heads of 64,
/// vocabulary 32000), 4 of its 22 blocks; 1, 8 and 32 sequences, each after a 128-token prompt,
/// one step = one token of every sequence (whole tables reserved up front, as the engine does).
/// Per step: eager with the simple attention, eager with flash-decoding, and graphed (one graph
/// launch per step) with flash-decoding; with the host's time to queue a step (near the device
/// time: bound by launches). The logits are not read back, so steps queue back to back.
fn decode<D: Device>(
    name: &str,
    be: &GpuBackend<D>,
    real: bool,
    plan: Plan,
    o: &Opts,
    rows: &mut Vec<Row>,
) -> Res<()> {
    let cfg = if real {
        LlamaConfig {
            blocks: 4,
            width: 2048,
            ffn: 5632,
            heads: 32,
            kv_heads: 4,
            head_dim: 64,
            rope_base: 10000.0,
            eps: 1e-5,
            vocab: 32000,
            context: 2048,
        }
    } else {
        LlamaConfig {
            blocks: 2,
            width: 64,
            ffn: 96,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            rope_base: 10000.0,
            eps: 1e-5,
            vocab: 64,
            context: 256,
        }
    };
    let prompt = if real { 128 } else { 8 };
    let batches: Vec<usize> = if real { o.batches.clone() } else { vec![2] };
    // Recorded by the warm-up call of `time` (no eager warm-up runs).
    let graphs = Arc::new(GraphDevice::with_config(
        be.shared_device(),
        GraphConfig {
            eager_runs: 0,
            ..GraphConfig::default()
        },
    ));
    let variants = [
        (
            "eager, simple attention",
            be.clone().with_attention(AttentionKernel::Simple),
        ),
        (
            "eager, flash-decoding",
            be.clone().with_attention(AttentionKernel::Flash),
        ),
    ];
    let graphed = Llama::random(
        GpuBackend::shared(graphs.clone(), be.dtype()).with_attention(AttentionKernel::Flash),
        cfg.clone(),
        GgmlType::Q4_1,
        3,
    )?;
    let models = variants
        .into_iter()
        .map(|(label, be)| Ok((label, Llama::random(be, cfg.clone(), GgmlType::Q4_1, 3)?)))
        .collect::<Res<Vec<_>>>()?;
    let shape = if real {
        format!("{} blocks of TinyLlama", cfg.blocks)
    } else {
        "a tiny decoder".to_string()
    };
    let what = |batch: usize, label: &str| {
        format!(
            "{name} {} decode step, {shape}, {batch} seq after {prompt}: {label}",
            be.dtype()
        )
    };
    for &batch in &batches {
        let mut measured = Vec::new();
        for (label, model) in &models {
            measured.push((
                *label,
                decode_steps(be.device(), model, batch, prompt, plan)?,
            ));
        }
        let before = graphs.stats();
        let (ms, host) = decode_steps(be.device(), &graphed, batch, prompt, plan)?;
        let after = graphs.stats();
        measured.push(("graphed, flash-decoding", (ms, host)));
        for (label, (ms, host)) in measured {
            push(
                rows,
                Row {
                    what: what(batch, label),
                    ours_ms: ms,
                    metric: format!("{:.0} tokens/s", batch as f64 / ms * 1e3),
                    reference: format!("host queues a step in {host:.3} ms"),
                },
            );
        }
        eprintln!(
            "decode graphs, {batch} seq: {} steps recorded, {} replayed, {} abandoned",
            after.recorded - before.recorded,
            after.replayed - before.replayed,
            after.rerecorded - before.rerecorded
        );
    }
    Ok(())
}

/// (device, host) milliseconds per decode step of `model` with `batch` sequences, each after a
/// prompt of `prompt` tokens fed in one chunk; the cache holds every step `time_host` takes.
fn decode_steps<D: Device, B: apparate::backend::decoder::DecoderBackend>(
    dev: &D,
    model: &Llama<B>,
    batch: usize,
    prompt: usize,
    plan: Plan,
) -> Res<(f64, f64)> {
    let c = &model.cfg;
    let steps = 1 + plan.launches * plan.repeats;
    let block = 16;
    let positions = batch * (prompt + steps).next_multiple_of(block);
    let per_position = c.blocks * 2 * c.kv_heads * c.head_dim * model.backend().value_bytes();
    let mut cache = model.new_cache(KvCacheConfig {
        block_size: block,
        budget_bytes: positions * per_position,
    })?;
    let tokens: Vec<u32> = (0..prompt)
        .map(|i| ((i * 7 + 3) % c.vocab) as u32)
        .collect();
    let mut seqs: Vec<SeqCache> = (0..batch).map(|_| SeqCache::default()).collect();
    for s in &mut seqs {
        cache.reserve(s, prompt + steps)?;
        let chunk = Chunk {
            tokens: &tokens,
            start: 0,
            table: s.table(),
        };
        model.forward(&mut cache, &[chunk])?;
    }
    let one = [5u32];
    let mut pos = prompt;
    time_host(dev, plan, || {
        let chunks: Vec<Chunk<'_>> = seqs
            .iter()
            .map(|s| Chunk {
                tokens: &one,
                start: pos,
                table: s.table(),
            })
            .collect();
        model.forward(&mut cache, &chunks)?;
        pos += 1;
        Ok(())
    })
}

/// The simple kernels (each fast kernel's reference) and the default set, as the encoder
/// forwards label them.
const SIMPLE_SET: (GemmKernel, AttentionKernel, RowKernel, &str) = (
    GemmKernel::Simple,
    AttentionKernel::Simple,
    RowKernel::Block,
    " (simple kernels)",
);
const DEFAULT_SET: (GemmKernel, AttentionKernel, RowKernel, &str) = (
    GemmKernel::PipelinedSplitK,
    AttentionKernel::Flash,
    RowKernel::Warp,
    " (split-K GEMM, flash attention, warp row kernels: the default)",
);

/// The MiniLM forward (whole model: its ops allocate their outputs as in serving).
fn minilm<D: Device>(
    name: &str,
    be: &GpuBackend<D>,
    real: bool,
    plan: Plan,
    o: &Opts,
    rng: &mut SplitMix,
    rows: &mut Vec<Row>,
) -> Res<()> {
    let file = ModelFile::open(&o.model)?;
    // The simple kernels, then the fast ones one at a time (the last is the default; f32 has
    // one kernel of each).
    use {AttentionKernel as A, GemmKernel as G, RowKernel as R};
    let all: &[(G, A, R, &str)] = if be.dtype() == DType::F32 || o.default_kernels {
        &[(G::PipelinedSplitK, A::Flash, R::Warp, "")]
    } else {
        &[
            SIMPLE_SET,
            (G::Pipelined, A::Simple, R::Block, " (pipelined GEMM)"),
            (
                G::Pipelined,
                A::Flash,
                R::Block,
                " (pipelined GEMM, flash attention)",
            ),
            (
                G::PipelinedSplitK,
                A::Flash,
                R::Block,
                " (split-K GEMM, flash attention)",
            ),
            DEFAULT_SET,
            (
                G::Wgmma,
                A::Flash,
                R::Warp,
                " (wgmma GEMM, flash attention, warp row kernels)",
            ),
            (
                G::WgmmaWs,
                A::Flash,
                R::Warp,
                " (warp-specialised wgmma GEMM, flash attention, warp row kernels)",
            ),
            (
                G::WgmmaTma,
                A::Flash,
                R::Warp,
                " (TMA wgmma GEMM, flash attention, warp row kernels)",
            ),
        ]
    };
    // The `minilm` group runs all but the Hopper GEMM; the `wgmma` group runs it and the
    // default (the same run's reference), where the device has wgmma.
    let wgmma = o.runs("wgmma") && be.device().has_wgmma() && be.dtype() != DType::F32;
    let kernels: Vec<(G, A, R, &str)> = all
        .iter()
        .filter(|&&(g, a, r, _)| {
            let default = g == G::PipelinedSplitK && a == A::Flash && r == R::Warp;
            if matches!(g, G::Wgmma | G::WgmmaWs | G::WgmmaTma) {
                wgmma
            } else {
                o.runs("minilm") || (wgmma && default)
            }
        })
        .copied()
        .collect();
    if kernels.is_empty() {
        return Ok(());
    }
    let model = Encoder {
        label: "MiniLM",
        key: "minilm",
        file: &file,
    };
    encoder_forwards(name, be, real, plan, o, &model, &kernels, rng, rows)
}

/// A BERT-base-sized encoder (12 layers, width 768, 12 heads, FFN 3072, BERT's vocabulary)
/// with random weights, written to a temporary file in the run's storage dtype and removed
/// after: the second end-to-end shape, without a 440 MB download (the time of a forward
/// does not depend on the weights' values). The simple kernels and the default ones (f32: the
/// default only), eager and graphed, as for MiniLM. Off a GPU, a 2-layer, 64-wide model of the
/// same vocabulary, to exercise the code only.
fn bert_base<D: Device>(
    name: &str,
    be: &GpuBackend<D>,
    real: bool,
    plan: Plan,
    o: &Opts,
    rng: &mut SplitMix,
    rows: &mut Vec<Row>,
) -> Res<()> {
    use apparate::backend::Pooling;
    use apparate::models::bert::synthetic::write_random_bert;
    use apparate::models::bert::{BertConfig, HiddenAct};
    let (width, layers, heads) = if real { (768, 12, 12) } else { (64, 2, 4) };
    let config = BertConfig {
        vocab_size: 30522,
        hidden_size: width,
        num_layers: layers,
        num_heads: heads,
        intermediate_size: 4 * width,
        max_position_embeddings: 512,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        hidden_act: HiddenAct::GeluErf,
        pooling: Pooling::Cls,
        normalize: false,
        has_pooler: true,
    };
    let path = std::env::temp_dir().join(format!(
        "apparate-bench-bert-base-{}-{}.apparate",
        std::process::id(),
        be.dtype()
    ));
    let stored = if be.dtype() == DType::F32 {
        DType::F32
    } else {
        DType::F16
    };
    write_random_bert(&path, &config, Some(2), stored, 18)?;
    let file = ModelFile::open(&path);
    // The file is mapped (or was not opened): removing its name now leaves nothing behind even
    // if a forward below fails.
    let _ = std::fs::remove_file(&path);
    let file = file?;
    use {AttentionKernel as A, GemmKernel as G, RowKernel as R};
    let kernels: &[(G, A, R, &str)] = if be.dtype() == DType::F32 || o.default_kernels {
        &[(G::PipelinedSplitK, A::Flash, R::Warp, "")]
    } else {
        &[SIMPLE_SET, DEFAULT_SET]
    };
    let label = if real {
        "BERT-base (random weights)".to_string()
    } else {
        format!("BERT {layers} x {width} (random weights; BERT-base's shape on a GPU only)")
    };
    let model = Encoder {
        label: &label,
        key: "bert-base",
        file: &file,
    };
    // A forward takes about 1-80 ms here (estimated from MiniLM's in run 6; the simple kernels
    // at batch 32 the longest): 5 per timed batch keep the step inside its limit.
    let plan = Plan {
        launches: plan.launches.min(5),
        ..plan
    };
    encoder_forwards(name, be, real, plan, o, &model, kernels, rng, rows)
}

/// An encoder model file to time, with the name its rows and graphs go under.
struct Encoder<'a> {
    label: &'a str,
    key: &'static str,
    file: &'a ModelFile,
}

/// An encoder's forward at each batch (128 tokens; off a GPU one batch of 16) with each kernel
/// set in `kernels` (the last is the default), then the default kernels as one CUDA graph, and
/// queued back to back with and without a graph (the host's time per forward beside them).
#[allow(clippy::too_many_arguments)]
fn encoder_forwards<D: Device>(
    name: &str,
    be: &GpuBackend<D>,
    real: bool,
    plan: Plan,
    o: &Opts,
    model: &Encoder<'_>,
    kernels: &[(GemmKernel, AttentionKernel, RowKernel, &str)],
    rng: &mut SplitMix,
    rows: &mut Vec<Row>,
) -> Res<()> {
    let file = model.file;
    let models = kernels
        .iter()
        .map(|&(g, a, r, label)| {
            let be = be.clone().with_gemm(g).with_attention(a).with_rows(r);
            Ok((label, Bert::load(be, file)?))
        })
        .collect::<Res<Vec<_>>>()?;
    // Recorded by its first run (the warm-up call of `time`), no eager warm-up runs.
    let config = GraphConfig {
        eager_runs: 0,
        ..GraphConfig::default()
    };
    let graphs = Arc::new(GraphDevice::with_config(be.shared_device(), config));
    let graphed = Bert::load(GpuBackend::shared(graphs.clone(), be.dtype()), file)?;
    let shapes: Vec<(usize, usize)> = if real {
        o.batches.iter().map(|&b| (b, 128)).collect()
    } else {
        vec![(1, 16)]
    };
    for (batch, seq) in shapes {
        let ids: Vec<Vec<u32>> = (0..batch)
            .map(|_| {
                (0..seq)
                    .map(|p| match p {
                        0 => 101,
                        p if p == seq - 1 => 102,
                        _ => 2000 + rng.below(20000) as u32,
                    })
                    .collect()
            })
            .collect();
        let masks: Vec<Vec<u32>> = ids.iter().map(|s| vec![1; s.len()]).collect();
        let input = EncoderInput::from_ids_and_masks(&ids, &masks, 0)?;
        let what = |label: &str| {
            format!(
                "{name} {} {} forward batch {batch} seq {seq}{label}",
                be.dtype(),
                model.label
            )
        };
        // Each kernel set, as the engine runs a batch: the forward and the download of its
        // sentence vectors and probabilities (which waits for the device).
        for (label, model) in &models {
            let t = time(be.device(), plan, || {
                model.forward(&input)?;
                Ok(())
            })?;
            push(
                rows,
                Row {
                    what: what(label),
                    ours_ms: t,
                    metric: format!("{:.0} seq/s", batch as f64 / t * 1e3),
                    reference: "-".into(),
                },
            );
        }
        // The default kernels as one graph per (batch, seq), recorded by the warm-up call and
        // replayed by the timed ones; then both without the download, back to back, with the
        // host's time to queue each forward: near the device time, the eager forward is bound
        // by launch overhead.
        let key = format!("{} {batch}x{seq}", model.key);
        let before = graphs.stats();
        let t = time(be.device(), plan, || {
            let (pooled, probs) = graphs.graphed(&key, &mut || graphed.forward_tensors(&input))?;
            graphed.output(&input, &pooled, probs.as_ref())?;
            Ok(())
        })?;
        let (queued, queued_host) = time_host(be.device(), plan, || {
            graphs.graphed(&key, &mut || graphed.forward_tensors(&input).map(|_| ()))?;
            Ok(())
        })?;
        let eager = models.last().map(|(_, m)| m).ok_or("no encoder model")?;
        let (eager_queued, eager_host) = time_host(be.device(), plan, || {
            eager.forward_tensors(&input)?;
            Ok(())
        })?;
        let s = graphs.stats();
        let graph_note = format!(
            "{} recorded, {} replayed{}",
            s.recorded - before.recorded,
            s.replayed - before.replayed,
            s.last_reason.map(|r| format!(" ({r})")).unwrap_or_default()
        );
        for (label, ms, reference) in [
            (" (default kernels, one CUDA graph)", t, graph_note),
            (
                " (default kernels, queued back to back, no download)",
                eager_queued,
                format!("host {eager_host:.3} ms per forward"),
            ),
            (
                " (default kernels, one CUDA graph, queued back to back, no download)",
                queued,
                format!("host {queued_host:.3} ms per forward"),
            ),
        ] {
            push(
                rows,
                Row {
                    what: what(label),
                    ours_ms: ms,
                    metric: format!("{:.0} seq/s", batch as f64 / ms * 1e3),
                    reference,
                },
            );
        }
    }
    Ok(())
}

/// Times `f` (milliseconds per call): device events on a GPU, the wall clock on the CPU.
type Timer<'a> = &'a dyn Fn(&mut dyn FnMut() -> Res<()>) -> Res<f64>;

/// The op table's perf mode: every case that computes, on `be`, in `dtype` (the CPU stores f32
/// only).
fn bench_table<B: Backend>(
    name: &str,
    be: &B,
    dtype: DType,
    timer: Timer<'_>,
    rows: &mut Vec<Row>,
) -> Res<()> {
    use op_cases::{Expect, Op};
    for case in op_cases::cases() {
        if case.dtype != dtype || case.expect != Expect::Values {
            continue;
        }
        let mut p = op_cases::prepare(be, op_cases::host_inputs(&case))?;
        if let Op::RampExit { .. } = case.op {
            p.set_threshold(be, 0.5)?;
        }
        let ms = timer(&mut || {
            op_cases::run(be, &case, &p, false)?;
            Ok(())
        })?;
        push(
            rows,
            Row {
                what: format!("{name} {}", case.name),
                ours_ms: ms,
                metric: "-".into(),
                reference: "-".into(),
            },
        );
    }
    Ok(())
}

fn table_mode<D: Device>(name: &str, dev: Arc<D>, real: bool, o: &Opts) -> Res<Vec<Row>> {
    let plan = Plan {
        launches: if real { 50 } else { 2 },
        repeats: if real { o.repeats } else { 1 },
    };
    let mut rows = Vec::new();
    let cpu = CpuBackend::new(CpuConfig::default())?;
    let wall = |f: &mut dyn FnMut() -> Res<()>| -> Res<f64> {
        f()?;
        let start = std::time::Instant::now();
        for _ in 0..plan.launches {
            f()?;
        }
        Ok(start.elapsed().as_secs_f64() * 1e3 / plan.launches as f64)
    };
    bench_table("cpu", &cpu, DType::F32, &wall, &mut rows)?;
    let events = |f: &mut dyn FnMut() -> Res<()>| time(&*dev, plan, f);
    for &dt in &o.dtypes {
        let be = GpuBackend::shared(dev.clone(), dt);
        bench_table(name, &be, dt, &events, &mut rows)?;
    }
    Ok(rows)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let o = parse()?;
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
    let mut rows = Vec::new();
    let device_desc = match cuda {
        Some(d) => {
            let desc = format!(
                "{} (sm_{}{})",
                d.info().device_name,
                d.info().compute_capability.0,
                d.info().compute_capability.1
            );
            let d = Arc::new(d);
            if o.table {
                rows = table_mode("cuda", d, true, &o)?;
            } else {
                bench_device("cuda", d, true, &o, &mut rows)?;
            }
            desc
        }
        None => {
            let d = Arc::new(EmuDevice::new(EmuConfig::default())?);
            if o.table {
                rows = table_mode("emu", d, false, &o)?;
            } else {
                bench_device("emu", d, false, &o, &mut rows)?;
            }
            "emulated device (smoke test only)".to_string()
        }
    };
    println!("\nkernel benchmarks on {device_desc}");
    println!("| what | ours ms per launch | rate | reference |");
    println!("|---|---:|---:|---|");
    let mut json = Vec::new();
    for r in &rows {
        println!(
            "| {} | {:.4} | {} | {} |",
            r.what, r.ours_ms, r.metric, r.reference
        );
        json.push(serde_json::json!({"what": r.what, "ours_ms": r.ours_ms, "rate": r.metric, "reference": r.reference}));
    }
    std::fs::create_dir_all(&o.out)?;
    let file = if o.table {
        "kernels-table.json"
    } else {
        "kernels.json"
    };
    let path = o.out.join(file);
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&serde_json::json!({"device": device_desc, "rows": json}))?,
    )?;
    println!("full results: {}", path.display());
    Ok(())
}

//! The `cpu` backend: pure Rust, f32 compute, multi-threaded with its own team of threads.
//! GEMMs are our own ([`sgemm`]: weights packed once, AVX-512 / AVX2 micro-kernels chosen at run
//! time); the memory-bound ops are fused loops over rows.
//! It is also the reference every other backend is tested against.

mod attention;
mod buffers;
mod conv;
pub mod decoder;
mod depthwise;
mod embedding;
mod inverted_residual;
mod kv_attention;
mod linear;
mod norm;
mod pool;
pub mod qmatmul;
pub mod qmatvec;
mod ramp;
mod sgemm;
pub(crate) mod simd;
mod softmax;
mod team;
mod vector;
mod winograd;

use std::sync::{Arc, OnceLock};

pub use sgemm::SimdLevel;

use super::op_check::ConvDims;
use super::op_check::{
    AttentionCall, ConvCall, EmbedCall, GlobalPoolCall, InvertedResidualCall, LayerNormCall,
    LinearCall, Pool2dCall, PoolCall, RampCall, RowsCall,
};
use super::{Backend, Conv2d, RampDecision};
use crate::error::{Error, Result};

/// Settings of the CPU backend.
#[derive(Clone, Debug, Default)]
pub struct CpuConfig {
    /// Worker threads: 1 ..= [`CpuConfig::max_threads`]. Default (`None`): the number of
    /// logical cores, or `APPARATE_THREADS` when that environment variable is set.
    pub threads: Option<usize>,
    /// Micro-kernels for GEMMs and attention. Default (`None`): the widest this CPU has, or
    /// `APPARATE_SIMD` (`avx512`, `avx2`, `generic`) when that environment variable is set.
    pub simd: Option<SimdLevel>,
    /// When 3x3 stride-1 convolutions run by Winograd's F(4x4, 3x3) ([`Winograd`]). Default
    /// (`None`): [`Winograd::Auto`], or `APPARATE_WINOGRAD` (`auto`, `off`, `on`) when that
    /// environment variable is set.
    pub winograd: Option<Winograd>,
    /// Whether products by weights stored as bf16 (`apparate convert --dtype bf16`) run the
    /// AVX512-BF16 kernels: the weight kept in bf16, each activation rounded to bf16 on its
    /// way in, sums in f32; about twice the multiply-adds per cycle of the f32 kernels, at
    /// bf16's rounding (MiniLM-L6: docs/results.md). Default (`None`): on where the CPU has
    /// AVX512-BF16 and the level is `avx512`, or `APPARATE_BF16` (`on`, `off`) when that
    /// environment variable is set. `Some(true)` (or `on`) on a CPU without it is an error.
    /// Weights stored as f32 or f16 always run in f32.
    pub bf16: Option<bool>,
}

/// Whether 3x3 stride-1 dense convolutions take the Winograd path (`winograd.rs`): about 4x
/// fewer multiply-adds, a little more rounding (still within the golden tests' tolerances),
/// and the weight kept a second time, transformed (4x its size).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Winograd {
    /// Where it measured faster: enough output tiles per weight (see `winograd::pays`).
    #[default]
    Auto,
    /// Never: every convolution runs the direct path.
    Off,
    /// Every convolution it can run (3x3, stride 1, dense), whatever the shape.
    On,
}

impl Winograd {
    /// The name used by `APPARATE_WINOGRAD`.
    pub fn name(self) -> &'static str {
        match self {
            Winograd::Auto => "auto",
            Winograd::Off => "off",
            Winograd::On => "on",
        }
    }

    /// The policy named `s` (`auto`, `off`, `on`).
    pub fn parse(s: &str) -> Option<Winograd> {
        [Winograd::Auto, Winograd::Off, Winograd::On]
            .into_iter()
            .find(|w| w.name() == s.trim())
    }
}

/// Never more worker threads than this, whatever the machine.
const MAX_THREADS: usize = 1024;
/// Nor more than this many per logical core: beyond it threads only cost memory and switches.
const MAX_THREADS_PER_CORE: usize = 64;

impl CpuConfig {
    /// The most worker threads this machine accepts: 64 per logical core, at most 1024.
    pub fn max_threads() -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores.saturating_mul(MAX_THREADS_PER_CORE).min(MAX_THREADS)
    }

    /// The thread count this configuration asks for, checked: `threads` (or
    /// `APPARATE_THREADS`) within 1 ..= [`CpuConfig::max_threads`], else the core count.
    pub fn resolve_threads(&self) -> Result<usize> {
        let (knob, threads) = match self.threads {
            Some(t) => ("threads", Some(t)),
            None => match std::env::var("APPARATE_THREADS") {
                Ok(v) => {
                    let t = v.trim().parse::<usize>().map_err(|_| {
                        Error::config(
                            "APPARATE_THREADS",
                            format!("`{v}`"),
                            "the whole numbers (a thread count)",
                        )
                    })?;
                    ("APPARATE_THREADS", Some(t))
                }
                Err(_) => ("threads", None),
            },
        };
        let Some(t) = threads else {
            return Ok(std::thread::available_parallelism().map_or(1, |n| n.get()));
        };
        let max = Self::max_threads();
        if t == 0 || t > max {
            return Err(Error::config(
                knob,
                t,
                format!("1..={max} (64 per logical core, at most {MAX_THREADS})"),
            ));
        }
        Ok(t)
    }

    /// The micro-kernel level this configuration asks for, checked: `simd` (or
    /// `APPARATE_SIMD`) when this CPU has it, else the widest it has.
    pub fn resolve_simd(&self) -> Result<SimdLevel> {
        let (knob, level) = match self.simd {
            Some(l) => ("simd", l),
            None => match std::env::var("APPARATE_SIMD") {
                Ok(v) => {
                    let l = SimdLevel::parse(&v).ok_or_else(|| {
                        Error::config("APPARATE_SIMD", format!("`{v}`"), "avx512, avx2, generic")
                    })?;
                    ("APPARATE_SIMD", l)
                }
                Err(_) => return Ok(SimdLevel::best()),
            },
        };
        if !level.supported() {
            let have: Vec<_> = SimdLevel::available().iter().map(|l| l.name()).collect();
            return Err(Error::config(
                knob,
                level.name(),
                format!("what this CPU has: {}", have.join(", ")),
            ));
        }
        Ok(level)
    }

    /// Whether bf16-stored weights run the bf16 kernels, checked against the CPU and the
    /// micro-kernel level `simd`: `bf16`, else `APPARATE_BF16`, else where the CPU has them.
    pub fn resolve_bf16(&self, simd: SimdLevel) -> Result<bool> {
        let here = simd == SimdLevel::Avx512 && sgemm::pairs_supported();
        let (knob, on) = match self.bf16 {
            Some(on) => ("bf16", on),
            None => match std::env::var("APPARATE_BF16") {
                Ok(v) => match v.trim() {
                    "on" => ("APPARATE_BF16", true),
                    "off" => ("APPARATE_BF16", false),
                    _ => return Err(Error::config("APPARATE_BF16", format!("`{v}`"), "on, off")),
                },
                Err(_) => return Ok(here),
            },
        };
        if on && !here {
            return Err(Error::config(
                knob,
                "on",
                format!(
                    "off on this CPU and level ({}): the bf16 kernels need AVX512-BF16 and the avx512 level",
                    simd.name()
                ),
            ));
        }
        Ok(on)
    }

    /// The Winograd policy this configuration asks for, checked: `winograd`, else
    /// `APPARATE_WINOGRAD`, else [`Winograd::Auto`].
    pub fn resolve_winograd(&self) -> Result<Winograd> {
        if let Some(w) = self.winograd {
            return Ok(w);
        }
        match std::env::var("APPARATE_WINOGRAD") {
            Ok(v) => Winograd::parse(&v).ok_or_else(|| {
                Error::config("APPARATE_WINOGRAD", format!("`{v}`"), "auto, off, on")
            }),
            Err(_) => Ok(Winograd::Auto),
        }
    }
}

/// A tensor in host memory. Its shape always matches its data (made only through
/// [`Backend::upload`] and the ops), which the ops' unsafe GEMM calls rely on.
#[derive(Clone, Debug)]
pub struct CpuTensor {
    shape: Vec<usize>,
    data: Vec<f32>,
    /// The tensor as a GEMM's packed B (`W^T` of a `[n, k]` weight), made by the first product
    /// that reads it and kept: weights are packed once, not on every call. It doubles the
    /// memory of the tensors used this way (linear and dense convolution weights).
    packed: OnceLock<Arc<sgemm::PackedB>>,
    /// The tensor as a depthwise convolution's taps (`[kh * kw, c]`), made by the first
    /// convolution that reads it and kept, like `packed`.
    taps: OnceLock<Arc<Vec<f32>>>,
    /// The tensor as a 3x3 convolution's weight in the Winograd domain, made by the first
    /// convolution that takes that path and kept, like `packed` (4x the weight's memory).
    winograd: OnceLock<Arc<winograd::Filters>>,
    /// Stored as bf16 in its model file (`data` holds the exact f32 values): such a weight's
    /// products may run the bf16 kernels ([`CpuConfig::bf16`]).
    bf16: bool,
    /// The tensor as a bf16 GEMM's packed B, made by the first product that runs the bf16
    /// kernels on it and kept, like `packed` (half `packed`'s memory).
    pairs: OnceLock<Arc<sgemm::PackedB>>,
}

impl Drop for CpuTensor {
    fn drop(&mut self) {
        buffers::give(std::mem::take(&mut self.data));
    }
}

impl PartialEq for CpuTensor {
    fn eq(&self, other: &CpuTensor) -> bool {
        self.shape == other.shape && self.data == other.data
    }
}

impl CpuTensor {
    fn new(shape: Vec<usize>, data: Vec<f32>) -> CpuTensor {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape/data mismatch"
        );
        CpuTensor {
            shape,
            data,
            packed: OnceLock::new(),
            taps: OnceLock::new(),
            winograd: OnceLock::new(),
            bf16: false,
            pairs: OnceLock::new(),
        }
    }

    /// This tensor as a packed GEMM operand `W^T` of `n` rows of `k` (a `[n, k]` linear weight,
    /// or a `[cout, kh, kw, cin]` convolution weight with `k = kh * kw * cin`) for `level`: the
    /// kept copy, made on first use.
    fn packed_b(&self, level: SimdLevel, n: usize, k: usize) -> Arc<sgemm::PackedB> {
        assert_eq!(self.data.len(), n * k, "packed as {n} x {k}");
        let pack = || Arc::new(sgemm::PackedB::transposed(level, &self.data, n, k));
        let kept = self.packed.get_or_init(pack);
        if kept.level() == level && (kept.n(), kept.k()) == (n, k) {
            kept.clone()
        } else {
            // The same weights read by backends of two levels, or as two shapes: pack for this
            // call (correct, only slower).
            pack()
        }
    }

    /// This `[n, k]` weight as a bf16 GEMM's packed B: the kept copy, made on first use.
    fn packed_pairs(&self, n: usize, k: usize) -> Arc<sgemm::PackedB> {
        assert_eq!(self.data.len(), n * k, "packed as {n} x {k}");
        let pack = || Arc::new(sgemm::PackedB::transposed_pairs(&self.data, n, k));
        let kept = self.pairs.get_or_init(pack);
        if (kept.n(), kept.k()) == (n, k) {
            kept.clone()
        } else {
            pack()
        }
    }

    /// This depthwise weight (`c` channels of `taps` taps) transposed for the depthwise loops:
    /// the kept copy, made on first use.
    fn depthwise_taps(&self, c: usize, taps: usize) -> Arc<Vec<f32>> {
        let kept = self
            .taps
            .get_or_init(|| Arc::new(depthwise::transpose(&self.data, c, taps)));
        if kept.len() == c * taps {
            kept.clone()
        } else {
            Arc::new(depthwise::transpose(&self.data, c, taps))
        }
    }

    /// This 3x3 weight (`[cout, 3, 3, cin]`) in the Winograd domain for `level`: the kept
    /// copy, made on first use.
    fn winograd_filters(
        &self,
        level: SimdLevel,
        cout: usize,
        cin: usize,
    ) -> Arc<winograd::Filters> {
        let make = || Arc::new(winograd::Filters::new(level, &self.data, cout, cin));
        let kept = self.winograd.get_or_init(make);
        if kept.level() == level && kept.channels() == (cin, cout) {
            kept.clone()
        } else {
            make()
        }
    }

    /// The values, for an op that changes them in place: the kept copies, now stale, are
    /// dropped.
    fn data_mut(&mut self) -> &mut [f32] {
        self.packed.take();
        self.taps.take();
        self.winograd.take();
        &mut self.data
    }
}

#[derive(Clone)]
pub struct CpuBackend {
    /// The fork-join team (`team.rs`) every parallel op runs on, started at the first such
    /// op; `None` inside when its threads could not start (the ops then run on the caller).
    team: Arc<OnceLock<Option<team::Team>>>,
    threads: usize,
    simd: SimdLevel,
    winograd: Winograd,
    /// bf16-stored weights run the bf16 kernels ([`CpuConfig::bf16`]).
    bf16: bool,
    /// Quantized products take 8-bit activations ([`qmatvec`]) instead of f32 ([`qmatmul`]).
    q8_activations: bool,
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CpuBackend {{ threads: {}, simd: {} }}",
            self.threads,
            self.simd.name()
        )
    }
}

impl CpuBackend {
    pub fn new(config: CpuConfig) -> Result<CpuBackend> {
        let threads = config.resolve_threads()?;
        let simd = config.resolve_simd()?;
        let winograd = config.resolve_winograd()?;
        let bf16 = config.resolve_bf16(simd)?;
        Ok(CpuBackend {
            team: Arc::default(),
            threads,
            simd,
            winograd,
            bf16,
            q8_activations: false,
        })
    }

    /// Quantized weight products ([`crate::backend::decoder::DecoderBackend::qlinear`]) with
    /// activations quantized to 8-bit blocks, as llama.cpp does: integer dot products, but
    /// results that drift from the f32 model (docs/results.md). Off by default.
    pub fn with_q8_activations(mut self, on: bool) -> CpuBackend {
        self.q8_activations = on;
        self
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The micro-kernel level the GEMMs run.
    pub fn simd(&self) -> SimdLevel {
        self.simd
    }

    /// Whether products by bf16-stored weights run the bf16 kernels ([`CpuConfig::bf16`]).
    pub fn bf16(&self) -> bool {
        self.bf16
    }

    /// The `[n, k]` weight `w` packed for a product: in bf16 pairs when it is stored as bf16
    /// and the bf16 kernels are on ([`CpuConfig::bf16`]), else for the f32 micro-kernels.
    fn gemm_weight(&self, w: &CpuTensor, n: usize, k: usize) -> Arc<sgemm::PackedB> {
        if self.bf16 && w.bf16 {
            w.packed_pairs(n, k)
        } else {
            w.packed_b(self.simd, n, k)
        }
    }

    /// Whether a convolution of `x` by `w` with geometry `p` runs by Winograd's F(4x4, 3x3) on
    /// this backend (its [`Winograd`] policy and the shape); an error when the operands do not
    /// make a convolution.
    pub fn winograd_for(&self, x: &CpuTensor, w: &CpuTensor, p: &Conv2d) -> Result<bool> {
        let d = super::op_check::conv_dims(&x.shape, &w.shape, None, p, None)?;
        Ok(self.takes_winograd(&d, p))
    }

    fn takes_winograd(&self, d: &ConvDims, p: &Conv2d) -> bool {
        winograd::fits(d, p)
            && match self.winograd {
                Winograd::Auto => winograd::pays(d),
                Winograd::Off => false,
                Winograd::On => true,
            }
    }

    /// Runs an op of about `work` multiply-adds: `f` gets where its loops and GEMMs run
    /// (see [`CpuBackend::exec`]).
    fn run<R>(&self, work: usize, f: impl FnOnce(team::Exec<'_>) -> R) -> R {
        f(self.exec(work))
    }

    /// Where an op of about `work` multiply-adds runs: on the team when there is more than
    /// one thread and enough work, else on the caller.
    fn exec(&self, work: usize) -> team::Exec<'_> {
        if self.threads < 2 || work < TEAM_INLINE_WORK {
            return team::Exec::Inline;
        }
        match self.team.get_or_init(|| team::Team::new(self.threads).ok()) {
            Some(t) => team::Exec::Team(t),
            None => team::Exec::Inline,
        }
    }
}

/// Ops of fewer multiply-adds (roughly) than this run on the caller: a few microseconds of
/// work, about what waking a sleeping team worker can cost.
const TEAM_INLINE_WORK: usize = 1 << 14;

/// The host processor's model name (Linux: /proc/cpuinfo), for device ids.
pub fn host_cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn device_id(&self) -> String {
        format!(
            "cpu: {}, {} threads, f32, {}{}",
            host_cpu_name(),
            self.threads,
            self.simd.name(),
            if self.bf16 {
                ", bf16 weights in bf16"
            } else {
                ""
            }
        )
    }

    fn load_weight(&self, view: &crate::tensor::TensorView<'_>) -> Result<CpuTensor> {
        let mut t = self.upload(&view.to_f32(), view.shape)?;
        t.bf16 = view.dtype == crate::tensor::DType::BF16;
        Ok(t)
    }

    fn run_upload(&self, values: &[f32], shape: &[usize]) -> Result<CpuTensor> {
        // A recycled buffer: a batch of images is megabytes, a fresh mapping every forward.
        let mut data = buffers::take(values.len());
        data.copy_from_slice(values);
        Ok(CpuTensor::new(shape.to_vec(), data))
    }

    fn download(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(t.data.clone())
    }

    fn shape<'t>(&self, t: &'t CpuTensor) -> &'t [usize] {
        &t.shape
    }

    fn run_reshape(&self, t: CpuTensor, shape: &[usize]) -> Result<CpuTensor> {
        let mut t = t;
        let mut r = CpuTensor::new(shape.to_vec(), std::mem::take(&mut t.data));
        // Still the values of a bf16-stored weight (the packed copies, made for the old
        // shape, are not carried over).
        r.bf16 = t.bf16;
        Ok(r)
    }

    fn run_linear(&self, c: LinearCall<'_, CpuTensor>) -> Result<CpuTensor> {
        let w = self.gemm_weight(c.w, c.n, c.k);
        let data = self.run(c.m * c.n * c.k, |par| {
            linear::linear(
                &c.x.data,
                &w,
                c.b.map(|b| b.data.as_slice()),
                None,
                c.m,
                c.act,
                par,
            )
        });
        Ok(CpuTensor::new(c.out_shape, data))
    }

    fn run_add_layernorm(&self, c: LayerNormCall<'_, CpuTensor>) -> Result<CpuTensor> {
        // About ten operations per value (sum, variance, scale, shift).
        let data = self.run(c.rows * c.cols * 10, |par| {
            norm::add_layernorm(
                &c.x.data,
                &c.residual.data,
                &c.gamma.data,
                &c.beta.data,
                c.cols,
                c.eps,
                par,
            )
        });
        Ok(CpuTensor::new(c.x.shape.clone(), data))
    }

    fn run_attention(&self, c: AttentionCall<'_, CpuTensor>) -> Result<CpuTensor> {
        // Scores and weighted sum: 2 * seq * width per row.
        let work = 2 * c.rows * c.shape.seq * c.width;
        let data = self.run(work, |par| {
            attention::attention(&c.qkv.data, c.shape, c.width, c.heads, self.simd, par)
        });
        Ok(CpuTensor::new(vec![c.rows, c.width], data))
    }

    fn run_embed(&self, c: EmbedCall<'_, CpuTensor>) -> Result<CpuTensor> {
        let t = &c.tables;
        let data = self.run(c.shape.rows() * c.width * 10, |par| {
            embedding::embed(
                c.ids,
                c.type_ids,
                c.shape,
                &t.word.data,
                &t.position.data,
                &t.token_type.data,
                &t.gamma.data,
                &t.beta.data,
                c.width,
                c.eps,
                par,
            )
        });
        Ok(CpuTensor::new(vec![c.shape.rows(), c.width], data))
    }

    fn run_pool(&self, c: PoolCall<'_, CpuTensor>) -> Result<CpuTensor> {
        let data = pool::pool(&c.x.data, c.shape, c.cols, c.kind);
        Ok(CpuTensor::new(vec![c.shape.batch(), c.cols], data))
    }

    fn run_l2_normalize(&self, c: RowsCall<'_, CpuTensor>) -> Result<CpuTensor> {
        let data = norm::l2_normalize(&c.x.data, c.cols);
        Ok(CpuTensor::new(c.x.shape.clone(), data))
    }

    fn run_softmax(&self, c: RowsCall<'_, CpuTensor>) -> Result<CpuTensor> {
        let data = softmax::softmax_rows(&c.x.data, c.cols);
        Ok(CpuTensor::new(c.x.shape.clone(), data))
    }

    fn run_conv2d(&self, c: ConvCall<'_, CpuTensor>) -> Result<CpuTensor> {
        let d = c.dims;
        let work = d.n * d.oh * d.ow * d.cout * d.kh * d.kw * (d.cin / c.p.groups.max(1));
        let winograd = self.takes_winograd(&d, &c.p);
        let filters = winograd.then(|| c.w.winograd_filters(self.simd, d.cout, d.cin));
        // A dense convolution's weight: in bf16 pairs where `gemm_weight` says (Winograd runs
        // f32 on the weight's exact values), except for windows of an odd channel count (an
        // RGB stem), whose pairs of channels would straddle pixels.
        let packed = (c.p.groups <= 1 && !winograd).then(|| {
            let k = d.kh * d.kw * d.cin;
            if d.cin.is_multiple_of(2) || d.is_pointwise(&c.p) {
                self.gemm_weight(c.w, d.cout, k)
            } else {
                c.w.packed_b(self.simd, d.cout, k)
            }
        });
        let depthwise = c.p.groups > 1 && d.cin == c.p.groups && d.cout == c.p.groups;
        let taps = depthwise.then(|| c.w.depthwise_taps(d.cout, d.kh * d.kw));
        let data = self.run(work, |par| {
            let operands = conv::Conv {
                x: &c.x.data,
                w: &c.w.data,
                b: c.b.map(|b| b.data.as_slice()),
                residual: c.residual.map(|r| r.data.as_slice()),
                dims: d,
                p: &c.p,
                act: c.act,
                packed: packed.as_deref(),
                taps: taps.as_deref().map(Vec::as_slice),
                level: self.simd,
            };
            match &filters {
                Some(f) => winograd::conv(&operands, f, par),
                None => conv::conv2d(operands, par),
            }
        });
        Ok(CpuTensor::new(vec![d.n, d.oh, d.ow, d.cout], data))
    }

    fn run_inverted_residual(&self, c: InvertedResidualCall<'_, CpuTensor>) -> Result<CpuTensor> {
        let (dw, dd) = c.depthwise;
        if !inverted_residual::pays(&dd, dw.p.stride[0], self.threads) {
            return super::unfused_inverted_residual(self, c);
        }
        let (pr, pd) = c.project;
        let expand = c
            .expand
            .map(|(e, ed)| (e, self.gemm_weight(e.w, ed.cout, ed.cin)));
        let project = self.gemm_weight(pr.w, pd.cout, pd.cin);
        let taps = dw.w.depthwise_taps(dd.cout, dd.kh * dd.kw);
        let pixels = dd.n * dd.h * dd.w;
        let work = c.expand.map_or(0, |(_, ed)| pixels * ed.cin * ed.cout)
            + dd.n * dd.oh * dd.ow * dd.cout * dd.kh * dd.kw
            + pd.n * pd.oh * pd.ow * pd.cin * pd.cout;
        let data = self.run(work, |par| {
            let block = inverted_residual::Block {
                x: &c.x.data,
                expand: expand.as_ref().map(|(e, w)| inverted_residual::Pointwise {
                    w,
                    b: e.b.map(|b| b.data.as_slice()),
                    act: e.act,
                }),
                dw: conv::Conv {
                    x: &[],
                    w: &dw.w.data,
                    b: dw.b.map(|b| b.data.as_slice()),
                    residual: None,
                    dims: dd,
                    p: &dw.p,
                    act: dw.act,
                    packed: None,
                    taps: Some(&taps),
                    level: self.simd,
                },
                project: inverted_residual::Pointwise {
                    w: &project,
                    b: pr.b.map(|b| b.data.as_slice()),
                    act: pr.act,
                },
                residual: c.residual.map(|r| r.data.as_slice()),
            };
            inverted_residual::run(&block, par)
        });
        Ok(CpuTensor::new(vec![pd.n, pd.oh, pd.ow, pd.cout], data))
    }

    fn run_pool2d(&self, c: Pool2dCall<'_, CpuTensor>) -> Result<CpuTensor> {
        let d = c.dims;
        let work = d.n * d.oh * d.ow * d.c * c.p.kernel[0] * c.p.kernel[1];
        let data = self.run(work, |par| conv::pool2d(&c.x.data, d.to_array(), &c.p, par));
        Ok(CpuTensor::new(vec![d.n, d.oh, d.ow, d.c], data))
    }

    fn run_global_avg_pool(&self, c: GlobalPoolCall<'_, CpuTensor>) -> Result<CpuTensor> {
        let data = self.run(c.n * c.hw * c.c, |par| {
            conv::global_avg_pool(&c.x.data, c.n, c.hw, c.c, par)
        });
        Ok(CpuTensor::new(vec![c.n, c.c], data))
    }

    fn run_ramp_exit(&self, c: RampCall<'_, CpuTensor>) -> Result<Vec<RampDecision>> {
        let (input, head) = (c.input, c.head);
        // Pooling over every position, the optional dense layer, the output layer.
        let dense = if head.dense.is_some() { c.width } else { 0 };
        let work = c.batch * c.width * (input.positions + dense + c.classes);
        Ok(self.run(work, |par| {
            ramp::ramp_exit(
                &input.x.data,
                input.positions,
                input.lengths,
                input.pooling,
                head.dense
                    .map(|(w, b)| (w.data.as_slice(), b.data.as_slice())),
                (&head.out.0.data, &head.out.1.data),
                c.width,
                c.classes,
                c.threshold.data[0],
                par,
            )
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Activation;

    #[test]
    fn thread_counts_out_of_range_are_refused_by_name() {
        for bad in [0, CpuConfig::max_threads() + 1, 10_000] {
            let e = CpuBackend::new(CpuConfig {
                threads: Some(bad),
                ..Default::default()
            })
            .err()
            .unwrap_or_else(|| panic!("{bad} threads accepted"))
            .to_string();
            assert!(e.contains("threads") && e.contains("1..="), "{e}");
        }
        assert_eq!(
            CpuBackend::new(CpuConfig {
                threads: Some(2),
                ..Default::default()
            })
            .unwrap()
            .threads(),
            2
        );
    }

    #[test]
    fn winograd_policy_picks_the_path_and_both_paths_agree() {
        for w in [Winograd::Auto, Winograd::Off, Winograd::On] {
            assert_eq!(Winograd::parse(&format!(" {} ", w.name())), Some(w));
        }
        assert_eq!(Winograd::parse("yes"), None);
        let p = Conv2d {
            stride: [1, 1],
            padding: [1, 1],
            groups: 1,
            padding_extra: [0, 0],
        };
        let be = |w| {
            CpuBackend::new(CpuConfig {
                threads: Some(2),
                winograd: Some(w),
                ..Default::default()
            })
            .unwrap()
        };
        let vals = |len: usize| conv::tests::data(len, len as u32);
        // (n, h, w, cin, cout, what `auto` picks): 4 tiles is too few, 3 channels too few.
        for (n, h, wd, cin, cout, auto) in [
            (1, 7, 7, 32, 32, false),
            (2, 7, 7, 32, 32, true),
            (1, 16, 16, 3, 16, false),
            (1, 16, 16, 16, 24, true),
            // Enough tiles for the per-task way (`winograd::per_task`).
            (1, 56, 56, 16, 16, true),
            // 1 pixel wide: 16 computed per tile for 4 kept.
            (1, 64, 1, 16, 16, false),
        ] {
            let mut outs = Vec::new();
            for (policy, want) in [
                (Winograd::Off, false),
                (Winograd::On, true),
                (Winograd::Auto, auto),
            ] {
                let be = be(policy);
                let x = be
                    .upload(&vals(n * h * wd * cin), &[n, h, wd, cin])
                    .unwrap();
                let w = be
                    .upload(&vals(cout * 9 * cin), &[cout, 3, 3, cin])
                    .unwrap();
                let b = be.upload(&vals(cout), &[cout]).unwrap();
                assert_eq!(
                    be.winograd_for(&x, &w, &p).unwrap(),
                    want,
                    "{policy:?} {n}x{h}x{wd}x{cin}"
                );
                // Twice: the second call reads the kept transformed weight.
                for _ in 0..2 {
                    let y = be
                        .conv2d(&x, &w, Some(&b), &p, None, Activation::Relu)
                        .unwrap();
                    outs.push(be.download(&y).unwrap());
                }
            }
            for o in &outs[1..] {
                for (g, w) in o.iter().zip(&outs[0]) {
                    assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{g} vs {w}");
                }
            }
        }
        let strided = Conv2d {
            stride: [2, 2],
            ..p
        };
        let be = be(Winograd::On);
        let x = be.upload(&vals(16 * 16 * 16), &[1, 16, 16, 16]).unwrap();
        let w = be.upload(&vals(16 * 9 * 16), &[16, 3, 3, 16]).unwrap();
        assert!(
            !be.winograd_for(&x, &w, &strided).unwrap(),
            "stride 2 has no Winograd path"
        );
        assert!(
            be.winograd_for(&w, &x, &p).is_err(),
            "operands that make no convolution"
        );
    }

    /// bf16 kernels: the policy's errors, and which weights take them (only those stored as
    /// bf16: linear layers and 1x1 convolutions against a reference on the bf16-rounded
    /// operands; a 3x3 stride-2 convolution from an even channel count, not from an odd one
    /// nor by Winograd); where the CPU has AVX512-BF16 only (said otherwise).
    #[test]
    fn bf16_weights_take_the_bf16_kernels() {
        let on = CpuConfig {
            bf16: Some(true),
            ..Default::default()
        };
        let e = on.resolve_bf16(SimdLevel::Generic).unwrap_err().to_string();
        assert!(e.contains("bf16") && e.contains("AVX512-BF16"), "{e}");
        let off = CpuConfig {
            bf16: Some(false),
            ..Default::default()
        };
        assert!(!off.resolve_bf16(SimdLevel::best()).unwrap());
        // The level the backends below get (`APPARATE_SIMD` may narrow it).
        let level = CpuConfig::default().resolve_simd().unwrap();
        if !(level == SimdLevel::Avx512 && sgemm::pairs_supported()) {
            eprintln!("no AVX512-BF16 on this CPU or level: the bf16 kernels are not tested here");
            return;
        }
        let be = |bf16| {
            CpuBackend::new(CpuConfig {
                threads: Some(2),
                bf16: Some(bf16),
                ..Default::default()
            })
            .unwrap()
        };
        let (on, off) = (be(true), be(false));
        assert!(on.bf16() && !off.bf16());
        assert!(on.device_id().contains("bf16") && !off.device_id().contains("bf16"));
        let round = |v: Vec<f32>| -> Vec<f32> {
            v.iter()
                .map(|&x| half::bf16::from_f32(x).to_f32())
                .collect()
        };
        let vals = |len: usize, seed: u32| conv::tests::data(len, seed);
        let (m, n, k) = (37, 70, 301);
        let (x, w) = (vals(m * k, 1), round(vals(n * k, 2)));
        let bias = vals(n, 3);
        // The reference: f64 sums of the rounded operands.
        let xr = round(x.clone());
        let want: Vec<f32> = (0..m * n)
            .map(|i| {
                let (r, c) = (i / n, i % n);
                let s: f64 = (0..k)
                    .map(|p| f64::from(xr[r * k + p]) * f64::from(w[c * k + p]))
                    .sum();
                (s + f64::from(bias[c])).max(0.0) as f32
            })
            .collect();
        for (be, stored_bf16, kernels) in
            [(&on, true, true), (&on, false, false), (&off, true, false)]
        {
            let xt = be.upload(&x, &[m, k]).unwrap();
            let mut wt = be.upload(&w, &[n, k]).unwrap();
            wt.bf16 = stored_bf16;
            let bt = be.upload(&bias, &[n]).unwrap();
            // Twice: the second call reads the kept packed weight.
            for _ in 0..2 {
                let y = be.linear(&xt, &wt, Some(&bt), Activation::Relu).unwrap();
                let y = be.download(&y).unwrap();
                let worst = y
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
                    .fold(0.0f32, f32::max);
                // The bf16 kernels sum the rounded operands (f32 sums: 1e-5); the f32 ones
                // sum x unrounded (bf16's rounding of x: about 1e-2 here).
                if kernels {
                    assert!(worst <= 1e-5, "bf16 kernels: {worst}");
                } else {
                    assert!(worst > 1e-4 && worst <= 5e-2, "f32 kernels: {worst}");
                }
            }
            assert_eq!(wt.pairs.get().is_some(), kernels);
            assert_eq!(wt.packed.get().is_some(), !kernels);
            // A 1x1 stride-1 convolution with a residual: the same product.
            let (h, wd) = (4, 5);
            let p = Conv2d {
                stride: [1, 1],
                padding: [0, 0],
                groups: 1,
                padding_extra: [0, 0],
            };
            let img = be.upload(&x[..h * wd * k], &[1, h, wd, k]).unwrap();
            let mut cw = be.upload(&w, &[n, 1, 1, k]).unwrap();
            cw.bf16 = stored_bf16;
            let res = be.upload(&vals(h * wd * n, 4), &[1, h, wd, n]).unwrap();
            let y = be
                .conv2d(&img, &cw, Some(&bt), &p, Some(&res), Activation::None)
                .unwrap();
            let y = be.download(&y).unwrap();
            let r = vals(h * wd * n, 4);
            for (i, g) in y.iter().enumerate() {
                let (row, c) = (i / n, i % n);
                let s: f64 = (0..k)
                    .map(|q| f64::from(xr[row * k + q]) * f64::from(w[c * k + q]))
                    .sum();
                let want = (s + f64::from(bias[c]) + f64::from(r[i])) as f32;
                let tol = if kernels { 1e-5 } else { 5e-2 };
                assert!(
                    (g - want).abs() <= tol * want.abs().max(1.0),
                    "{g} vs {want}"
                );
            }
            assert_eq!(cw.pairs.get().is_some(), kernels);
        }
        // A 3x3 stride-2 convolution takes them from an even channel count only (its windows
        // read pairs of channels in place), a Winograd one not at all.
        for (cin, stride, want) in [(16, 2, true), (3, 2, false), (16, 1, false)] {
            let p = Conv2d {
                stride: [stride, stride],
                padding: [1, 1],
                groups: 1,
                padding_extra: [0, 0],
            };
            let be = CpuBackend::new(CpuConfig {
                threads: Some(2),
                bf16: Some(true),
                winograd: Some(Winograd::On),
                ..Default::default()
            })
            .unwrap();
            let img = be.upload(&vals(9 * 9 * cin, 5), &[1, 9, 9, cin]).unwrap();
            let mut cw = be.upload(&vals(8 * 9 * cin, 6), &[8, 3, 3, cin]).unwrap();
            cw.bf16 = true;
            be.conv2d(&img, &cw, None, &p, None, Activation::None)
                .unwrap();
            assert_eq!(
                cw.pairs.get().is_some(),
                want,
                "{cin} channels, stride {stride}"
            );
        }
    }
}

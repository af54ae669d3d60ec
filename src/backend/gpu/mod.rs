//! The GPU backend: the [`Backend`] ops as launches of `kernels/*.cu` on any [`Device`] (`emu`
//! or `cuda`). Each kernel source has its launcher beside it here, one file per source
//! (`gemm.rs` for `kernels/gemm.cu`, ...); the sizes both sides must agree on come from
//! [`params`], generated from `kernels/common/params.cuh`. This file holds the backend itself and
//! what every launcher shares.
//!
//! Tensors live on the device in the backend's storage dtype (f32, f16 or bf16); kernels compute
//! in f32. Host values cross in f32 and are converted on the way. Temporary buffers (token ids,
//! lengths) are dropped right after their launch: devices free memory in stream order.

/// A kernel switch: `from_env` (the environment variable `$var`, else `$default`; another
/// value is reported once on stderr and the default kept, since a backend is made without a
/// `Result`) and `FromStr` over the switch's names, whose error names the bad value and lists
/// the good ones.
macro_rules! kernel_switch {
    ($ty:ident, $var:literal, $what:literal, default $default:ident,
     { $($name:literal => $variant:ident),+ $(,)? }) => {
        impl $ty {
            #[doc = concat!("`", $var, "` = ", $("`", $name, "` ",)+ "; unset means `",
                stringify!($default), "`.")]
            pub fn from_env() -> $ty {
                static WARNED: std::sync::Once = std::sync::Once::new();
                super::kernel_from_env($var, $ty::$default, &WARNED)
            }
        }

        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<$ty, String> {
                match s {
                    $($name => Ok($ty::$variant),)+
                    other => Err(format!(
                        concat!("unknown ", $what, " `{}` ({})"),
                        other,
                        [$($name),+].join(", ")
                    )),
                }
            }
        }
    };
}

mod attention;
pub use attention::{AttentionKernel, FlashTile};
mod conv;
pub use conv::ConvKernel;
pub mod decoder;
pub mod elementwise;
mod embedding;
mod gemm;
pub use gemm::{GemmKernel, PipeTile};
mod gemm_wgmma;
mod kv_attention;
pub use kv_attention::KvSplit;
mod norm;
pub use norm::RowKernel;
pub mod params;
mod pool;
mod quant;
mod ramp;
mod rmsnorm;
mod rope;
mod sampling;
pub mod selftest;
pub mod shared_memory;
mod softmax;
mod swiglu;

use std::sync::Arc;

use super::device::{Device, KernelArg, LaunchConfig, MAX_SHARED_BYTES};
use super::op_check::{
    AttentionCall, ConvCall, EmbedCall, GlobalPoolCall, LayerNormCall, LinearCall, Pool2dCall,
    PoolCall, RampCall, RowsCall,
};
use super::{Backend, PendingDecisions, RampDecision};
use crate::error::{Error, Result};
use crate::tensor::{DType, TensorView};

/// A tensor in device memory.
pub struct GpuTensor<B> {
    buf: B,
    shape: Vec<usize>,
    dtype: DType,
}

impl<B> GpuTensor<B> {
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
}

/// The GPU backend over device `D`, storing tensors as `dtype`.
pub struct GpuBackend<D: Device> {
    dev: Arc<D>,
    dtype: DType,
    poison: bool,
    gemm: GemmKernel,
    /// GEMM tiles that fill the GPU (see [`GpuBackend::with_gemm_fill_tiles`]).
    gemm_fill: usize,
    pipe_tile: PipeTile,
    attention: AttentionKernel,
    flash_tile: FlashTile,
    rows: RowKernel,
    conv: ConvKernel,
    kv_split: KvSplit,
}

impl<D: Device> Clone for GpuBackend<D> {
    fn clone(&self) -> Self {
        GpuBackend {
            dev: self.dev.clone(),
            dtype: self.dtype,
            poison: self.poison,
            gemm: self.gemm,
            gemm_fill: self.gemm_fill,
            pipe_tile: self.pipe_tile,
            attention: self.attention,
            flash_tile: self.flash_tile,
            rows: self.rows,
            conv: self.conv,
            kv_split: self.kv_split,
        }
    }
}

/// A kernel choice from the environment variable `var`: `default` when unset; another value is
/// reported once (`warned`, one per variable) on stderr and the default kept, since a backend
/// is made without a `Result`.
fn kernel_from_env<T>(var: &str, default: T, warned: &'static std::sync::Once) -> T
where
    T: std::str::FromStr<Err = String> + std::fmt::Debug,
{
    match std::env::var(var) {
        Err(_) => default,
        Ok(v) => v.parse().unwrap_or_else(|e| {
            warned.call_once(|| eprintln!("warning: {var}: {e}; using {default:?}"));
            default
        }),
    }
}

impl<D: Device> GpuBackend<D> {
    pub fn new(dev: D, dtype: DType) -> GpuBackend<D> {
        Self::shared(Arc::new(dev), dtype)
    }

    /// A backend on a device that other backends (e.g. other dtypes) share.
    pub fn shared(dev: Arc<D>, dtype: DType) -> GpuBackend<D> {
        let gemm_fill = dev
            .multiprocessors()
            .unwrap_or(params::GEMM_PIPE_BIG_MIN_TILES as usize)
            .max(1);
        GpuBackend {
            dev,
            dtype,
            poison: false,
            gemm: GemmKernel::from_env(),
            gemm_fill,
            pipe_tile: PipeTile::from_env(),
            attention: AttentionKernel::from_env(),
            flash_tile: FlashTile::from_env(),
            rows: RowKernel::from_env(),
            conv: ConvKernel::from_env(),
            kv_split: KvSplit::default(),
        }
    }

    /// Which f16/bf16 GEMM kernel runs the linear layers and convolutions (default: the
    /// `APPARATE_GPU_GEMM` environment variable, else [`GemmKernel::PipelinedSplitK`]).
    pub fn with_gemm(mut self, gemm: GemmKernel) -> GpuBackend<D> {
        self.gemm = gemm;
        self
    }

    pub fn gemm_kernel(&self) -> GemmKernel {
        self.gemm
    }

    /// How many output tiles fill the GPU: a GEMM with at least this many large tiles runs
    /// them (128 x 128 pipelined, 128 x 256 wgmma), one with fewer runs smaller tiles and,
    /// with split-K, splits K until about twice this many blocks run; the persistent TMA GEMM
    /// runs at most this many blocks. Default: the device's multiprocessors
    /// ([`Device::multiprocessors`]: 132 on an H100 SXM/H200, 114 on an H100 PCIe, 108 on an
    /// A100), else 132. The parity tests set it low to reach the large tiles at shapes the
    /// emulated device runs quickly. 0 is taken as 1.
    pub fn with_gemm_fill_tiles(mut self, tiles: usize) -> GpuBackend<D> {
        self.gemm_fill = tiles.max(1);
        self
    }

    /// The warp layout of the pipelined GEMM's big tile (default: the `APPARATE_GPU_PIPE_TILE`
    /// environment variable, else [`PipeTile::Warp64x32`]). The parity tests and the kernel
    /// benchmark set it to run both at the same shapes.
    pub fn with_pipe_tile(mut self, tile: PipeTile) -> GpuBackend<D> {
        self.pipe_tile = tile;
        self
    }

    /// How many output tiles fill the GPU ([`GpuBackend::with_gemm_fill_tiles`]).
    pub fn gemm_fill_tiles(&self) -> usize {
        self.gemm_fill
    }

    /// Which attention kernels run (default: the `APPARATE_GPU_ATTENTION` environment
    /// variable, else [`AttentionKernel::Flash`]): the encoders' f16/bf16 attention and the
    /// decoder's attention over its paged cache (split-KV, every dtype).
    pub fn with_attention(mut self, attention: AttentionKernel) -> GpuBackend<D> {
        self.attention = attention;
        self
    }

    pub fn attention_kernel(&self) -> AttentionKernel {
        self.attention
    }

    /// Which block of the encoders' flash attention runs (default: the
    /// `APPARATE_GPU_FLASH_TILE` environment variable, else [`FlashTile::Narrow`]). The parity
    /// tests and the kernel benchmark set it to run both at the same shapes.
    pub fn with_flash_tile(mut self, tile: FlashTile) -> GpuBackend<D> {
        self.flash_tile = tile;
        self
    }

    /// Which residual add + LayerNorm kernel runs (default: the `APPARATE_GPU_ROWS`
    /// environment variable, else [`RowKernel::Warp`]).
    pub fn with_rows(mut self, rows: RowKernel) -> GpuBackend<D> {
        self.rows = rows;
        self
    }

    /// How the dense f16/bf16 convolutions that are not plain GEMMs run (default: the
    /// `APPARATE_GPU_CONV` environment variable, else [`ConvKernel::Implicit`]).
    pub fn with_conv(mut self, conv: ConvKernel) -> GpuBackend<D> {
        self.conv = conv;
        self
    }

    pub fn conv_kernel(&self) -> ConvKernel {
        self.conv
    }

    /// How the decoder's flash attention splits long rows into chunks (default
    /// [`KvSplit::default`]).
    pub fn with_kv_split(mut self, kv_split: KvSplit) -> GpuBackend<D> {
        self.kv_split = kv_split;
        self
    }

    /// Fill every op output with NaN before its kernel runs, so an element a kernel forgets to
    /// write shows up in the results (the parity tests use this).
    pub fn with_poisoned_outputs(mut self) -> GpuBackend<D> {
        self.poison = true;
        self
    }

    pub fn device(&self) -> &D {
        &self.dev
    }

    /// The device, shared (to wrap it in a [`crate::backend::capture::GraphDevice`], say).
    pub fn shared_device(&self) -> Arc<D> {
        self.dev.clone()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A new uninitialised (or poisoned) tensor of this backend's dtype, e.g. the output that
    /// the `*_into` launchers write, allocated once outside a timed loop.
    pub fn alloc(&self, shape: Vec<usize>) -> Result<GpuTensor<D::Buf>> {
        let n: usize = shape.iter().product();
        let buf = self.dev.alloc(n * self.dtype.size())?;
        if self.poison {
            self.dev.fill(&buf, 0xff)?;
        }
        Ok(GpuTensor {
            buf,
            shape,
            dtype: self.dtype,
        })
    }

    /// The name of `op`'s kernel in this backend's dtype (`gemm_bf16`, ...).
    fn kernel(&self, op: &str) -> String {
        format!("{op}_{}", self.dtype.name())
    }

    /// A tensor as a kernel argument; refuses one of another dtype (backends that share a
    /// device share the tensor type, and a kernel would read the wrong number of bytes).
    fn ptr(&self, t: &GpuTensor<D::Buf>) -> Result<KernelArg> {
        if t.dtype != self.dtype {
            return Err(Error::device(
                self.dev.name(),
                "tensor dtype",
                format!("a {} tensor handed to the {} backend", t.dtype, self.dtype),
            ));
        }
        Ok(KernelArg::Ptr(self.dev.address(&t.buf)))
    }

    /// An optional tensor as a kernel argument: null when absent.
    fn opt_ptr(&self, t: Option<&GpuTensor<D::Buf>>) -> Result<KernelArg> {
        t.map_or(Ok(KernelArg::Ptr(0)), |t| self.ptr(t))
    }

    /// An output tensor handed in by a caller (`*_into`): of this dtype and the shape the op
    /// writes, so the kernel stays inside it.
    fn check_out(&self, op: &'static str, y: &GpuTensor<D::Buf>, shape: &[usize]) -> Result<()> {
        if y.shape != shape {
            return Err(Error::shape(
                op,
                "output shape",
                format!("{shape:?}"),
                format!("{:?}", y.shape),
            ));
        }
        self.ptr(y).map(|_| ())
    }

    /// Every launch of this backend goes through here.
    fn launch(&self, kernel: &str, cfg: LaunchConfig, args: &[KernelArg]) -> Result<()> {
        // SAFETY: the launchers beside this file pass arguments in the order and types of the
        // kernel signatures in kernels/*.cu, addresses of live buffers they allocated or were
        // given (of this backend's dtype, checked by `ptr`), and sizes taken from calls that
        // `op_check` built from those same buffers' shapes.
        unsafe { self.dev.launch(kernel, cfg, args) }
    }

    /// A launch with one thread per element of `total`, grid-stride (kernels loop over the
    /// rest), capped at a grid every device accepts.
    fn elementwise_cfg(&self, total: usize) -> LaunchConfig {
        elementwise::cfg(total)
    }

    /// A one-block-per-row launch of a row kernel.
    fn rows_cfg(&self, what: &str, rows: usize, shared_bytes: u32) -> Result<LaunchConfig> {
        Ok(LaunchConfig::linear(
            self.grid(what, rows)?,
            params::ROW_THREADS,
            shared_bytes,
        ))
    }

    /// Whether the warp-per-row kernels are chosen and take rows of `cols` values in these
    /// tensors: rows a whole number of 16-byte vectors, at most `LN_WARP_MAX_COLS` wide, every
    /// tensor 16-byte aligned.
    fn warp_rows_fit<'t>(
        &self,
        cols: usize,
        mut tensors: impl Iterator<Item = &'t GpuTensor<D::Buf>>,
    ) -> bool
    where
        D::Buf: 't,
    {
        self.rows == RowKernel::Warp
            && cols.is_multiple_of(16 / self.dtype.size())
            && cols <= params::LN_WARP_MAX_COLS as usize
            && tensors.all(|t| self.dev.address(&t.buf).is_multiple_of(16))
    }

    /// A one-warp-per-row launch of a warp row kernel (`LN_WARP_ROWS` rows per block).
    fn warp_rows_cfg(&self, what: &str, rows: usize) -> Result<LaunchConfig> {
        let per_block = params::LN_WARP_ROWS as usize;
        Ok(LaunchConfig::linear(
            self.grid(what, rows.div_ceil(per_block))?,
            params::LN_WARP_ROWS * 32,
            0,
        ))
    }

    /// Row kernel `op` (softmax, L2) on x into y: `{op}_warp` with arguments (x, out, rows,
    /// cols) where the warp-per-row kernels are chosen and the rows fit them, else `op` with
    /// (x, out, cols), one block per row.
    fn launch_row_op(
        &self,
        op: &str,
        c: &RowsCall<'_, GpuTensor<D::Buf>>,
        y: &GpuTensor<D::Buf>,
    ) -> Result<()> {
        if c.rows == 0 {
            return Ok(());
        }
        let (x, out, cols) = (self.ptr(c.x)?, self.ptr(y)?, self.u32("cols", c.cols)?);
        if self.warp_rows_fit(c.cols, [c.x, y].into_iter()) {
            let cfg = self.warp_rows_cfg("row blocks", c.rows)?;
            let args = [x, out, self.u32("rows", c.rows)?, cols];
            return self.launch(&self.kernel(&format!("{op}_warp")), cfg, &args);
        }
        self.launch(
            &self.kernel(op),
            self.rows_cfg("rows", c.rows, 0)?,
            &[x, out, cols],
        )
    }

    /// Host sizes as a device buffer of i32 (lengths, token ids): checked to fit.
    fn ints(&self, what: &str, values: impl Iterator<Item = usize>) -> Result<D::Buf> {
        let v = values
            .map(|x| {
                i32::try_from(x).map_err(|_| {
                    self.size_error(what, x, "does not fit the kernels' 32-bit integers")
                })
            })
            .collect::<Result<Vec<i32>>>()?;
        self.dev.upload(bytemuck::cast_slice(&v))
    }

    /// Dynamic shared memory of a row kernel that keeps one f32 row plus its scratch.
    fn row_shared(&self, op: &str, cols: usize) -> Result<u32> {
        self.shared_bytes(op, cols + params::ROW_SCRATCH as usize, || "one row".into())
    }

    /// `floats` f32 values of dynamic shared memory, refused over the device limit.
    /// `what` is only formatted for the error: this runs on every launch.
    fn shared_bytes(&self, op: &str, floats: usize, what: impl FnOnce() -> String) -> Result<u32> {
        let bytes = floats.saturating_mul(4);
        if bytes > MAX_SHARED_BYTES as usize {
            return Err(Error::kernel(
                self.dev.name(),
                self.kernel(op),
                format!(
                    "{} needs {bytes} bytes of shared memory, more than the {MAX_SHARED_BYTES} a block may have",
                    what()
                ),
            ));
        }
        Ok(bytes as u32)
    }

    fn size_error(&self, what: &str, v: usize, why: &str) -> Error {
        Error::device(self.dev.name(), format!("{what} = {v}"), why)
    }

    /// A grid dimension; `launch` rejects those over the device limits.
    fn grid(&self, what: &str, v: usize) -> Result<u32> {
        u32::try_from(v)
            .map_err(|_| self.size_error(what, v, "is more blocks than a launch can have"))
    }

    fn u32(&self, what: &str, v: usize) -> Result<KernelArg> {
        u32::try_from(v)
            .map(KernelArg::U32)
            .map_err(|_| self.size_error(what, v, "does not fit the kernels' 32-bit sizes"))
    }
}

impl<D: Device> Backend for GpuBackend<D> {
    type Tensor = GpuTensor<D::Buf>;

    fn name(&self) -> &'static str {
        self.dev.name()
    }

    fn device_id(&self) -> String {
        format!("{}, {}", self.dev.describe(), self.dtype.name())
    }

    fn synchronize(&self) -> Result<()> {
        self.dev.synchronize()
    }

    fn graphed<R>(&self, key: &str, f: &mut dyn FnMut() -> Result<R>) -> Result<R> {
        self.dev.graphed(key, f)
    }

    fn graphs_enabled(&self) -> bool {
        self.dev.graphs_enabled()
    }

    fn graph_probe(&self) -> Option<crate::backend::capture::GraphProbe> {
        self.dev.graph_stats()?;
        let dev = self.dev.clone();
        Some(Arc::new(move || dev.graph_stats().unwrap_or_default()))
    }

    fn run_upload(&self, values: &[f32], shape: &[usize]) -> Result<Self::Tensor> {
        Ok(GpuTensor {
            buf: self.dev.upload(&self.dtype.encode(values))?,
            shape: shape.to_vec(),
            dtype: self.dtype,
        })
    }

    fn load_weight(&self, view: &TensorView<'_>) -> Result<Self::Tensor> {
        let buf = if view.dtype == self.dtype {
            self.dev.upload(view.bytes)?
        } else {
            self.dev.upload(&self.dtype.encode(&view.to_f32()))?
        };
        Ok(GpuTensor {
            buf,
            shape: view.shape.to_vec(),
            dtype: self.dtype,
        })
    }

    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>> {
        self.dev.synchronize()?;
        let mut bytes = vec![0u8; self.dev.len(&t.buf)];
        self.dev.download(&t.buf, &mut bytes)?;
        let view = TensorView {
            name: "",
            dtype: t.dtype,
            shape: &t.shape,
            bytes: &bytes,
        };
        Ok(view.to_f32().into_owned())
    }

    fn shape<'t>(&self, t: &'t Self::Tensor) -> &'t [usize] {
        &t.shape
    }

    fn run_reshape(&self, t: Self::Tensor, shape: &[usize]) -> Result<Self::Tensor> {
        Ok(GpuTensor {
            shape: shape.to_vec(),
            ..t
        })
    }

    fn run_linear(&self, c: LinearCall<'_, Self::Tensor>) -> Result<Self::Tensor> {
        let y = self.alloc(c.out_shape.clone())?;
        self.launch_linear(&c, &y)?;
        Ok(y)
    }

    fn run_add_layernorm(&self, c: LayerNormCall<'_, Self::Tensor>) -> Result<Self::Tensor> {
        let y = self.alloc(self.shape(c.x).to_vec())?;
        self.launch_add_layernorm(&c, &y)?;
        Ok(y)
    }

    fn run_attention(&self, c: AttentionCall<'_, Self::Tensor>) -> Result<Self::Tensor> {
        self.launch_attention(c)
    }

    fn run_embed(&self, c: EmbedCall<'_, Self::Tensor>) -> Result<Self::Tensor> {
        self.launch_embed(c)
    }

    fn run_pool(&self, c: PoolCall<'_, Self::Tensor>) -> Result<Self::Tensor> {
        self.launch_pool(c)
    }

    fn run_l2_normalize(&self, c: RowsCall<'_, Self::Tensor>) -> Result<Self::Tensor> {
        let y = self.alloc(self.shape(c.x).to_vec())?;
        self.launch_row_op("l2_normalize", &c, &y)?;
        Ok(y)
    }

    fn run_softmax(&self, c: RowsCall<'_, Self::Tensor>) -> Result<Self::Tensor> {
        let y = self.alloc(self.shape(c.x).to_vec())?;
        self.launch_row_op("softmax", &c, &y)?;
        Ok(y)
    }

    fn run_conv2d(&self, c: ConvCall<'_, Self::Tensor>) -> Result<Self::Tensor> {
        self.launch_conv2d(c)
    }

    fn run_pool2d(&self, c: Pool2dCall<'_, Self::Tensor>) -> Result<Self::Tensor> {
        self.launch_pool2d(c)
    }

    fn run_global_avg_pool(&self, c: GlobalPoolCall<'_, Self::Tensor>) -> Result<Self::Tensor> {
        self.launch_global_avg_pool(c)
    }

    fn run_ramp_exit(&self, c: RampCall<'_, Self::Tensor>) -> Result<Vec<RampDecision>> {
        self.launch_ramp_exit(c)
    }

    fn run_ramp_exit_async(
        &self,
        c: RampCall<'_, Self::Tensor>,
    ) -> Result<Box<dyn PendingDecisions>> {
        self.launch_ramp_exit_async(c)
    }
}

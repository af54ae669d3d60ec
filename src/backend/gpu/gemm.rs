//! Launcher of `kernels/gemm.cu`: `y = act(x W^T + b + residual)`, for `linear` and for the
//! convolutions that are GEMMs (1x1, or after im2col).

use super::{GpuBackend, GpuTensor, params};
use crate::backend::Activation;
use crate::backend::device::{Device, KernelArg, LaunchConfig};
use crate::backend::op_check::{self, LinearCall};
use crate::error::Result;
use crate::tensor::DType;

impl<D: Device> GpuBackend<D> {
    /// [`Backend::linear`] into an output allocated beforehand (`y` shaped like the result), so
    /// a timed loop launches without allocating.
    pub fn linear_into(
        &self,
        x: &GpuTensor<D::Buf>,
        w: &GpuTensor<D::Buf>,
        b: Option<&GpuTensor<D::Buf>>,
        act: Activation,
        y: &GpuTensor<D::Buf>,
    ) -> Result<()> {
        let c = op_check::linear(self, x, w, b, act)?;
        self.check_out("linear", y, &c.out_shape)?;
        self.launch_linear(&c, y)
    }

    pub(super) fn launch_linear(
        &self,
        c: &LinearCall<'_, GpuTensor<D::Buf>>,
        y: &GpuTensor<D::Buf>,
    ) -> Result<()> {
        let gemm = Gemm {
            w: c.w,
            b: c.b,
            residual: None,
            mnk: [c.m, c.n, c.k],
            act: c.act,
        };
        self.launch_gemm(self.ptr(c.x)?, &gemm, y)
    }

    /// `y = act(x W^T + b + residual)` through the GEMM kernels; `x` is an address (a tensor
    /// or an im2col buffer) of [m, k] values of this backend's dtype.
    pub(super) fn launch_gemm(
        &self,
        x: KernelArg,
        g: &Gemm<'_, D::Buf>,
        y: &GpuTensor<D::Buf>,
    ) -> Result<()> {
        let [m, n, _] = g.mnk;
        if m == 0 || n == 0 {
            return Ok(());
        }
        if let Some(cfg) = self.pipelined_cfg(x, g)? {
            let (kernel, cfg) = cfg;
            return self.launch(&kernel, cfg, &self.gemm_args(x, g, y)?);
        }
        let threads = if self.dtype == DType::F32 {
            params::GEMM_SIMT_THREADS
        } else {
            params::GEMM_TC_THREADS
        };
        let cfg = LaunchConfig {
            grid: [
                self.grid("GEMM row tiles", m.div_ceil(params::GEMM_BM as usize))?,
                self.grid("GEMM column tiles", n.div_ceil(params::GEMM_BN as usize))?,
                1,
            ],
            block: [threads, 1, 1],
            shared_bytes: 0,
        };
        self.launch(&self.kernel("gemm"), cfg, &self.gemm_args(x, g, y)?)
    }

    /// Every GEMM kernel's arguments: (x, w, bias, residual, y, M, N, K, act).
    fn gemm_args(
        &self,
        x: KernelArg,
        g: &Gemm<'_, D::Buf>,
        y: &GpuTensor<D::Buf>,
    ) -> Result<[KernelArg; 9]> {
        let [m, n, k] = g.mnk;
        Ok([
            x,
            self.ptr(g.w)?,
            self.opt_ptr(g.b)?,
            self.opt_ptr(g.residual)?,
            self.ptr(y)?,
            self.u32("M", m)?,
            self.u32("N", n)?,
            self.u32("K", k)?,
            KernelArg::I32(g.act.code()),
        ])
    }

    /// The pipelined kernel and its launch, when it applies: f16/bf16, chosen by
    /// [`GemmKernel`], K a multiple of 8 and 16-byte aligned operands (its copies move 16
    /// bytes of a row at a time). The big tile when there are enough of them to fill the GPU.
    fn pipelined_cfg(
        &self,
        x: KernelArg,
        g: &Gemm<'_, D::Buf>,
    ) -> Result<Option<(String, LaunchConfig)>> {
        let [m, n, k] = g.mnk;
        let aligned = |a: u64| a.is_multiple_of(16);
        let KernelArg::Ptr(xa) = x else {
            return Ok(None);
        };
        if self.dtype == DType::F32
            || self.gemm != GemmKernel::Pipelined
            || k % 8 != 0
            || !aligned(xa)
            || !aligned(self.dev.address(&g.w.buf))
        {
            return Ok(None);
        }
        let big = m.div_ceil(params::GEMM_PIPE_BIG_BM as usize)
            * n.div_ceil(params::GEMM_PIPE_BIG_BN as usize)
            >= params::GEMM_PIPE_BIG_MIN_TILES as usize;
        let (shape, bm, bn, threads) = if big {
            (
                "big",
                params::GEMM_PIPE_BIG_BM,
                params::GEMM_PIPE_BIG_BN,
                params::GEMM_PIPE_BIG_THREADS,
            )
        } else {
            (
                "small",
                params::GEMM_PIPE_SMALL_BM,
                params::GEMM_PIPE_SMALL_BN,
                params::GEMM_PIPE_SMALL_THREADS,
            )
        };
        // STAGES x (BM + BN) rows of BK + 8 halves (the padding of kernels/gemm.cu).
        let shared = params::GEMM_PIPE_STAGES * (bm + bn) * (params::GEMM_PIPE_BK + 8) * 2;
        let cfg = LaunchConfig {
            grid: [
                self.grid("GEMM row tiles", m.div_ceil(bm as usize))?,
                self.grid("GEMM column tiles", n.div_ceil(bn as usize))?,
                1,
            ],
            block: [threads, 1, 1],
            shared_bytes: shared,
        };
        Ok(Some((self.kernel(&format!("gemm_pipe_{shape}")), cfg)))
    }
}

/// The f16/bf16 GEMM kernel of a [`GpuBackend`] (f32 always runs the SIMT kernel).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum GemmKernel {
    /// One shared-memory stage loaded element by element, fragments read as words: written for
    /// clarity; the parity reference for the pipelined kernel and its fallback.
    Simple,
    /// `cp.async` copies into a 4-stage ring, `ldmatrix` fragments, 128 x 128 or 64 x 64 tiles
    /// (kernels/gemm.cu). Needs K % 8 == 0 and 16-byte aligned operands; other GEMMs run the
    /// simple kernel.
    Pipelined,
}

impl GemmKernel {
    /// `APPARATE_GPU_GEMM` = `simple` | `pipelined`; unset means pipelined. Another value is
    /// reported once on stderr and the default kept (a backend is made without a `Result`).
    pub fn from_env() -> GemmKernel {
        match std::env::var("APPARATE_GPU_GEMM") {
            Err(_) => GemmKernel::Pipelined,
            Ok(v) => v.parse().unwrap_or_else(|e| {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| eprintln!("warning: APPARATE_GPU_GEMM: {e}; using pipelined"));
                GemmKernel::Pipelined
            }),
        }
    }
}

impl std::str::FromStr for GemmKernel {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<GemmKernel, String> {
        match s {
            "simple" => Ok(GemmKernel::Simple),
            "pipelined" => Ok(GemmKernel::Pipelined),
            other => Err(format!("unknown GEMM kernel `{other}` (simple, pipelined)")),
        }
    }
}

/// The operands of one GEMM besides its input: weight [n, k], optional bias [n] and residual
/// [m, n], sizes, and the fused activation.
pub(super) struct Gemm<'a, B> {
    pub w: &'a GpuTensor<B>,
    pub b: Option<&'a GpuTensor<B>>,
    pub residual: Option<&'a GpuTensor<B>>,
    pub mnk: [usize; 3],
    pub act: Activation,
}

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
        let [m, n, k] = g.mnk;
        if m == 0 || n == 0 {
            return Ok(());
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
        self.launch(
            &self.kernel("gemm"),
            cfg,
            &[
                x,
                self.ptr(g.w)?,
                self.opt_ptr(g.b)?,
                self.opt_ptr(g.residual)?,
                self.ptr(y)?,
                self.u32("M", m)?,
                self.u32("N", n)?,
                self.u32("K", k)?,
                KernelArg::I32(g.act.code()),
            ],
        )
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

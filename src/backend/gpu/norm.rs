//! Launchers of `kernels/norm.cu`: residual add + LayerNorm (the row kept in shared memory)
//! and L2 normalisation, one block per row. (`launch_row_op` is in mod.rs, shared with
//! softmax.)

use super::{GpuBackend, GpuTensor};
use crate::backend::device::{Device, KernelArg};
use crate::backend::op_check::{self, LayerNormCall};
use crate::error::Result;

impl<D: Device> GpuBackend<D> {
    /// [`crate::backend::Backend::add_layernorm`] into an output allocated beforehand (`y`
    /// shaped like `x`), so a timed loop launches without allocating.
    pub fn add_layernorm_into(
        &self,
        x: &GpuTensor<D::Buf>,
        residual: &GpuTensor<D::Buf>,
        gamma: &GpuTensor<D::Buf>,
        beta: &GpuTensor<D::Buf>,
        eps: f32,
        y: &GpuTensor<D::Buf>,
    ) -> Result<()> {
        let c = op_check::add_layernorm(self, x, residual, gamma, beta, eps)?;
        self.check_out("add_layernorm", y, &x.shape)?;
        self.launch_add_layernorm(&c, y)
    }

    pub(super) fn launch_add_layernorm(
        &self,
        c: &LayerNormCall<'_, GpuTensor<D::Buf>>,
        y: &GpuTensor<D::Buf>,
    ) -> Result<()> {
        if c.rows == 0 {
            return Ok(());
        }
        let cfg = self.rows_cfg("rows", c.rows, self.row_shared("add_layernorm", c.cols)?)?;
        self.launch(
            &self.kernel("add_layernorm"),
            cfg,
            &[
                self.ptr(c.x)?,
                self.ptr(c.residual)?,
                self.ptr(c.gamma)?,
                self.ptr(c.beta)?,
                self.ptr(y)?,
                self.u32("cols", c.cols)?,
                KernelArg::F32(c.eps),
            ],
        )
    }
}

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
        let (x, res, gamma, beta, out) = (
            self.ptr(c.x)?,
            self.ptr(c.residual)?,
            self.ptr(c.gamma)?,
            self.ptr(c.beta)?,
            self.ptr(y)?,
        );
        let (cols, eps) = (self.u32("cols", c.cols)?, KernelArg::F32(c.eps));
        if self.warp_layernorm_fits(c, y) {
            let cfg = self.warp_rows_cfg("row blocks", c.rows)?;
            let rows = self.u32("rows", c.rows)?;
            let args = [x, res, gamma, beta, out, rows, cols, eps];
            return self.launch(&self.kernel("add_layernorm_warp"), cfg, &args);
        }
        let cfg = self.rows_cfg("rows", c.rows, self.row_shared("add_layernorm", c.cols)?)?;
        let args = [x, res, gamma, beta, out, cols, eps];
        self.launch(&self.kernel("add_layernorm"), cfg, &args)
    }

    /// Whether the warp-per-row kernel is chosen and takes this call: rows a whole number of
    /// 16-byte vectors, at most `LN_WARP_MAX_COLS` wide, every tensor 16-byte aligned.
    fn warp_layernorm_fits(
        &self,
        c: &LayerNormCall<'_, GpuTensor<D::Buf>>,
        y: &GpuTensor<D::Buf>,
    ) -> bool {
        self.warp_rows_fit(c.cols, [c.x, c.residual, c.gamma, c.beta, y].into_iter())
    }
}

/// The row kernel of a [`GpuBackend`]'s residual add + LayerNorm.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RowKernel {
    /// One block of `ROW_THREADS` per row, the row in shared memory: the reference.
    Block,
    /// One warp per row, the row in registers, 16-byte loads and stores; rows up to
    /// `LN_WARP_MAX_COLS` wide whose width is a multiple of 16 bytes (others run the block
    /// kernel). The default: on an H200 (docs/gpu-runs.md, run 6) 1.7x the block kernel's
    /// bandwidth in f16 at 65536 x 1024; level in the MiniLM forward. Residual + LayerNorm and
    /// the decoder's residual + RMSNorm (the latter compiled and emulated, not run on a GPU).
    Warp,
}

kernel_switch!(RowKernel, "APPARATE_GPU_ROWS", "row kernel", default Warp, {
    "block" => Block,
    "warp" => Warp,
});

//! Launcher of `kernels/rmsnorm.cu`: residual add + RMSNorm, one warp per row
//! ([`RowKernel::Warp`], where the row fits) or one block per row (the reference).

use super::{GpuBackend, GpuTensor};
use crate::backend::decoder::NormOut;
use crate::backend::device::{Device, KernelArg};
use crate::error::Result;

impl<D: Device> GpuBackend<D> {
    /// `h = x + residual` (into `h`, when a residual is given) and `y = rmsnorm(h) * gamma`.
    pub(super) fn launch_rms_norm(
        &self,
        x: &GpuTensor<D::Buf>,
        residual: Option<&GpuTensor<D::Buf>>,
        gamma: &GpuTensor<D::Buf>,
        eps: f32,
    ) -> Result<NormOut<GpuTensor<D::Buf>>> {
        let (rows, cols) = (x.shape[0], x.shape[1]);
        let h = match residual {
            Some(_) => Some(self.alloc(x.shape.clone())?),
            None => None,
        };
        let y = self.alloc(x.shape.clone())?;
        if rows == 0 {
            return Ok((h, y));
        }
        let (xp, rp, gp, hp, yp) = (
            self.ptr(x)?,
            self.opt_ptr(residual)?,
            self.ptr(gamma)?,
            self.opt_ptr(h.as_ref())?,
            self.ptr(&y)?,
        );
        let (c, e) = (self.u32("cols", cols)?, KernelArg::F32(eps));
        let tensors = [Some(x), residual, Some(gamma), h.as_ref(), Some(&y)];
        if self.warp_rows_fit(cols, tensors.iter().flatten().copied()) {
            let cfg = self.warp_rows_cfg("row blocks", rows)?;
            let r = self.u32("rows", rows)?;
            let args = [xp, rp, gp, hp, yp, r, c, e];
            self.launch(&self.kernel("rms_norm_warp"), cfg, &args)?;
            return Ok((h, y));
        }
        let cfg = self.rows_cfg("rows", rows, self.row_shared("rms_norm", cols)?)?;
        self.launch(&self.kernel("rms_norm"), cfg, &[xp, rp, gp, hp, yp, c, e])?;
        Ok((h, y))
    }
}

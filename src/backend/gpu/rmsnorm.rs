//! Launcher of `kernels/rmsnorm.cu`: residual add + RMSNorm, one block per row.

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
        let cfg = self.rows_cfg("rows", rows, self.row_shared("rms_norm", cols)?)?;
        self.launch(
            &self.kernel("rms_norm"),
            cfg,
            &[
                self.ptr(x)?,
                self.opt_ptr(residual)?,
                self.ptr(gamma)?,
                self.opt_ptr(h.as_ref())?,
                self.ptr(&y)?,
                self.u32("cols", cols)?,
                KernelArg::F32(eps),
            ],
        )?;
        Ok((h, y))
    }
}

//! Launcher of `kernels/rmsnorm.cu`: residual add + RMSNorm, one warp per row
//! ([`RowKernel::Warp`], where the row fits) or one block per row (the reference).

use super::{GpuBackend, GpuTensor};
use crate::backend::decoder::{NormOut, check_rms_norm};
use crate::backend::device::{Device, KernelArg};
use crate::error::{Error, Result};

impl<D: Device> GpuBackend<D> {
    /// `h = x + residual` (into `h`, when a residual is given) and `y = rmsnorm(h) * gamma`.
    pub(super) fn launch_rms_norm(
        &self,
        x: &GpuTensor<D::Buf>,
        residual: Option<&GpuTensor<D::Buf>>,
        gamma: &GpuTensor<D::Buf>,
        eps: f32,
    ) -> Result<NormOut<GpuTensor<D::Buf>>> {
        let h = match residual {
            Some(_) => Some(self.alloc(x.shape.clone())?),
            None => None,
        };
        let y = self.alloc(x.shape.clone())?;
        self.launch_rms_norm_into(x, residual, gamma, eps, h.as_ref(), &y)?;
        Ok((h, y))
    }

    /// [`crate::backend::DecoderBackend::rms_norm`] into outputs allocated beforehand (`h`
    /// when a residual is given, and `y`, both shaped like `x`), so a timed loop launches
    /// without allocating.
    pub fn rms_norm_into(
        &self,
        x: &GpuTensor<D::Buf>,
        residual: Option<&GpuTensor<D::Buf>>,
        gamma: &GpuTensor<D::Buf>,
        eps: f32,
        h: Option<&GpuTensor<D::Buf>>,
        y: &GpuTensor<D::Buf>,
    ) -> Result<()> {
        check_rms_norm(self, x, residual, gamma, eps)?;
        match (residual, h) {
            (Some(_), Some(h)) => self.check_out("rms_norm", h, &x.shape)?,
            (None, None) => {}
            _ => {
                return Err(Error::shape(
                    "rms_norm",
                    "residual sum output",
                    "one exactly when a residual is given",
                    if h.is_some() {
                        "one without a residual"
                    } else {
                        "none"
                    },
                ));
            }
        }
        self.check_out("rms_norm", y, &x.shape)?;
        self.launch_rms_norm_into(x, residual, gamma, eps, h, y)
    }

    fn launch_rms_norm_into(
        &self,
        x: &GpuTensor<D::Buf>,
        residual: Option<&GpuTensor<D::Buf>>,
        gamma: &GpuTensor<D::Buf>,
        eps: f32,
        h: Option<&GpuTensor<D::Buf>>,
        y: &GpuTensor<D::Buf>,
    ) -> Result<()> {
        let (rows, cols) = (x.shape[0], x.shape[1]);
        if rows == 0 {
            return Ok(());
        }
        let (xp, rp, gp, hp, yp) = (
            self.ptr(x)?,
            self.opt_ptr(residual)?,
            self.ptr(gamma)?,
            self.opt_ptr(h)?,
            self.ptr(y)?,
        );
        let (c, e) = (self.u32("cols", cols)?, KernelArg::F32(eps));
        let tensors = [Some(x), residual, Some(gamma), h, Some(y)];
        if self.warp_rows_fit(cols, tensors.iter().flatten().copied()) {
            let cfg = self.warp_rows_cfg("row blocks", rows)?;
            let r = self.u32("rows", rows)?;
            let args = [xp, rp, gp, hp, yp, r, c, e];
            return self.launch(&self.kernel("rms_norm_warp"), cfg, &args);
        }
        let cfg = self.rows_cfg("rows", rows, self.row_shared("rms_norm", cols)?)?;
        self.launch(&self.kernel("rms_norm"), cfg, &[xp, rp, gp, hp, yp, c, e])
    }
}

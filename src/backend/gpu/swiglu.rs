//! Launcher of `kernels/swiglu.cu`: `silu(gate) * up`, one thread per output.

use super::{GpuBackend, GpuTensor};
use crate::backend::device::Device;
use crate::error::Result;

impl<D: Device> GpuBackend<D> {
    pub(super) fn launch_silu_mul(&self, x: &GpuTensor<D::Buf>) -> Result<GpuTensor<D::Buf>> {
        let (m, f) = (x.shape[0], x.shape[1] / 2);
        let y = self.alloc(vec![m, f])?;
        self.launch(
            &self.kernel("silu_mul"),
            self.elementwise_cfg(m * f),
            &[
                self.ptr(x)?,
                self.ptr(&y)?,
                self.u32("rows", m)?,
                self.u32("f", f)?,
            ],
        )?;
        Ok(y)
    }
}

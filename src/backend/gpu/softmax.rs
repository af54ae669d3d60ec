//! Launcher of `kernels/softmax.cu`: row softmax, one block per row.

use super::{GpuBackend, GpuTensor};
use crate::backend::device::Device;
use crate::backend::op_check;
use crate::error::Result;

impl<D: Device> GpuBackend<D> {
    /// [`crate::backend::Backend::softmax`] into an output allocated beforehand (`y` shaped
    /// like `x`), so a timed loop launches without allocating.
    pub fn softmax_into(&self, x: &GpuTensor<D::Buf>, y: &GpuTensor<D::Buf>) -> Result<()> {
        let c = op_check::rows(self, "softmax", x)?;
        self.check_out("softmax", y, &x.shape)?;
        self.launch_row_op("softmax", &c, y)
    }
}

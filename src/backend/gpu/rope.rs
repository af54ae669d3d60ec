//! Launcher of `kernels/rope.cu`: rotary embeddings in place, one thread per rotated pair.

use super::decoder::GpuPlan;
use super::{GpuBackend, GpuTensor};
use crate::backend::device::{Device, KernelArg};
use crate::error::Result;

impl<D: Device> GpuBackend<D> {
    pub(super) fn launch_rope(
        &self,
        x: &GpuTensor<D::Buf>,
        plan: &GpuPlan<D::Buf>,
        heads: usize,
        head_dim: usize,
        base: f32,
    ) -> Result<()> {
        let (rows, cols) = (x.shape[0], x.shape[1]);
        self.launch(
            &self.kernel("rope"),
            self.elementwise_cfg(rows * heads * head_dim / 2),
            &[
                self.ptr(x)?,
                KernelArg::Ptr(self.dev.address(&plan.positions)),
                self.u32("rows", rows)?,
                self.u32("cols", cols)?,
                self.u32("heads", heads)?,
                self.u32("head_dim", head_dim)?,
                KernelArg::F32(base),
            ],
        )
    }
}

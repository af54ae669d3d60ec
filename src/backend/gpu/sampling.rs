//! Launcher of `kernels/sampling.cu`: greedy sampling (argmax of each row), one block per row;
//! only the ids come back to the host.

use super::{GpuBackend, GpuTensor, params};
use crate::backend::device::{Device, LaunchConfig};
use crate::error::Result;

impl<D: Device> GpuBackend<D> {
    pub(super) fn launch_argmax(&self, x: &GpuTensor<D::Buf>) -> Result<Vec<u32>> {
        let (rows, cols) = (x.shape[0], x.shape[1]);
        let out = self.dev.alloc(rows * 4)?;
        self.launch(
            &self.kernel("argmax"),
            LaunchConfig::linear(self.grid("rows", rows)?, params::ROW_THREADS, 0),
            &[
                self.ptr(x)?,
                crate::backend::device::KernelArg::Ptr(self.dev.address(&out)),
                self.u32("cols", cols)?,
            ],
        )?;
        self.dev.synchronize()?;
        let mut bytes = vec![0u8; rows * 4];
        self.dev.download(&out, &mut bytes)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}

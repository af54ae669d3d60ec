//! Launcher of `kernels/attention.cu`: fused QK^T, mask, softmax and PV; one warp per query
//! row, `ATTN_WARPS` rows per block, the scores of each row in shared memory.

use super::{GpuBackend, GpuTensor, params};
use crate::backend::device::{Device, KernelArg, LaunchConfig};
use crate::backend::op_check::AttentionCall;
use crate::error::Result;

impl<D: Device> GpuBackend<D> {
    pub(super) fn launch_attention(
        &self,
        c: AttentionCall<'_, GpuTensor<D::Buf>>,
    ) -> Result<GpuTensor<D::Buf>> {
        let out = self.alloc(vec![c.rows, c.width])?;
        if c.rows == 0 {
            return Ok(out);
        }
        let warps = params::ATTN_WARPS as usize;
        let seq = c.shape.seq;
        let smem = self.shared_bytes("attention", warps.saturating_mul(seq), || {
            format!("attention over {seq} positions")
        })?;
        let lengths = self.ints("length", c.shape.lengths.iter().copied())?;
        let cfg = LaunchConfig {
            grid: [
                self.grid("inputs x heads", c.shape.batch() * c.heads)?,
                self.grid("query blocks", seq.div_ceil(warps))?,
                1,
            ],
            block: [params::ATTN_WARPS * 32, 1, 1],
            shared_bytes: smem,
        };
        self.launch(
            &self.kernel("attention"),
            cfg,
            &[
                self.ptr(c.qkv)?,
                KernelArg::Ptr(self.dev.address(&lengths)),
                self.ptr(&out)?,
                self.u32("seq", seq)?,
                self.u32("width", c.width)?,
                self.u32("heads", c.heads)?,
                KernelArg::F32(1.0 / ((c.width / c.heads) as f32).sqrt()),
            ],
        )?;
        Ok(out)
    }
}

//! Launcher of `kernels/embedding.cu`: word + position + token-type lookup and LayerNorm, one
//! block per token. The ids were checked against the tables by `op_check::embed`.

use super::GpuBackend;
use super::GpuTensor;
use crate::backend::device::{Device, KernelArg};
use crate::backend::op_check::EmbedCall;
use crate::error::Result;

impl<D: Device> GpuBackend<D> {
    pub(super) fn launch_embed(
        &self,
        c: EmbedCall<'_, GpuTensor<D::Buf>>,
    ) -> Result<GpuTensor<D::Buf>> {
        let rows = c.shape.rows();
        let out = self.alloc(vec![rows, c.width])?;
        if rows == 0 {
            return Ok(out);
        }
        let ids = self.ints("token id", c.ids.iter().map(|&i| i as usize))?;
        let types = self.ints("token type id", c.type_ids.iter().map(|&i| i as usize))?;
        let cfg = self.rows_cfg("tokens", rows, self.row_shared("embed", c.width)?)?;
        let t = &c.tables;
        self.launch(
            &self.kernel("embed"),
            cfg,
            &[
                KernelArg::Ptr(self.dev.address(&ids)),
                KernelArg::Ptr(self.dev.address(&types)),
                self.ptr(t.word)?,
                self.ptr(t.position)?,
                self.ptr(t.token_type)?,
                self.ptr(t.gamma)?,
                self.ptr(t.beta)?,
                self.ptr(&out)?,
                self.u32("seq", c.shape.seq)?,
                self.u32("width", c.width)?,
                KernelArg::F32(c.eps),
            ],
        )?;
        Ok(out)
    }
}

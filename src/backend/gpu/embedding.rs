//! Launcher of `kernels/embedding.cu`: word + position + token-type lookup and LayerNorm, one
//! warp per token ([`super::RowKernel::Warp`], where the width fits) or one block per token.
//! The ids were checked against the tables by `op_check::embed`.

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
        let t = &c.tables;
        let tables = [t.word, t.position, t.token_type, t.gamma, t.beta];
        let mut args = vec![
            KernelArg::Ptr(self.dev.address(&ids)),
            KernelArg::Ptr(self.dev.address(&types)),
        ];
        for table in tables {
            args.push(self.ptr(table)?);
        }
        args.push(self.ptr(&out)?);
        let (seq, width) = (self.u32("seq", c.shape.seq)?, self.u32("width", c.width)?);
        // Every table row starts 16-byte aligned when the tables do and the width is a whole
        // number of 16-byte vectors (what `warp_rows_fit` checks).
        if self.warp_rows_fit(c.width, tables.into_iter().chain([&out])) {
            args.extend([self.u32("tokens", rows)?, seq, width, KernelArg::F32(c.eps)]);
            let cfg = self.warp_rows_cfg("token blocks", rows)?;
            self.launch(&self.kernel("embed_warp"), cfg, &args)?;
        } else {
            args.extend([seq, width, KernelArg::F32(c.eps)]);
            let cfg = self.rows_cfg("tokens", rows, self.row_shared("embed", c.width)?)?;
            self.launch(&self.kernel("embed"), cfg, &args)?;
        }
        Ok(out)
    }
}

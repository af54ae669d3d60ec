//! Launchers of `kernels/pool.cu`: token pooling (vectorised, a block per input and 32 column
//! vectors, with [`RowKernel::Warp`] where the width fits; else one block per input), 2-D
//! windows and global average pooling over NHWC (grid-stride).

use super::{GpuBackend, GpuTensor, RowKernel, params};
use crate::backend::Pooling;
use crate::backend::device::{Device, KernelArg, LaunchConfig};
use crate::backend::op_check::{GlobalPoolCall, Pool2dCall, PoolCall};
use crate::error::Result;

/// The kernels' code for a pooling mode (`POOL_*` in params.cuh).
pub(super) fn pooling_code(kind: Pooling) -> i32 {
    let code = match kind {
        Pooling::Mean => params::POOL_MEAN,
        Pooling::Cls => params::POOL_CLS,
    };
    code as i32
}

impl<D: Device> GpuBackend<D> {
    pub(super) fn launch_pool(
        &self,
        c: PoolCall<'_, GpuTensor<D::Buf>>,
    ) -> Result<GpuTensor<D::Buf>> {
        let batch = c.shape.batch();
        let out = self.alloc(vec![batch, c.cols])?;
        if batch == 0 {
            return Ok(out);
        }
        let lengths = self.ints("length", c.shape.lengths.iter().copied())?;
        let mut args = vec![
            self.ptr(c.x)?,
            KernelArg::Ptr(self.dev.address(&lengths)),
            self.ptr(&out)?,
            self.u32("seq", c.shape.seq)?,
            self.u32("width", c.cols)?,
            KernelArg::I32(pooling_code(c.kind)),
        ];
        if self.vec_pool_fits(c.cols, [c.x, &out]) {
            // A block per (input, 32 vectors of columns).
            let chunks = (c.cols / (16 / self.dtype.size())).div_ceil(32);
            args.push(self.u32("column chunks", chunks)?);
            let blocks = self.grid("pool blocks", batch * chunks)?;
            let cfg = LaunchConfig::linear(blocks, params::POOL_WARPS * 32, 0);
            self.launch(&self.kernel("pool_warp"), cfg, &args)?;
        } else {
            self.launch(
                &self.kernel("pool"),
                self.rows_cfg("inputs", batch, 0)?,
                &args,
            )?;
        }
        Ok(out)
    }

    /// Whether the vectorised token pooling is chosen and takes rows of `cols` values in these
    /// tensors: rows a whole number of 16-byte vectors (any width: it tiles the columns),
    /// tensors 16-byte aligned.
    fn vec_pool_fits(&self, cols: usize, tensors: [&GpuTensor<D::Buf>; 2]) -> bool {
        self.rows == RowKernel::Warp
            && cols.is_multiple_of(16 / self.dtype.size())
            && tensors
                .iter()
                .all(|t| self.dev.address(&t.buf).is_multiple_of(16))
    }

    pub(super) fn launch_pool2d(
        &self,
        c: Pool2dCall<'_, GpuTensor<D::Buf>>,
    ) -> Result<GpuTensor<D::Buf>> {
        let d = c.dims;
        let y = self.alloc(vec![d.n, d.oh, d.ow, d.c])?;
        let total = d.n * d.oh * d.ow * d.c;
        if total == 0 {
            return Ok(y);
        }
        let p = c.p;
        let sizes = [
            ("n", d.n),
            ("h", d.h),
            ("w", d.w),
            ("c", d.c),
            ("oh", d.oh),
            ("ow", d.ow),
            ("kernel height", p.kernel[0]),
            ("kernel width", p.kernel[1]),
            ("stride", p.stride[0]),
            ("stride", p.stride[1]),
            ("padding", p.padding[0]),
            ("padding", p.padding[1]),
        ];
        let mut args = vec![self.ptr(c.x)?, self.ptr(&y)?];
        for (what, v) in sizes {
            args.push(self.u32(what, v)?);
        }
        args.push(KernelArg::I32(i32::from(p.max)));
        self.launch(&self.kernel("pool2d"), self.elementwise_cfg(total), &args)?;
        Ok(y)
    }

    pub(super) fn launch_global_avg_pool(
        &self,
        c: GlobalPoolCall<'_, GpuTensor<D::Buf>>,
    ) -> Result<GpuTensor<D::Buf>> {
        let y = self.alloc(vec![c.n, c.c])?;
        if c.n * c.c == 0 || c.hw == 0 {
            return Ok(y);
        }
        self.launch(
            &self.kernel("global_avg_pool"),
            self.elementwise_cfg(c.n * c.c),
            &[
                self.ptr(c.x)?,
                self.ptr(&y)?,
                self.u32("n", c.n)?,
                self.u32("hw", c.hw)?,
                self.u32("c", c.c)?,
            ],
        )?;
        Ok(y)
    }
}

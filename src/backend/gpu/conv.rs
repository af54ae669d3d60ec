//! Launchers of `kernels/conv.cu`: a dense convolution is a GEMM (gemm.rs), directly for 1x1
//! stride-1 unpadded kernels and after `im2col` otherwise; a grouped one (depthwise included)
//! runs `conv_grouped`, one thread per output element.

use super::gemm::Gemm;
use super::{GpuBackend, GpuTensor};
use crate::backend::device::{Device, KernelArg};
use crate::backend::op_check::ConvCall;
use crate::error::Result;

impl<D: Device> GpuBackend<D> {
    pub(super) fn launch_conv2d(
        &self,
        c: ConvCall<'_, GpuTensor<D::Buf>>,
    ) -> Result<GpuTensor<D::Buf>> {
        let d = c.dims;
        let p = c.p;
        let y = self.alloc(vec![d.n, d.oh, d.ow, d.cout])?;
        let m = d.n * d.oh * d.ow;
        if m == 0 || d.cout == 0 {
            return Ok(y);
        }
        // The order of the kernels' (n, h, w, cin[, cout], kh, kw, oh, ow, sh, sw, ph, pw).
        let geometry = [
            self.u32("n", d.n)?,
            self.u32("h", d.h)?,
            self.u32("w", d.w)?,
            self.u32("cin", d.cin)?,
        ];
        let window = [
            self.u32("kh", d.kh)?,
            self.u32("kw", d.kw)?,
            self.u32("oh", d.oh)?,
            self.u32("ow", d.ow)?,
            self.u32("stride", p.stride[0])?,
            self.u32("stride", p.stride[1])?,
            self.u32("padding", p.padding[0])?,
            self.u32("padding", p.padding[1])?,
        ];
        if p.groups == 1 {
            let k = d.kh * d.kw * d.cin;
            let gemm = Gemm {
                w: c.w,
                b: c.b,
                residual: c.residual,
                mnk: [m, d.cout, k],
                act: c.act,
            };
            if d.is_pointwise(&p) {
                self.launch_gemm(self.ptr(c.x)?, &gemm, &y)?;
            } else {
                let cols = self.dev.alloc(m * k * self.dtype.size())?;
                let cols_arg = KernelArg::Ptr(self.dev.address(&cols));
                let mut args = vec![self.ptr(c.x)?, cols_arg];
                args.extend(geometry);
                args.extend(window);
                self.launch(&self.kernel("im2col"), self.elementwise_cfg(m * k), &args)?;
                self.launch_gemm(cols_arg, &gemm, &y)?;
            }
            return Ok(y);
        }
        let mut args = vec![
            self.ptr(c.x)?,
            self.ptr(c.w)?,
            self.opt_ptr(c.b)?,
            self.opt_ptr(c.residual)?,
            self.ptr(&y)?,
        ];
        args.extend(geometry);
        args.push(self.u32("cout", d.cout)?);
        args.extend(window);
        args.push(self.u32("groups", p.groups)?);
        args.push(KernelArg::I32(c.act.code()));
        self.launch(
            &self.kernel("conv_grouped"),
            self.elementwise_cfg(m * d.cout),
            &args,
        )?;
        Ok(y)
    }
}

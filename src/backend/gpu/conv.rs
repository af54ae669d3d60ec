//! Launchers of `kernels/conv.cu`: a dense convolution is a GEMM (gemm.rs), directly for 1x1
//! stride-1 unpadded kernels; otherwise, in f16/bf16 with 8-channel multiples, the pipelined
//! GEMM gathering its A operand from the input (`conv_pipe_*`, [`ConvKernel::Implicit`]), else
//! after `im2col` (the fast one, 16-byte units and precomputed division, with
//! [`RowKernel::Warp`]); a grouped one (depthwise included) runs `conv_grouped`, one thread per
//! output element.

use super::gemm::{Gemm, GemmKernel};
use super::{GpuBackend, GpuTensor, RowKernel, elementwise};
use crate::backend::device::{Device, KernelArg};
use crate::backend::op_check::ConvCall;
use crate::error::Result;
use crate::tensor::DType;

/// How a [`GpuBackend`] runs a dense f16/bf16 convolution that is not a plain GEMM over its
/// input (a kernel larger than 1x1, a stride, or padding).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ConvKernel {
    /// `im2col` into a buffer of (output pixels) x (kh kw cin) values, then the GEMM: the
    /// reference, and the path of every convolution the implicit GEMM does not take.
    Im2col,
    /// The pipelined GEMM with its A tiles gathered from the input as its `cp.async` copies go
    /// (`conv_pipe_*`: an implicit GEMM, no buffer, which for a 3x3 convolution is 9 times
    /// the input, written once and read once). Needs cin a multiple of 8, 16-byte aligned
    /// input and weights, and the pipelined GEMM as the GEMM kernel: with
    /// [`GemmKernel::Simple`], or a Hopper GEMM on a device with wgmma, im2col runs. The
    /// default: its instructions are the pipelined GEMM's (measured on an H200, run 6) and
    /// only the addresses differ, which the emulated device checks exactly; compiled and
    /// emulated, not run on a GPU.
    Implicit,
}

kernel_switch!(ConvKernel, "APPARATE_GPU_CONV", "convolution kernel", default Implicit, {
    "im2col" => Im2col,
    "implicit" => Implicit,
});

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
            } else if self.implicit_conv_applies(&c) {
                let mut extra = vec![geometry[1], geometry[2]];
                for (what, v) in [("cin", d.cin), ("kw", d.kw), ("ow", d.ow), ("oh", d.oh)] {
                    extra.extend(self.fast_div_args(what, v)?);
                }
                extra.extend(&window[4..]);
                let launch = self.pipe_cfg("conv_pipe", gemm.mnk)?;
                self.launch_pipelined(self.ptr(c.x)?, &gemm, &y, launch, &extra)?;
            } else {
                let cols = self.dev.alloc(m * k * self.dtype.size())?;
                let cols_arg = KernelArg::Ptr(self.dev.address(&cols));
                if !self.launch_im2col_fast(&c, &cols)? {
                    let mut args = vec![self.ptr(c.x)?, cols_arg];
                    args.extend(geometry);
                    args.extend(window);
                    self.launch(&self.kernel("im2col"), self.elementwise_cfg(m * k), &args)?;
                }
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

    /// Whether [`ConvKernel::Implicit`] runs this dense convolution (see there).
    fn implicit_conv_applies(&self, c: &ConvCall<'_, GpuTensor<D::Buf>>) -> bool {
        let pipelined = match self.gemm {
            GemmKernel::Simple => false,
            GemmKernel::Pipelined | GemmKernel::PipelinedSplitK => true,
            GemmKernel::Wgmma | GemmKernel::WgmmaWs | GemmKernel::WgmmaTma => !self.dev.has_wgmma(),
        };
        self.conv == ConvKernel::Implicit
            && pipelined
            && self.dtype != DType::F32
            && c.dims.cin.is_multiple_of(8)
            && self.dev.address(&c.x.buf).is_multiple_of(16)
            && self.dev.address(&c.w.buf).is_multiple_of(16)
    }

    /// The (d, mul, l) arguments of a `FAST_DIV` parameter: a divisor of at least 1 that fits
    /// 32 bits.
    fn fast_div_args(&self, what: &str, v: usize) -> Result<[KernelArg; 3]> {
        let d = u32::try_from(v)
            .map_err(|_| self.size_error(what, v, "does not fit the kernels' 32-bit sizes"))?;
        let f = FastDiv::new(d).ok_or_else(|| self.size_error(what, v, "must be at least 1"))?;
        Ok([
            KernelArg::U32(f.d),
            KernelArg::U32(f.mul),
            KernelArg::U32(f.l),
        ])
    }

    /// `im2col` by the fast kernel (`im2col_vec16` when a pixel's channels are whole 16-byte
    /// vectors and both tensors are 16-byte aligned, else `im2col_fast_<dtype>` element by
    /// element), where [`RowKernel::Warp`] is chosen and the units fit its 32-bit indices.
    /// `false`: not launched, the caller runs the reference kernel.
    fn launch_im2col_fast(
        &self,
        c: &ConvCall<'_, GpuTensor<D::Buf>>,
        cols: &D::Buf,
    ) -> Result<bool> {
        let (d, p) = (c.dims, c.p);
        if self.rows != RowKernel::Warp {
            return Ok(false);
        }
        let size = self.dtype.size();
        let aligned = self.dev.address(&c.x.buf).is_multiple_of(16)
            && self.dev.address(cols).is_multiple_of(16);
        let vec = aligned && (d.cin * size).is_multiple_of(16);
        let cu = if vec { d.cin * size / 16 } else { d.cin };
        let taps = d.kh * d.kw;
        let units = (d.n * d.oh * d.ow).checked_mul(taps * cu);
        // The grid-stride index must not wrap past 2^32 on its last step.
        let limit = u32::MAX as usize - elementwise::max_grid_threads();
        let Some(units) = units.filter(|&u| u > 0 && u <= limit) else {
            return Ok(false);
        };
        let mut args = vec![
            self.ptr(c.x)?,
            KernelArg::Ptr(self.dev.address(cols)),
            self.u32("units", units)?,
            self.u32("h", d.h)?,
            self.u32("w", d.w)?,
        ];
        // Each divisor is a factor of `units` (kw of taps), so it fits 32 bits and is >= 1.
        for (what, v) in [
            ("cin units", cu),
            ("taps", taps),
            ("kw", d.kw),
            ("ow", d.ow),
            ("oh", d.oh),
        ] {
            args.extend(self.fast_div_args(what, v)?);
        }
        for (what, v) in [
            ("stride", p.stride[0]),
            ("stride", p.stride[1]),
            ("padding", p.padding[0]),
            ("padding", p.padding[1]),
        ] {
            args.push(self.u32(what, v)?);
        }
        let kernel = if vec {
            "im2col_vec16".to_string()
        } else {
            self.kernel("im2col_fast")
        };
        self.launch(&kernel, self.elementwise_cfg(units), &args)?;
        Ok(true)
    }
}

/// The constants of `fast_div` (kernels/common/apparate.cuh) for a divisor `d`: n / d =
/// (t + ((n - t) >> min(l, 1))) >> max(l - 1, 0) with t = (n * mul) >> 32, for every 32-bit n
/// (Granlund and Montgomery 1994, figure 4.1).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) struct FastDiv {
    pub d: u32,
    pub mul: u32,
    /// ceil(log2 d)
    pub l: u32,
}

impl FastDiv {
    /// `None` for d = 0.
    pub fn new(d: u32) -> Option<FastDiv> {
        if d == 0 {
            return None;
        }
        let l = 32 - (d - 1).leading_zeros();
        let mul = ((1u128 << 32) * ((1u128 << l) - d as u128) / d as u128 + 1) as u32;
        Some(FastDiv { d, mul, l })
    }

    /// n / d as the kernel computes it.
    #[cfg(test)]
    pub fn div(&self, n: u32) -> u32 {
        let t = ((n as u64 * self.mul as u64) >> 32) as u32;
        let (sh1, sh2) = (self.l.min(1), self.l.saturating_sub(1));
        (t + ((n - t) >> sh1)) >> sh2
    }
}

#[cfg(test)]
mod tests {
    use super::FastDiv;
    use proptest::prelude::*;

    #[test]
    fn fast_division_at_the_edges() {
        assert_eq!(FastDiv::new(0), None);
        let divisors = [
            1,
            2,
            3,
            5,
            7,
            9,
            49,
            147,
            641,
            1 << 16,
            (1 << 31) - 1,
            1 << 31,
            (1 << 31) + 1,
            u32::MAX - 1,
            u32::MAX,
        ];
        for d in divisors {
            let f = FastDiv::new(d).unwrap();
            let mut ns = vec![0, 1, 2, u32::MAX, u32::MAX - 1, d - 1, d, d.wrapping_add(1)];
            for q in [2u64, 3, 1000, (u32::MAX / d) as u64] {
                let n = q * d as u64;
                if n <= u32::MAX as u64 {
                    ns.extend([n as u32, (n - 1) as u32]);
                    if n < u32::MAX as u64 {
                        ns.push(n as u32 + 1);
                    }
                }
            }
            for n in ns {
                assert_eq!(f.div(n), n / d, "{n} / {d}");
            }
        }
    }

    proptest! {
        #[test]
        fn fast_division_matches_division(n: u32, d in 1u32..) {
            prop_assert_eq!(FastDiv::new(d).unwrap().div(n), n / d);
        }

        #[test]
        fn fast_division_by_small_divisors(n: u32, d in 1u32..4096) {
            prop_assert_eq!(FastDiv::new(d).unwrap().div(n), n / d);
        }
    }
}

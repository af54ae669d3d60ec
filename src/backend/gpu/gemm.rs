//! Launcher of `kernels/gemm.cu`: `y = act(x W^T + b + residual)`, for `linear` and for the
//! convolutions that are GEMMs (1x1, or after im2col).

use super::{GpuBackend, GpuTensor, params};
use crate::backend::Activation;
use crate::backend::device::{Device, KernelArg, LaunchConfig};
use crate::backend::op_check::{self, LinearCall};
use crate::error::Result;
use crate::tensor::DType;

impl<D: Device> GpuBackend<D> {
    /// [`Backend::linear`] into an output allocated beforehand (`y` shaped like the result), so
    /// a timed loop launches without allocating.
    pub fn linear_into(
        &self,
        x: &GpuTensor<D::Buf>,
        w: &GpuTensor<D::Buf>,
        b: Option<&GpuTensor<D::Buf>>,
        act: Activation,
        y: &GpuTensor<D::Buf>,
    ) -> Result<()> {
        let c = op_check::linear(self, x, w, b, act)?;
        self.check_out("linear", y, &c.out_shape)?;
        self.launch_linear(&c, y)
    }

    pub(super) fn launch_linear(
        &self,
        c: &LinearCall<'_, GpuTensor<D::Buf>>,
        y: &GpuTensor<D::Buf>,
    ) -> Result<()> {
        let gemm = Gemm {
            w: c.w,
            b: c.b,
            residual: None,
            mnk: [c.m, c.n, c.k],
            act: c.act,
        };
        self.launch_gemm(self.ptr(c.x)?, &gemm, y)
    }

    /// `y = act(x W^T + b + residual)` through the GEMM kernels; `x` is an address (a tensor
    /// or an im2col buffer) of [m, k] values of this backend's dtype.
    pub(super) fn launch_gemm(
        &self,
        x: KernelArg,
        g: &Gemm<'_, D::Buf>,
        y: &GpuTensor<D::Buf>,
    ) -> Result<()> {
        let [m, n, _] = g.mnk;
        if m == 0 || n == 0 {
            return Ok(());
        }
        if self.tma_applies(x, g) {
            return self.launch_tma(x, g, y);
        }
        if let Some(p) = self.pipelined_cfg(x, g)? {
            return self.launch_pipelined(x, g, y, p, &[]);
        }
        let threads = if self.dtype == DType::F32 {
            params::GEMM_SIMT_THREADS
        } else {
            params::GEMM_TC_THREADS
        };
        let cfg = LaunchConfig {
            grid: [
                self.grid("GEMM row tiles", m.div_ceil(params::GEMM_BM as usize))?,
                self.grid("GEMM column tiles", n.div_ceil(params::GEMM_BN as usize))?,
                1,
            ],
            block: [threads, 1, 1],
            shared_bytes: 0,
        };
        self.launch(&self.kernel("gemm"), cfg, &self.gemm_args(x, g, y)?)
    }

    /// Every GEMM kernel's arguments: (x, w, bias, residual, y, M, N, K, act).
    pub(super) fn gemm_args(
        &self,
        x: KernelArg,
        g: &Gemm<'_, D::Buf>,
        y: &GpuTensor<D::Buf>,
    ) -> Result<[KernelArg; 9]> {
        let [m, n, k] = g.mnk;
        Ok([
            x,
            self.ptr(g.w)?,
            self.opt_ptr(g.b)?,
            self.opt_ptr(g.residual)?,
            self.ptr(y)?,
            self.u32("M", m)?,
            self.u32("N", n)?,
            self.u32("K", k)?,
            KernelArg::I32(g.act.code()),
        ])
    }

    /// The pipelined kernel, then (split-K) the reduction of its partial sums. `extra`: the
    /// arguments a kernel of the family takes after the GEMM's (a convolution's geometry).
    pub(super) fn launch_pipelined(
        &self,
        x: KernelArg,
        g: &Gemm<'_, D::Buf>,
        y: &GpuTensor<D::Buf>,
        p: Pipelined,
        extra: &[KernelArg],
    ) -> Result<()> {
        let [m, n, _] = g.mnk;
        let args = self.gemm_args(x, g, y)?;
        if p.splits == 1 {
            let tail = [KernelArg::Ptr(0), KernelArg::U32(0)];
            return self.launch(&p.kernel, p.cfg, &[&args[..], &tail[..], extra].concat());
        }
        // f32 partial sums: splits x M x N (the pool keeps the memory between calls on CUDA).
        let partial = self.dev.alloc(p.splits * m * n * 4)?;
        let tail = [
            KernelArg::Ptr(self.dev.address(&partial)),
            self.u32("k-steps per split", p.per_split)?,
        ];
        self.launch(&p.kernel, p.cfg, &[&args[..], &tail[..], extra].concat())?;
        self.reduce_splits(&partial, p.splits, &args)
    }

    /// The second half of a split-K GEMM: `y = act(sum of the splits + bias + residual)`;
    /// `args` are the GEMM's ([`Self::gemm_args`]).
    pub(super) fn reduce_splits(
        &self,
        partial: &D::Buf,
        splits: usize,
        args: &[KernelArg; 9],
    ) -> Result<()> {
        let (m, n) = match (args[5], args[6]) {
            (KernelArg::U32(m), KernelArg::U32(n)) => (m as usize, n as usize),
            _ => unreachable!("gemm_args puts M and N at 5 and 6"),
        };
        self.launch(
            &self.kernel("gemm_splitk_reduce"),
            self.elementwise_cfg(m * n),
            &[
                KernelArg::Ptr(self.dev.address(partial)),
                self.u32("splits", splits)?,
                args[2], // bias
                args[3], // residual
                args[4], // y
                args[5], // M
                args[6], // N
                args[8], // activation
            ],
        )
    }

    /// The pipelined kernel and its launch, when it applies: f16/bf16, chosen by
    /// [`GemmKernel`], K a multiple of 8 and 16-byte aligned operands (its copies move 16
    /// bytes of a row at a time). The big tile when there are enough of them to fill the GPU;
    /// with [`GemmKernel::PipelinedSplitK`], K split when the small tiles do not.
    fn pipelined_cfg(&self, x: KernelArg, g: &Gemm<'_, D::Buf>) -> Result<Option<Pipelined>> {
        let k = g.mnk[2];
        let aligned = |a: u64| a.is_multiple_of(16);
        let KernelArg::Ptr(xa) = x else {
            return Ok(None);
        };
        if self.dtype == DType::F32
            || self.gemm == GemmKernel::Simple
            || k % 8 != 0
            || !aligned(xa)
            || !aligned(self.dev.address(&g.w.buf))
        {
            return Ok(None);
        }
        if matches!(self.gemm, GemmKernel::Wgmma | GemmKernel::WgmmaWs) && self.dev.has_wgmma() {
            return Ok(Some(self.wgmma_cfg(g.mnk, self.gemm_fill)?));
        }
        self.pipe_cfg("gemm_pipe", g.mnk).map(Some)
    }

    /// The launch of the pipelined kernel family `family` (`gemm_pipe`, `conv_pipe`) for an
    /// M x N x K product: its big tile (in the warp layout of [`PipeTile`]) when there are
    /// enough of them to fill the GPU, else its
    /// small one, with K split (the kernels other than [`GemmKernel::Pipelined`]) when the
    /// small tiles do not fill it either.
    pub(super) fn pipe_cfg(&self, family: &str, [m, n, k]: [usize; 3]) -> Result<Pipelined> {
        let min_tiles = self.gemm_fill;
        let big = m.div_ceil(params::GEMM_PIPE_BIG_BM as usize)
            * n.div_ceil(params::GEMM_PIPE_BIG_BN as usize)
            >= min_tiles;
        let (shape, bm, bn, threads) = if big {
            let (shape, threads) = match self.pipe_tile {
                PipeTile::Warp64x32 => ("big", params::GEMM_PIPE_BIG_THREADS),
                PipeTile::Warp64x64 => ("big4", params::GEMM_PIPE_BIG4_THREADS),
            };
            (
                shape,
                params::GEMM_PIPE_BIG_BM,
                params::GEMM_PIPE_BIG_BN,
                threads,
            )
        } else {
            (
                "small",
                params::GEMM_PIPE_SMALL_BM,
                params::GEMM_PIPE_SMALL_BN,
                params::GEMM_PIPE_SMALL_THREADS,
            )
        };
        let shared = super::shared_memory::pipe(bm, bn);
        let tiles = m.div_ceil(bm as usize) * n.div_ceil(bn as usize);
        let ktiles = k.div_ceil(params::GEMM_PIPE_BK as usize);
        let split = matches!(
            self.gemm,
            GemmKernel::PipelinedSplitK
                | GemmKernel::Wgmma
                | GemmKernel::WgmmaWs
                | GemmKernel::WgmmaTma
        );
        let (splits, per_split) = if split && !big {
            splits_for(tiles, ktiles, min_tiles)
        } else {
            (1, ktiles)
        };
        let cfg = LaunchConfig {
            grid: [
                self.grid("GEMM row tiles", m.div_ceil(bm as usize))?,
                self.grid("GEMM column tiles", n.div_ceil(bn as usize))?,
                splits as u32,
            ],
            block: [threads, 1, 1],
            shared_bytes: shared,
        };
        Ok(Pipelined {
            kernel: self.kernel(&format!("{family}_{shape}")),
            cfg,
            splits,
            per_split,
        })
    }
}

/// A pipelined GEMM launch: the kernel, its grid (z = splits of K), and k-steps per split.
pub(super) struct Pipelined {
    pub(super) kernel: String,
    pub(super) cfg: LaunchConfig,
    pub(super) splits: usize,
    pub(super) per_split: usize,
}

/// How many ways to split K for `tiles` output tiles of `ktiles` k-steps: about twice
/// `min_tiles` blocks in all, at most `GEMM_SPLITK_MAX` splits of at least
/// `GEMM_SPLITK_MIN_KTILES` k-steps; no split left empty. Returns (splits, k-steps per split).
pub(super) fn splits_for(tiles: usize, ktiles: usize, min_tiles: usize) -> (usize, usize) {
    if tiles >= min_tiles {
        return (1, ktiles);
    }
    let want = (2 * min_tiles)
        .div_ceil(tiles)
        .min(params::GEMM_SPLITK_MAX as usize)
        .min(ktiles / params::GEMM_SPLITK_MIN_KTILES as usize)
        .max(1);
    let per_split = ktiles.div_ceil(want);
    (ktiles.div_ceil(per_split), per_split)
}

/// The f16/bf16 GEMM kernel of a [`GpuBackend`] (f32 always runs the SIMT kernel).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum GemmKernel {
    /// One shared-memory stage loaded element by element, fragments read as words: written for
    /// clarity; the parity reference for the pipelined kernel and its fallback.
    Simple,
    /// `cp.async` copies into a 4-stage ring, `ldmatrix` fragments, 128 x 128 or 64 x 64 tiles
    /// (kernels/gemm.cu). Needs K % 8 == 0 and 16-byte aligned operands; other GEMMs run the
    /// simple kernel.
    Pipelined,
    /// The pipelined kernel, with K split across blocks (partial sums in f32, then a reduction
    /// kernel with the epilogue) when its output tiles are too few to fill the GPU; the
    /// default. Measured on an H200 (docs/gpu-runs.md, run 6): MiniLM's FFN down at batch 1
    /// 0.035 -> 0.011 ms, the MiniLM forward at batch 1 and 8 about 10% faster, batch 32 level.
    PipelinedSplitK,
    /// Hopper's warpgroup multiply (`wgmma.m64n128k16`, sm_90a) on 128 x 128 tiles, both
    /// operands read by the tensor cores from a 5-stage ring of 128-byte-swizzled shared
    /// memory filled by `cp.async`, K split as with `PipelinedSplitK` when the tiles are too
    /// few (kernels/gemm_wgmma.cu, `gemm_wgmma_*`). Where the device has no wgmma (anything but
    /// compute capability 9.0) this is `PipelinedSplitK`. Compiled and emulated, not run on a
    /// GPU yet: not the default until a GPU run has measured it.
    Wgmma,
    /// [`GemmKernel::Wgmma`] with its 128 x 256 tile warp-specialised: a producer warpgroup
    /// copies stages, two consumer warpgroups multiply, handing stages over with mbarriers
    /// instead of block-wide barriers (`gemm_wgmma_ws_*`); the other shapes as `Wgmma`.
    /// Compiled and emulated, not run on a GPU yet.
    WgmmaWs,
    /// The warp-specialised Hopper GEMM with its copies made by the tensor memory accelerator
    /// (TMA: one thread asks for each stage's two boxes, described by tensor maps the host
    /// makes per call) and persistent blocks (as many as fill the GPU, walking the tiles and
    /// splits of K); 128 x 256 tiles when there are enough, else 128 x 128 with split-K
    /// (kernels/gemm_wgmma_tma.cu, `gemm_wgmma_tma_*`). Needs K a non-zero multiple of 8; elsewhere, and on devices
    /// without wgmma, as `PipelinedSplitK`. Compiled and emulated, not run on a GPU yet.
    WgmmaTma,
}

kernel_switch!(GemmKernel, "APPARATE_GPU_GEMM", "GEMM kernel", default PipelinedSplitK, {
    "simple" => Simple,
    "pipelined" => Pipelined,
    "splitk" => PipelinedSplitK,
    "wgmma" => Wgmma,
    "wgmma-ws" => WgmmaWs,
    "wgmma-tma" => WgmmaTma,
});

/// The warp layout of the pipelined kernels' big tile (128 x 128: `gemm_pipe`, and the
/// implicit-GEMM convolution `conv_pipe`); the small tile is not affected. The default is the
/// layout measured on a GPU; the other is compiled and emulated, not run on a GPU yet.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum PipeTile {
    /// 8 warps of 64 x 32 (`*_pipe_big_*`, 121-126 registers): 2.0 shared-memory wavefronts
    /// per `mma` (the emulator's count), which caps it at about 495 TFLOP/s on an H200.
    #[default]
    Warp64x32,
    /// 4 warps of 64 x 64 (`*_pipe_big4_*`, 201-220 registers, no spills): each fragment read
    /// from shared memory feeds twice the multiplies, 1.5 wavefronts per `mma` (a cap of about
    /// 660 TFLOP/s), at half the warps per block to hide latency with.
    Warp64x64,
}

kernel_switch!(PipeTile, "APPARATE_GPU_PIPE_TILE", "warp tile", default Warp64x32, {
    "64x32" => Warp64x32,
    "64x64" => Warp64x64,
});

/// The operands of one GEMM besides its input: weight [n, k], optional bias [n] and residual
/// [m, n], sizes, and the fused activation.
pub(super) struct Gemm<'a, B> {
    pub w: &'a GpuTensor<B>,
    pub b: Option<&'a GpuTensor<B>>,
    pub residual: Option<&'a GpuTensor<B>>,
    pub mnk: [usize; 3],
    pub act: Activation,
}

#[cfg(test)]
mod tests {
    use super::{PipeTile, splits_for};

    #[test]
    fn pipe_tiles_by_name() {
        assert_eq!("64x32".parse(), Ok(PipeTile::Warp64x32));
        assert_eq!("64x64".parse(), Ok(PipeTile::Warp64x64));
        let e = "64X64".parse::<PipeTile>().unwrap_err();
        assert!(e.contains("`64X64`") && e.contains("64x32, 64x64"), "{e}");
    }

    /// The big tile's launch follows the warp layout: 4 warps of 64 x 64 run the `big4`
    /// kernel with 128 threads, the default its 8 warps; small tiles are the same in both.
    #[test]
    fn the_big_tile_launches_in_the_chosen_warp_layout() {
        use crate::backend::emu::{EmuConfig, EmuDevice};
        use crate::backend::gpu::GpuBackend;
        use crate::tensor::DType;
        let be = GpuBackend::new(EmuDevice::new(EmuConfig::default()).unwrap(), DType::F16);
        let launch = |tile: PipeTile, mnk: [usize; 3]| {
            let p = be
                .clone()
                .with_pipe_tile(tile)
                .pipe_cfg("gemm_pipe", mnk)
                .unwrap();
            (p.kernel, p.cfg.block[0])
        };
        let big = [4096, 4096, 4096];
        assert_eq!(
            launch(PipeTile::Warp64x32, big),
            ("gemm_pipe_big_f16".into(), 256)
        );
        assert_eq!(
            launch(PipeTile::Warp64x64, big),
            ("gemm_pipe_big4_f16".into(), 128)
        );
        let small = [128, 384, 1536];
        assert_eq!(
            launch(PipeTile::Warp64x64, small),
            ("gemm_pipe_small_f16".into(), 128)
        );
    }

    #[test]
    fn splits_fill_the_gpu_and_leave_no_split_empty() {
        // MiniLM's FFN down at batch 8: 96 tiles of 48 k-steps -> 3 splits of 16.
        assert_eq!(splits_for(96, 48, 132), (3, 16));
        // Batch 1 (12 tiles): capped at 8 splits, and at 4 k-steps per split.
        assert_eq!(splits_for(12, 48, 132), (8, 6));
        assert_eq!(splits_for(12, 12, 132), (3, 4));
        // Too short to split, or enough tiles already.
        assert_eq!(splits_for(12, 7, 132), (1, 7));
        assert_eq!(splits_for(132, 48, 132), (1, 48));
        for tiles in 1..140 {
            for ktiles in 1..100 {
                let (splits, per) = splits_for(tiles, ktiles, 132);
                assert!((1..=8).contains(&splits), "{tiles} {ktiles}");
                assert!((splits - 1) * per < ktiles, "empty split: {tiles} {ktiles}");
                assert!(splits * per >= ktiles, "k-steps lost: {tiles} {ktiles}");
            }
        }
    }
}

//! Launchers of the Hopper GEMMs (sm_90a): `kernels/gemm_wgmma.cu` ([`GemmKernel::Wgmma`],
//! [`GemmKernel::WgmmaWs`], fed by `cp.async`) and `kernels/gemm_wgmma_tma.cu`
//! ([`GemmKernel::WgmmaTma`], fed by the tensor memory accelerator, persistent). They share the
//! other GEMMs' arguments, split-K reduction and fallbacks (`gemm.rs`).

use super::gemm::{Gemm, GemmKernel, Pipelined, splits_for};
use super::{GpuBackend, GpuTensor, params};
use crate::backend::device::{Device, KernelArg, LaunchConfig, TensorMapSpec};
use crate::error::Result;
use crate::tensor::DType;

impl<D: Device> GpuBackend<D> {
    /// Whether [`GemmKernel::WgmmaTma`] runs this GEMM: chosen, a device with wgmma (and so
    /// TMA), f16/bf16, K a non-zero multiple of 8 (a tensor map's row stride is a multiple of
    /// 16 bytes) and 16-byte aligned operands.
    pub(super) fn tma_applies(&self, x: KernelArg, g: &Gemm<'_, D::Buf>) -> bool {
        let k = g.mnk[2];
        let KernelArg::Ptr(xa) = x else {
            return false;
        };
        self.gemm == GemmKernel::WgmmaTma
            && self.dtype != DType::F32
            && self.dev.has_wgmma()
            && k > 0
            && k % 8 == 0
            && xa % 16 == 0
            && self.dev.address(&g.w.buf) % 16 == 0
    }

    /// The TMA kernel: 128 x 256 tiles when there are enough of them to fill the GPU, else
    /// 128 x 128, K split by [`persistent_splits`]; a persistent grid of at most
    /// [`GpuBackend::with_gemm_fill_tiles`] blocks walking tiles x splits.
    pub(super) fn launch_tma(
        &self,
        x: KernelArg,
        g: &Gemm<'_, D::Buf>,
        y: &GpuTensor<D::Buf>,
    ) -> Result<()> {
        let [m, n, k] = g.mnk;
        let KernelArg::Ptr(xa) = x else {
            unreachable!("tma_applies took a pointer")
        };
        let bm = params::GEMM_WGMMA_BM as usize;
        let (name, bn, stages) = if wgmma_wide(m, n, self.gemm_fill) {
            (
                "gemm_wgmma_tma_wide",
                params::GEMM_WGMMA_WIDE_BN,
                params::GEMM_WGMMA_WIDE_STAGES,
            )
        } else {
            (
                "gemm_wgmma_tma",
                params::GEMM_WGMMA_BN,
                params::GEMM_WGMMA_TMA_STAGES,
            )
        };
        let map = |address: u64, rows: usize, box_rows: u32| {
            self.dev.tensor_map(&TensorMapSpec {
                address,
                rows: rows as u64,
                cols: k as u64,
                row_stride_bytes: 2 * k as u64,
                box_rows,
            })
        };
        let map_x = map(xa, m, params::GEMM_WGMMA_BM)?;
        let map_w = map(self.dev.address(&g.w.buf), n, bn)?;
        let tiles = m.div_ceil(bm) * n.div_ceil(bn as usize);
        let ktiles = k.div_ceil(params::GEMM_WGMMA_BK as usize);
        let (splits, per_split) = persistent_splits(tiles, ktiles, self.gemm_fill);
        // The kernel counts units in 32 bits.
        self.u32("GEMM work units", tiles * splits)?;
        let blocks = (tiles * splits).min(self.gemm_fill).max(1) as u32;
        let shared = super::shared_memory::wgmma(bn, stages, true);
        let cfg = LaunchConfig::linear(blocks, params::GEMM_WGMMA_WS_THREADS, shared);
        let args = self.gemm_args(x, g, y)?;
        let partial = if splits > 1 {
            Some(self.dev.alloc(splits * m * n * 4)?)
        } else {
            None
        };
        let launch_args = [
            KernelArg::TensorMap(map_x),
            KernelArg::TensorMap(map_w),
            args[2], // bias
            args[3], // residual
            args[4], // y
            args[5], // M
            args[6], // N
            args[7], // K
            args[8], // activation
            KernelArg::Ptr(partial.as_ref().map_or(0, |p| self.dev.address(p))),
            self.u32("k-steps per split", per_split)?,
            self.u32("splits", splits)?,
        ];
        self.launch(&self.kernel(name), cfg, &launch_args)?;
        match &partial {
            Some(p) => self.reduce_splits(p, splits, &args),
            None => Ok(()),
        }
    }
}

impl<D: Device> GpuBackend<D> {
    /// The Hopper kernel's launch: 128 x 256 tiles when there are enough of them to fill the
    /// GPU (warp-specialised with [`GemmKernel::WgmmaWs`]), else 128 x 128 tiles, K split as
    /// for the small pipelined tiles when those are too few.
    pub(super) fn wgmma_cfg(&self, [m, n, k]: [usize; 3], min_tiles: usize) -> Result<Pipelined> {
        let bm = params::GEMM_WGMMA_BM as usize;
        let wide = wgmma_wide(m, n, min_tiles);
        let ws = wide && self.gemm == GemmKernel::WgmmaWs;
        let (name, bn, stages, threads) = if ws {
            (
                "gemm_wgmma_ws",
                params::GEMM_WGMMA_WIDE_BN,
                params::GEMM_WGMMA_WIDE_STAGES,
                params::GEMM_WGMMA_WS_THREADS,
            )
        } else if wide {
            (
                "gemm_wgmma_wide",
                params::GEMM_WGMMA_WIDE_BN,
                params::GEMM_WGMMA_WIDE_STAGES,
                params::GEMM_WGMMA_THREADS,
            )
        } else {
            (
                "gemm_wgmma",
                params::GEMM_WGMMA_BN,
                params::GEMM_WGMMA_STAGES,
                params::GEMM_WGMMA_THREADS,
            )
        };
        let shared = super::shared_memory::wgmma(bn, stages, ws);
        let bn = bn as usize;
        let tiles = m.div_ceil(bm) * n.div_ceil(bn);
        let ktiles = k.div_ceil(params::GEMM_WGMMA_BK as usize);
        let (splits, per_split) = splits_for(tiles, ktiles, min_tiles);
        Ok(Pipelined {
            kernel: self.kernel(name),
            cfg: LaunchConfig {
                grid: [
                    self.grid("GEMM row tiles", m.div_ceil(bm))?,
                    self.grid("GEMM column tiles", n.div_ceil(bn))?,
                    splits as u32,
                ],
                block: [threads, 1, 1],
                shared_bytes: shared,
            },
            splits,
            per_split,
        })
    }
}

/// Whether a Hopper GEMM takes its 128 x 256 tile: there are at least `fill` of them.
fn wgmma_wide(m: usize, n: usize, fill: usize) -> bool {
    m.div_ceil(params::GEMM_WGMMA_BM as usize) * n.div_ceil(params::GEMM_WGMMA_WIDE_BN as usize)
        >= fill
}

/// How many ways to split K for a persistent grid of `fill` blocks walking `tiles` output
/// tiles x splits: the split that finishes first, counting the rounds of the grid over the
/// units times the k-steps of a unit (`ceil(tiles x splits / fill) x k-steps per split`), at
/// most `GEMM_SPLITK_MAX` splits of at least `GEMM_SPLITK_MIN_KTILES` k-steps, no split left
/// empty; ties go to fewer splits (less partial-sum traffic). Unlike [`splits_for`] (about two
/// blocks per multiprocessor, for grids the hardware schedules) it avoids a last round of a
/// few units: MiniLM's FFN down at batch 8 (24 tiles of 24 k-steps) gets 5 splits (120 units,
/// one round of 5 k-steps), not 6 (144 units, two rounds of 4).
fn persistent_splits(tiles: usize, ktiles: usize, fill: usize) -> (usize, usize) {
    let fill = fill.max(1);
    let mut best = (1, ktiles.max(1));
    let mut best_cost = tiles.div_ceil(fill) * ktiles;
    for want in 2..=params::GEMM_SPLITK_MAX as usize {
        let per_split = ktiles.div_ceil(want);
        if per_split < params::GEMM_SPLITK_MIN_KTILES as usize {
            break;
        }
        let splits = ktiles.div_ceil(per_split);
        let cost = (tiles * splits).div_ceil(fill) * per_split;
        if cost < best_cost {
            (best, best_cost) = ((splits, per_split), cost);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::persistent_splits;

    #[test]
    fn persistent_splits_finish_in_the_fewest_rounds() {
        // MiniLM's FFN down at batch 8 (24 tiles of 128 x 128, 24 k-steps): 5 x 5, one round.
        assert_eq!(persistent_splits(24, 24, 132), (5, 5));
        // Enough tiles already, or too short to split.
        assert_eq!(persistent_splits(512, 64, 132), (1, 64));
        assert_eq!(persistent_splits(12, 5, 132), (1, 5));
        // 7 k-steps: 4 + 3 (the minimum holds for the split size, as in splits_for).
        assert_eq!(persistent_splits(12, 7, 132), (2, 4));
        // Batch 1 (3 tiles, 24 k-steps): 6 splits of 4 (the minimum k-steps per split).
        assert_eq!(persistent_splits(3, 24, 132), (6, 4));
        for tiles in 1..200 {
            for ktiles in 1..80 {
                let (splits, per) = persistent_splits(tiles, ktiles, 132);
                assert!((1..=8).contains(&splits), "{tiles} {ktiles}");
                assert!((splits - 1) * per < ktiles, "empty split: {tiles} {ktiles}");
                assert!(splits * per >= ktiles, "k-steps lost: {tiles} {ktiles}");
                let rounds = |s: usize, p: usize| (tiles * s).div_ceil(132) * p;
                assert!(
                    rounds(splits, per) <= rounds(1, ktiles),
                    "worse than no split: {tiles} {ktiles}"
                );
            }
        }
    }
}

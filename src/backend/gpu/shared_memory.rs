//! Dynamic shared memory of the kernels that take a fixed amount per block at launch (the
//! pipelined tensor-core GEMMs and convolutions, flash attention, the Hopper GEMMs): one formula
//! per family, used by its launcher and listed by `kernels-check` in docs/kernels.md beside
//! ptxas' static figures (ptxas sees only `__shared__` arrays, so these kernels read 0 there).
//! The row kernels' shared memory depends on the row width and is not listed.

use super::params;

/// The pipelined GEMM and its implicit convolution (kernels/common/gemm_pipe.cuh):
/// `GEMM_PIPE_STAGES` x (`bm` + `bn`) rows of BK + 8 halves (the 8 pad a row so that the
/// `ldmatrix` and `cp.async` of neighbouring rows fall in other banks).
pub(super) fn pipe(bm: u32, bn: u32) -> u32 {
    params::GEMM_PIPE_STAGES * (bm + bn) * (params::GEMM_PIPE_BK + 8) * 2
}

/// Flash attention with `bq` query rows per block at head size `d`: Q, then K and V
/// double-buffered (2 x BKV rows each), of `d` + 8 halves.
pub(super) fn flash(bq: u32, d: u32) -> u32 {
    (bq + 4 * params::ATTN_FLASH_BKV) * (d + 8) * 2
}

/// A Hopper GEMM: `stages` x (BM + `bn`) rows of BK halves, 1 KiB to align the ring to the
/// 128-byte swizzle's 1 KiB pattern, and (kernels whose stages pass through mbarriers) two
/// 8-byte barriers per stage.
pub(super) fn wgmma(bn: u32, stages: u32, barriers: bool) -> u32 {
    let ring = stages * (params::GEMM_WGMMA_BM + bn) * params::GEMM_WGMMA_BK * 2;
    ring + 1024 + if barriers { 2 * stages * 8 } else { 0 }
}

/// One family's launch: its kernels (a name pattern), threads and dynamic shared bytes per
/// block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchShared {
    /// The entry points, as a pattern (`gemm_pipe_big_*`: the f16 and bf16 forms).
    pub kernels: String,
    pub threads: u32,
    /// Dynamic shared memory per block, bytes.
    pub bytes: u32,
    /// Only on sm_90a (the Hopper kernels).
    pub hopper_only: bool,
}

/// Every kernel family with a fixed dynamic shared memory per block, as its launcher sets it.
pub fn fixed_dynamic_shared() -> Vec<LaunchShared> {
    let row = |kernels: String, threads: u32, bytes: u32, hopper_only: bool| LaunchShared {
        kernels,
        threads,
        bytes,
        hopper_only,
    };
    let mut v = Vec::new();
    for (shape, bm, bn, threads) in [
        (
            "small",
            params::GEMM_PIPE_SMALL_BM,
            params::GEMM_PIPE_SMALL_BN,
            params::GEMM_PIPE_SMALL_THREADS,
        ),
        (
            "big",
            params::GEMM_PIPE_BIG_BM,
            params::GEMM_PIPE_BIG_BN,
            params::GEMM_PIPE_BIG_THREADS,
        ),
        (
            "big4",
            params::GEMM_PIPE_BIG_BM,
            params::GEMM_PIPE_BIG_BN,
            params::GEMM_PIPE_BIG4_THREADS,
        ),
    ] {
        v.push(row(
            format!("gemm_pipe_{shape}_*, conv_pipe_{shape}_*"),
            threads,
            pipe(bm, bn),
            false,
        ));
    }
    for d in [32, 64, 128] {
        v.push(row(
            format!("attention_flash_d{d}_*"),
            params::ATTN_FLASH_THREADS,
            flash(params::ATTN_FLASH_BQ, d),
            false,
        ));
    }
    for d in [32, 64] {
        v.push(row(
            format!("attention_flash_wide_d{d}_*"),
            params::ATTN_FLASH_THREADS,
            flash(2 * params::ATTN_FLASH_BQ, d),
            false,
        ));
    }
    for (kernels, bn, stages, barriers, threads) in [
        (
            "gemm_wgmma_f16, gemm_wgmma_bf16",
            params::GEMM_WGMMA_BN,
            params::GEMM_WGMMA_STAGES,
            false,
            params::GEMM_WGMMA_THREADS,
        ),
        (
            "gemm_wgmma_wide_*",
            params::GEMM_WGMMA_WIDE_BN,
            params::GEMM_WGMMA_WIDE_STAGES,
            false,
            params::GEMM_WGMMA_THREADS,
        ),
        (
            "gemm_wgmma_ws_*",
            params::GEMM_WGMMA_WIDE_BN,
            params::GEMM_WGMMA_WIDE_STAGES,
            true,
            params::GEMM_WGMMA_WS_THREADS,
        ),
        (
            "gemm_wgmma_tma_f16, gemm_wgmma_tma_bf16",
            params::GEMM_WGMMA_BN,
            params::GEMM_WGMMA_TMA_STAGES,
            true,
            params::GEMM_WGMMA_WS_THREADS,
        ),
        (
            "gemm_wgmma_tma_wide_*",
            params::GEMM_WGMMA_WIDE_BN,
            params::GEMM_WGMMA_WIDE_STAGES,
            true,
            params::GEMM_WGMMA_WS_THREADS,
        ),
    ] {
        v.push(row(
            kernels.to_string(),
            threads,
            wgmma(bn, stages, barriers),
            true,
        ));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::kernel_sources::KERNELS;

    /// Every listed pattern names kernels that exist, and every block fits the per-block limit
    /// of the architectures it runs on (227 KiB on sm_90; 163 KiB on sm_80 for the others).
    #[test]
    fn listed_kernels_exist_and_fit_their_architectures() {
        let table = fixed_dynamic_shared();
        assert!(table.len() >= 10);
        for l in &table {
            for pattern in l.kernels.split(", ") {
                let found = match pattern.strip_suffix('*') {
                    Some(prefix) => KERNELS.iter().any(|k| k.starts_with(prefix)),
                    None => KERNELS.contains(&pattern),
                };
                assert!(found, "{pattern}: no such kernel");
            }
            let limit = if l.hopper_only { 227 } else { 163 } * 1024;
            assert!(l.bytes <= limit, "{}: {} bytes", l.kernels, l.bytes);
        }
    }
}

// The Hopper GEMMs' shared pieces (sm_90a): one k-step of warpgroup multiplies and the
// accumulators' epilogue, used by the cp.async-fed kernels (gemm_wgmma.cu) and the TMA-fed one
// (gemm_wgmma_tma.cu). Each of those is a source of its own so that NVRTC compiles them in
// parallel with the other GEMMs at device start (gemm.cu alone took 75 s for sm_90a).
#pragma once
#ifndef APPARATE_GEMM_WGMMA_CUH
#define APPARATE_GEMM_WGMMA_CUH

#include "gemm_pipe.cuh"
#include "mbarrier.cuh"
#include "wgmma.cuh"

// ---- Hopper warpgroup tensor cores (f16, bf16; sm_90a) ------------------------------------
//
// Beside the pipelined kernel (GemmKernel::Wgmma picks it on a device with wgmma). A block of two
// warpgroups computes a 128 x BN tile of Y (BN = 128 or 256), each warpgroup 64 rows x BN
// columns with wgmma.m64nBNk16 reading both operands straight from shared memory (no fragment
// loads through registers: the accumulators are the only registers the multiply touches). K advances 64 at a
// time through a ring of GEMM_WGMMA_STAGES stages filled by cp.async: each operand row's 128
// bytes are one row of the 128-byte swizzle (chunk c of row r stored at c ^ (r % 8), the layout
// wgmma's descriptor names), which also keeps the copies and the multiplies free of bank
// conflicts. The multiplies are asynchronous: a k-step's are issued, then the kernel waits only
// for the previous k-step's, so the tensor cores always have one step queued; a stage is
// refilled two k-steps after it was last read (all its multiplies are then complete).
// Same contract as gemm_pipe: K % 8 == 0, 16-byte aligned X and W, split-K through `partial`.
// Dynamic shared memory: STAGES * (BM + BN) * BK * 2 bytes + 1024 (alignment of the ring).
#if WGMMA_AVAILABLE
// One k-step of 64 for a warpgroup: four wgmma.m64nBNk16 (k16 slices 32 bytes apart in each
// swizzled row) over the stage's A rows at `a_addr` and B rows at `b_addr`, committed as one
// group; the caller waits for it.
template <typename T, uint32_t BN>
__device__ __forceinline__ void wgmma_kstep(float (&acc)[BN / 2], uint32_t a_addr, uint32_t b_addr) {
    constexpr uint32_t SBO = 8 * GEMM_WGMMA_BK * 2;  // 8 rows of 128 bytes
    #pragma unroll
    for (int i = 0; i < (int)BN / 2; i++) wgmma_fence_operand(acc[i]);
    wgmma_fence();
    #pragma unroll
    for (uint32_t ks = 0; ks < GEMM_WGMMA_BK / 16; ks++)
        wgmma_m64k16<T, BN>(acc, wgmma_desc_sw128(a_addr + ks * 32, SBO),
                            wgmma_desc_sw128(b_addr + ks * 32, SBO), 1);
    wgmma_commit();
    #pragma unroll
    for (int i = 0; i < (int)BN / 2; i++) wgmma_fence_operand(acc[i]);
}

// A warpgroup's 64 x BN accumulators out, once every multiply has completed: acc[4j + 2i + c]
// is row r0 + 8 i, column c0 + 8 j + c (r0 = the warpgroup's first row + 16 (warp % 4) +
// lane / 4, c0 = the tile's first column + 2 (lane % 4)). Split-K: raw f32 sums into the
// split's M x N partial sums `p`; else (p null) the epilogue into y.
template <typename T, uint32_t BN>
__device__ __forceinline__ void wgmma_store(float (&acc)[BN / 2], uint32_t r0, uint32_t c0, T* y,
                                            uint32_t M, uint32_t N, const T* bias, const T* res,
                                            int act, float* p) {
    #pragma unroll
    for (int i = 0; i < (int)BN / 2; i++) wgmma_fence_operand(acc[i]);
    if (p) {
        #pragma unroll
        for (int j = 0; j < (int)BN / 8; j++)
            #pragma unroll
            for (int i = 0; i < 2; i++)
                store_partial_pair(p, M, N, r0 + 8 * i, c0 + 8 * j, acc[4 * j + 2 * i],
                                   acc[4 * j + 2 * i + 1]);
        return;
    }
    #pragma unroll
    for (int j = 0; j < (int)BN / 8; j++)
        #pragma unroll
        for (int i = 0; i < 2; i++)
            store_pair(y, M, N, r0 + 8 * i, c0 + 8 * j, acc[4 * j + 2 * i], acc[4 * j + 2 * i + 1],
                       bias, res, act);
}
#endif

#endif  // APPARATE_GEMM_WGMMA_CUH

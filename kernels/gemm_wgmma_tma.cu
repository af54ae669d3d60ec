// Y = act(X W^T + bias + residual) on Hopper's warpgroup tensor cores (f16, bf16; sm_90a), fed
// by the tensor memory accelerator: GemmKernel::WgmmaTma. Same layouts and contract as gemm.cu.
#include "common/gemm_wgmma.cuh"
#include "common/tma.cuh"


// ---- Hopper, TMA, warp-specialised, persistent (f16, bf16; sm_90a) -------------------------
//
// The roles of gemm_wgmma_ws with the copies made by the tensor memory accelerator: one thread
// of the producer warpgroup announces a stage's bytes on full[s] and asks for two boxes (the
// tile's 128 rows of X and BN rows of W, 64 columns of K each; kernels/common/tma.cuh), which
// land in the 128-byte swizzle wgmma reads and complete full[s] themselves; the rest of the
// producer warpgroup only gives its registers back. No address arithmetic, no partial rows
// (the copy engine fills what lies outside X or W with zeros), no proxy fence.
//
// Persistent: a grid of at most as many blocks as fill the GPU walks the work units (output
// tiles x splits of K, column of tiles by column of tiles so that neighbouring blocks share
// W's rows in L2) with a stride of the grid; the ring and its phases run on across units, so
// the producer fills the next unit's stages while the consumers store the last one's results.
// Each consumer thread arrives on empty[s] once its warpgroup's multiplies reading stage s have
// completed. Split-K as the other kernels (`splits` > 1: raw sums into `partial`).
// Dynamic shared memory: STAGES * (128 + BN) * 128 + 1024 (alignment) + 2 * STAGES * 8.
template <typename T, uint32_t BN, uint32_t STAGES>
__device__ void gemm_wgmma_tma(const TmaMap* map_x, const TmaMap* map_w,
                               const T* __restrict__ bias, const T* __restrict__ res,
                               T* __restrict__ y, uint32_t M, uint32_t N, uint32_t K, int act,
                               float* __restrict__ partial, uint32_t per_split, uint32_t splits) {
#if WGMMA_AVAILABLE
    constexpr uint32_t BM = GEMM_WGMMA_BM, BK = GEMM_WGMMA_BK, ROW = BK * 2;
    constexpr uint32_t A_BYTES = BM * ROW, STAGE_BYTES = (BM + BN) * ROW;
    static_assert(ROW == 128 && BM == 128, "two consumer warpgroups of 64 swizzled rows");
    static_assert(GEMM_WGMMA_WS_THREADS == 384, "one producer and two consumer warpgroups");
    static_assert(BN <= 256, "a box has at most 256 rows");
    DYN_SHARED(unsigned char, raw);
    unsigned char* ring = raw + (1024u - wgmma_smem_addr(raw) % 1024u) % 1024u;
    uint32_t ring_addr = wgmma_smem_addr(ring);
    uint64_t* full = reinterpret_cast<uint64_t*>(ring + STAGES * STAGE_BYTES);
    uint64_t* empty = full + STAGES;
    uint32_t tid = threadIdx.x, lane = tid % 32, warp = tid / 32, wg = warp / 4;
    uint32_t mtiles = (M + BM - 1) / BM, tiles = mtiles * ((N + BN - 1) / BN);
    uint32_t units = tiles * splits, ktiles_all = (K + BK - 1) / BK;
    if (tid == 0) {
        for (uint32_t s = 0; s < STAGES; s++) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], 256);
        }
        mbar_init_fence();
    }
    __syncthreads();
    // Unit u: split u / tiles, tile u % tiles (rows fastest); its k-steps [k_first, k_end).
    auto unit = [&](uint32_t u, uint32_t& m0, uint32_t& n0, uint32_t& z, uint32_t& k_first,
                    uint32_t& ktiles) {
        z = u / tiles;
        uint32_t t = u % tiles;
        m0 = (t % mtiles) * BM;
        n0 = (t / mtiles) * BN;
        split_k_steps(splits > 1, z, per_split, ktiles_all, k_first, ktiles);
    };

    if (wg == 0) {
        setmaxnreg_dec<GEMM_WGMMA_WS_PRODUCER_REGS>();
        if (tid != 0) return;
        tma_prefetch(map_x);
        tma_prefetch(map_w);
        uint32_t it = 0;  // k-steps this block has issued, over all its units
        for (uint32_t u = blockIdx.x; u < units; u += gridDim.x) {
            uint32_t m0, n0, z, k_first, ktiles;
            unit(u, m0, n0, z, k_first, ktiles);
            for (uint32_t kt = 0; kt < ktiles; kt++, it++) {
                uint32_t s = it % STAGES;
                mbar_wait(&empty[s], ((it / STAGES) & 1) ^ 1);  // round 0: at once
                mbar_arrive_expect_tx(&full[s], STAGE_BYTES);
                unsigned char* st = ring + s * STAGE_BYTES;
                int32_t k = (int32_t)((k_first + kt) * BK);
                tma_load_2d(st, map_x, k, (int32_t)m0, &full[s]);
                tma_load_2d(st + A_BYTES, map_w, k, (int32_t)n0, &full[s]);
            }
        }
        return;
    }

    // Consumers: warpgroup 1 rows 0-63 of each tile, warpgroup 2 rows 64-127.
    setmaxnreg_inc<GEMM_WGMMA_WS_CONSUMER_REGS>();
    uint32_t cw = wg - 1, it = 0;
    constexpr int NACC = BN / 2;
    for (uint32_t u = blockIdx.x; u < units; u += gridDim.x) {
        uint32_t m0, n0, z, k_first, ktiles;
        unit(u, m0, n0, z, k_first, ktiles);
        float acc[NACC];
        #pragma unroll
        for (int i = 0; i < NACC; i++) acc[i] = 0.0f;
        for (uint32_t kt = 0; kt < ktiles; kt++, it++) {
            uint32_t s = it % STAGES;
            mbar_wait(&full[s], (it / STAGES) & 1);
            uint32_t stage = ring_addr + s * STAGE_BYTES;
            wgmma_kstep<T, BN>(acc, stage + cw * 64 * ROW, stage + A_BYTES);
            wgmma_wait<1>();  // the previous k-step's multiplies are complete: its stage is free
            if (kt > 0) mbar_arrive(&empty[(it - 1) % STAGES]);
        }
        wgmma_wait<0>();
        if (ktiles > 0) mbar_arrive(&empty[(it - 1) % STAGES]);
        wgmma_store<T, BN>(acc, m0 + cw * 64 + (warp % 4) * 16 + lane / 4, n0 + 2 * (lane % 4), y,
                           M, N, bias, res, act,
                           splits > 1 ? partial + (uint64_t)z * M * N : nullptr);
    }
#else
    __trap();  // not built for sm_90a: the launcher never picks this kernel here
#endif
}

// X and W reach the kernel as tensor maps (Device::tensor_map: 64 x 128 boxes of X, 64 x BN
// boxes of W), by value: the copies name the parameters' addresses.
extern "C" __global__ void __launch_bounds__(GEMM_WGMMA_WS_THREADS, 1)
gemm_wgmma_tma_f16(const __grid_constant__ TmaMap map_x, const __grid_constant__ TmaMap map_w,
    const f16* bias, const f16* res, f16* y, uint32_t M, uint32_t N, uint32_t K, int act,
    float* partial, uint32_t per_split, uint32_t splits) {
    gemm_wgmma_tma<f16, GEMM_WGMMA_BN, GEMM_WGMMA_TMA_STAGES>(&map_x, &map_w, bias, res, y, M, N,
                                                              K, act, partial, per_split, splits);
}
extern "C" __global__ void __launch_bounds__(GEMM_WGMMA_WS_THREADS, 1)
gemm_wgmma_tma_bf16(const __grid_constant__ TmaMap map_x, const __grid_constant__ TmaMap map_w,
    const bf16* bias, const bf16* res, bf16* y, uint32_t M, uint32_t N, uint32_t K, int act,
    float* partial, uint32_t per_split, uint32_t splits) {
    gemm_wgmma_tma<bf16, GEMM_WGMMA_BN, GEMM_WGMMA_TMA_STAGES>(&map_x, &map_w, bias, res, y, M, N,
                                                               K, act, partial, per_split, splits);
}
extern "C" __global__ void __launch_bounds__(GEMM_WGMMA_WS_THREADS, 1)
gemm_wgmma_tma_wide_f16(const __grid_constant__ TmaMap map_x,
    const __grid_constant__ TmaMap map_w, const f16* bias, const f16* res, f16* y, uint32_t M,
    uint32_t N, uint32_t K, int act, float* partial, uint32_t per_split, uint32_t splits) {
    gemm_wgmma_tma<f16, GEMM_WGMMA_WIDE_BN, GEMM_WGMMA_WIDE_STAGES>(
        &map_x, &map_w, bias, res, y, M, N, K, act, partial, per_split, splits);
}
extern "C" __global__ void __launch_bounds__(GEMM_WGMMA_WS_THREADS, 1)
gemm_wgmma_tma_wide_bf16(const __grid_constant__ TmaMap map_x,
    const __grid_constant__ TmaMap map_w, const bf16* bias, const bf16* res, bf16* y, uint32_t M,
    uint32_t N, uint32_t K, int act, float* partial, uint32_t per_split, uint32_t splits) {
    gemm_wgmma_tma<bf16, GEMM_WGMMA_WIDE_BN, GEMM_WGMMA_WIDE_STAGES>(
        &map_x, &map_w, bias, res, y, M, N, K, act, partial, per_split, splits);
}

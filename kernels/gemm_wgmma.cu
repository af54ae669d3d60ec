// Y = act(X W^T + bias + residual) on Hopper's warpgroup tensor cores (f16, bf16; sm_90a), fed
// by cp.async: GemmKernel::Wgmma and WgmmaWs. Same layouts and contract as gemm.cu; the TMA-fed
// form is gemm_wgmma_tma.cu. On other architectures the kernels compile to nothing and are not
// launched.
#include "common/gemm_wgmma.cuh"


template <typename T, uint32_t BN, uint32_t STAGES>
__device__ void gemm_wgmma(const T* __restrict__ x, const T* __restrict__ w,
                           const T* __restrict__ bias, const T* __restrict__ res,
                           T* __restrict__ y, uint32_t M, uint32_t N, uint32_t K, int act,
                           float* __restrict__ partial, uint32_t per_split) {
#if WGMMA_AVAILABLE
    constexpr uint32_t BM = GEMM_WGMMA_BM, BK = GEMM_WGMMA_BK, THREADS = GEMM_WGMMA_THREADS;
    constexpr uint32_t ROW = BK * 2;  // bytes per operand row in a stage: one swizzle row
    constexpr uint32_t A_BYTES = BM * ROW, STAGE_BYTES = (BM + BN) * ROW;
    static_assert(ROW == 128, "a k-step is one 128-byte swizzle row per operand row");
    static_assert(BM == 64 * (THREADS / 128), "one 64-row tile per warpgroup");
    static_assert(STAGES >= 3, "a stage is refilled two k-steps after it was read");
    DYN_SHARED(unsigned char, raw);
    // The swizzle acts on shared-window address bits 4-9: the ring starts on 1024 bytes.
    unsigned char* ring = raw + (1024u - wgmma_smem_addr(raw) % 1024u) % 1024u;
    uint32_t ring_addr = wgmma_smem_addr(ring);
    uint32_t tid = threadIdx.x, lane = tid % 32, warp = tid / 32, wg = warp / 4;
    uint32_t m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;  // rows on x: up to 2^31 tiles
    uint32_t k_first, ktiles;
    split_k_steps(partial != nullptr, blockIdx.z, per_split, (K + BK - 1) / BK, k_first, ktiles);

    // One k-step of both operands into a stage: (BM + BN) rows x 8 copies of 16 bytes, eight
    // consecutive threads per row (a row's 128 bytes of global memory in one go). A thread
    // always copies the same chunk of the same rows, so their addresses are set up once.
    constexpr uint32_t ROWS_PER_PASS = THREADS / 8, A_PASSES = BM / ROWS_PER_PASS,
                       B_PASSES = BN / ROWS_PER_PASS;
    static_assert(BM % ROWS_PER_PASS == 0 && BN % ROWS_PER_PASS == 0, "whole passes");
    uint32_t ch = tid % 8, r_first = tid / 8;
    // Rows r_first + i ROWS_PER_PASS; r % 8 is the same for all of them.
    uint32_t dst_first = r_first * ROW + ((ch ^ (r_first % 8)) * 16);
    const T* a_src[A_PASSES];
    const T* b_src[B_PASSES];
    #pragma unroll
    for (uint32_t i = 0; i < A_PASSES; i++) {
        uint32_t r = m0 + r_first + i * ROWS_PER_PASS;
        a_src[i] = r < M ? x + (uint64_t)r * K + ch * 8 : nullptr;
    }
    #pragma unroll
    for (uint32_t i = 0; i < B_PASSES; i++) {
        uint32_t r = n0 + r_first + i * ROWS_PER_PASS;
        b_src[i] = r < N ? w + (uint64_t)r * K + ch * 8 : nullptr;
    }
    auto load = [&](uint32_t stage, uint32_t kt) {
        unsigned char* st = ring + stage * STAGE_BYTES + dst_first;
        uint32_t k0 = kt * BK;
        bool k_in = k0 + ch * 8 < K;
        #pragma unroll
        for (uint32_t i = 0; i < A_PASSES; i++) {
            bool in = k_in && a_src[i];
            cp_async16(st + i * ROWS_PER_PASS * ROW, in ? a_src[i] + k0 : x, in);
        }
        #pragma unroll
        for (uint32_t i = 0; i < B_PASSES; i++) {
            bool in = k_in && b_src[i];
            cp_async16(st + A_BYTES + i * ROWS_PER_PASS * ROW, in ? b_src[i] + k0 : w, in);
        }
    };

    constexpr int NACC = BN / 2;  // accumulators per thread
    float acc[NACC];
    #pragma unroll
    for (int i = 0; i < NACC; i++) acc[i] = 0.0f;

    // Prologue: STAGES - 2 k-steps in flight (empty groups keep the wait count fixed at the end).
    #pragma unroll
    for (uint32_t s = 0; s < STAGES - 2; s++) {
        if (s < ktiles) load(s, k_first + s);
        cp_async_commit();
    }
    for (uint32_t kt = 0; kt < ktiles; kt++) {
        // k-step kt has landed for this thread; the proxy fence hands it to wgmma's reads, the
        // barrier to every warpgroup. Every thread has also waited for its k-step kt - 2
        // multiplies, so that stage may be refilled.
        cp_async_wait<STAGES - 3>();
        fence_proxy_async_shared();
        __syncthreads();
        uint32_t next = kt + STAGES - 2;
        if (next < ktiles) load(next % STAGES, k_first + next);
        cp_async_commit();

        uint32_t stage = ring_addr + (kt % STAGES) * STAGE_BYTES;
        wgmma_kstep<T, BN>(acc, stage + wg * 64 * ROW, stage + A_BYTES);
        wgmma_wait<1>();
    }
    wgmma_wait<0>();
    cp_async_wait<0>();  // only empty groups remain; leave nothing in flight at exit
    wgmma_store<T, BN>(acc, m0 + wg * 64 + (warp % 4) * 16 + lane / 4, n0 + 2 * (lane % 4), y, M,
                       N, bias, res, act, partial ? partial + (uint64_t)blockIdx.z * M * N : nullptr);
#else
    __trap();  // not built for sm_90a: the launcher never picks this kernel here
#endif
}

// Two tile widths: 128 x 256 (m64n256k16, 4 stages of 48 KiB) for GEMMs with enough such tiles
// to fill the GPU, 128 x 128 (m64n128k16, 5 stages of 32 KiB) for the rest.
extern "C" __global__ void __launch_bounds__(GEMM_WGMMA_THREADS, 1)
gemm_wgmma_f16(const f16* x, const f16* w, const f16* bias, const f16* res, f16* y, uint32_t M,
    uint32_t N, uint32_t K, int act, float* partial, uint32_t per_split) {
    gemm_wgmma<f16, GEMM_WGMMA_BN, GEMM_WGMMA_STAGES>(x, w, bias, res, y, M, N, K, act, partial, per_split);
}
extern "C" __global__ void __launch_bounds__(GEMM_WGMMA_THREADS, 1)
gemm_wgmma_bf16(const bf16* x, const bf16* w, const bf16* bias, const bf16* res, bf16* y, uint32_t M,
    uint32_t N, uint32_t K, int act, float* partial, uint32_t per_split) {
    gemm_wgmma<bf16, GEMM_WGMMA_BN, GEMM_WGMMA_STAGES>(x, w, bias, res, y, M, N, K, act, partial, per_split);
}
extern "C" __global__ void __launch_bounds__(GEMM_WGMMA_THREADS, 1)
gemm_wgmma_wide_f16(const f16* x, const f16* w, const f16* bias, const f16* res, f16* y, uint32_t M,
    uint32_t N, uint32_t K, int act, float* partial, uint32_t per_split) {
    gemm_wgmma<f16, GEMM_WGMMA_WIDE_BN, GEMM_WGMMA_WIDE_STAGES>(x, w, bias, res, y, M, N, K, act, partial, per_split);
}
extern "C" __global__ void __launch_bounds__(GEMM_WGMMA_THREADS, 1)
gemm_wgmma_wide_bf16(const bf16* x, const bf16* w, const bf16* bias, const bf16* res, bf16* y, uint32_t M,
    uint32_t N, uint32_t K, int act, float* partial, uint32_t per_split) {
    gemm_wgmma<bf16, GEMM_WGMMA_WIDE_BN, GEMM_WGMMA_WIDE_STAGES>(x, w, bias, res, y, M, N, K, act, partial, per_split);
}

// ---- Hopper, warp-specialised (f16, bf16; sm_90a) --------------------------------------------
//
// The wide tile of gemm_wgmma (128 x 256, 4 stages of 48 KiB) with its roles split: warpgroup 0
// only copies (cp.async, addresses computed as it goes: it keeps 40 registers), warpgroups 1
// and 2 only multiply (64 rows x 256 columns each, 232 registers). No block-wide barrier in
// the loop: stage s is handed over by two mbarriers, full[s] (the producer's 128 threads arrive
// once their copies into it have landed and been fenced for the async proxy) and empty[s] (the
// consumers' 256 threads arrive once their multiplies reading it have completed). The producer
// runs up to STAGES k-steps ahead and signals a stage LAG k-steps after issuing it, so several
// stages' copies are in flight. Same contract and split-K as gemm_wgmma.
// Dynamic shared memory: STAGES * (BM + BN) * BK * 2 + 1024 (alignment) + 2 * STAGES * 8.
template <typename T, uint32_t BN, uint32_t STAGES>
__device__ void gemm_wgmma_ws(const T* __restrict__ x, const T* __restrict__ w,
                              const T* __restrict__ bias, const T* __restrict__ res,
                              T* __restrict__ y, uint32_t M, uint32_t N, uint32_t K, int act,
                              float* __restrict__ partial, uint32_t per_split) {
#if WGMMA_AVAILABLE
    constexpr uint32_t BM = GEMM_WGMMA_BM, BK = GEMM_WGMMA_BK, ROW = BK * 2;
    constexpr uint32_t A_BYTES = BM * ROW, STAGE_BYTES = (BM + BN) * ROW, LAG = 2;
    static_assert(ROW == 128 && BM == 128, "two consumer warpgroups of 64 swizzled rows");
    static_assert(GEMM_WGMMA_WS_THREADS == 384, "one producer and two consumer warpgroups");
    static_assert(LAG + 2 <= STAGES, "the producer signals a stage before it needs it again");
    DYN_SHARED(unsigned char, raw);
    unsigned char* ring = raw + (1024u - wgmma_smem_addr(raw) % 1024u) % 1024u;
    uint32_t ring_addr = wgmma_smem_addr(ring);
    uint64_t* full = reinterpret_cast<uint64_t*>(ring + STAGES * STAGE_BYTES);
    uint64_t* empty = full + STAGES;
    uint32_t tid = threadIdx.x, lane = tid % 32, warp = tid / 32, wg = warp / 4;
    uint32_t m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    uint32_t k_first, ktiles;
    split_k_steps(partial != nullptr, blockIdx.z, per_split, (K + BK - 1) / BK, k_first, ktiles);
    if (tid == 0) {
        for (uint32_t s = 0; s < STAGES; s++) {
            mbar_init(&full[s], 128);
            mbar_init(&empty[s], 256);
        }
    }
    __syncthreads();

    if (wg == 0) {
        // Producer: thread p copies chunk p % 8 of rows p / 8 + 16 i (eight threads per row).
        setmaxnreg_dec<GEMM_WGMMA_WS_PRODUCER_REGS>();
        uint32_t ch = tid % 8, r_first = tid / 8;
        uint32_t dst_first = r_first * ROW + ((ch ^ (r_first % 8)) * 16);
        for (uint32_t kt = 0; kt < ktiles; kt++) {
            uint32_t s = kt % STAGES;
            mbar_wait(&empty[s], ((kt / STAGES) & 1) ^ 1);  // round 0: at once
            unsigned char* st = ring + s * STAGE_BYTES + dst_first;
            uint32_t k = (k_first + kt) * BK + ch * 8;
            bool k_in = k < K;
            for (uint32_t r = r_first; r < BM + BN; r += 16, st += 16 * ROW) {
                bool a = r < BM;
                uint32_t g = a ? m0 + r : n0 + (r - BM);
                bool in = k_in && g < (a ? M : N);
                const T* base = a ? x : w;
                cp_async16(st, in ? base + (uint64_t)g * K + k : base, in);
            }
            cp_async_commit();
            if (kt >= LAG) {  // k-step kt - LAG has landed: hand it over
                cp_async_wait<LAG>();
                fence_proxy_async_shared();
                mbar_arrive(&full[(kt - LAG) % STAGES]);
            }
        }
        cp_async_wait<0>();
        fence_proxy_async_shared();
        for (uint32_t kt = ktiles > LAG ? ktiles - LAG : 0; kt < ktiles; kt++)
            mbar_arrive(&full[kt % STAGES]);
        return;
    }

    // Consumers: warpgroup 1 rows 0-63 of the tile, warpgroup 2 rows 64-127.
    setmaxnreg_inc<GEMM_WGMMA_WS_CONSUMER_REGS>();
    uint32_t cw = wg - 1;
    constexpr int NACC = BN / 2;
    float acc[NACC];
    #pragma unroll
    for (int i = 0; i < NACC; i++) acc[i] = 0.0f;
    for (uint32_t kt = 0; kt < ktiles; kt++) {
        uint32_t s = kt % STAGES;
        mbar_wait(&full[s], (kt / STAGES) & 1);
        uint32_t stage = ring_addr + s * STAGE_BYTES;
        wgmma_kstep<T, BN>(acc, stage + cw * 64 * ROW, stage + A_BYTES);
        wgmma_wait<1>();  // k-step kt - 1's multiplies are complete: its stage is free
        if (kt > 0) mbar_arrive(&empty[(kt - 1) % STAGES]);
    }
    wgmma_wait<0>();
    wgmma_store<T, BN>(acc, m0 + cw * 64 + (warp % 4) * 16 + lane / 4, n0 + 2 * (lane % 4), y, M,
                       N, bias, res, act, partial ? partial + (uint64_t)blockIdx.z * M * N : nullptr);
#else
    __trap();  // not built for sm_90a: the launcher never picks this kernel here
#endif
}

extern "C" __global__ void __launch_bounds__(GEMM_WGMMA_WS_THREADS, 1)
gemm_wgmma_ws_f16(const f16* x, const f16* w, const f16* bias, const f16* res, f16* y, uint32_t M,
    uint32_t N, uint32_t K, int act, float* partial, uint32_t per_split) {
    gemm_wgmma_ws<f16, GEMM_WGMMA_WIDE_BN, GEMM_WGMMA_WIDE_STAGES>(x, w, bias, res, y, M, N, K, act,
                                                                  partial, per_split);
}
extern "C" __global__ void __launch_bounds__(GEMM_WGMMA_WS_THREADS, 1)
gemm_wgmma_ws_bf16(const bf16* x, const bf16* w, const bf16* bias, const bf16* res, bf16* y,
    uint32_t M, uint32_t N, uint32_t K, int act, float* partial, uint32_t per_split) {
    gemm_wgmma_ws<bf16, GEMM_WGMMA_WIDE_BN, GEMM_WGMMA_WIDE_STAGES>(x, w, bias, res, y, M, N, K,
                                                                   act, partial, per_split);
}

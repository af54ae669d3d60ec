// Y = act(X W^T + bias + residual): X [M, K] row-major, W [N, K] row-major (PyTorch Linear layout), Y [M, N].
//
// f16 / bf16: tensor-core GEMM. A block computes a 64x64 tile of Y with 4 warps (2 x 2), each
// warp a 32x32 sub-tile as 2 x 4 mma.m16n8k16 tiles; K advances 32 at a time through shared
// memory (rows padded by 8 halves so the fragment loads of a warp spread over banks). W's rows
// are exactly the column-major B operand the instruction wants, so no transpose is needed.
// f32: a SIMT tiled GEMM (64x64 tile, 16-deep K steps, 4x4 outputs per thread): tensor cores
// would need tf32, which cannot meet f32 accuracy.
// Both: bias and activation fused into the epilogue; any M, N, K (edges are bounds-checked and
// zero-filled).
#include "common/gemm_pipe.cuh"
#include "common/tma.cuh"
#include "common/wgmma.cuh"
#include "common/mbarrier.cuh"

// ---- tensor cores (f16, bf16): GEMM_TC_THREADS (128) threads --------------------------------

#define TC_BK 32
#define TC_LD (TC_BK + 8)

template <typename T>
__device__ void gemm_tc(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                        const T* __restrict__ res, T* __restrict__ y, uint32_t M, uint32_t N,
                        uint32_t K, int act) {
    __shared__ __align__(16) T as[GEMM_BM][TC_LD];
    __shared__ __align__(16) T bs[GEMM_BN][TC_LD];
    uint32_t tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    uint32_t wm = warp / 2, wn = warp % 2, g = lane / 4, t = lane % 4;
    uint32_t m0 = blockIdx.x * GEMM_BM, n0 = blockIdx.y * GEMM_BN;  // rows on x: up to 2^31 tiles
    float acc[2][4][4];
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++)
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;
    T zero = from_f32<T>(0.0f);
    for (uint32_t k0 = 0; k0 < K; k0 += TC_BK) {
        // 64 x 32 elements of each operand, 16 per thread, k fastest.
        for (uint32_t l = tid; l < GEMM_BM * TC_BK; l += GEMM_TC_THREADS) {
            uint32_t r = l / TC_BK, c = l % TC_BK, k = k0 + c;
            as[r][c] = (m0 + r < M && k < K) ? x[(uint64_t)(m0 + r) * K + k] : zero;
            bs[r][c] = (n0 + r < N && k < K) ? w[(uint64_t)(n0 + r) * K + k] : zero;
        }
        __syncthreads();
        for (uint32_t ks = 0; ks < TC_BK; ks += 16) {
            uint32_t af[2][4], bf[4][2];
            for (int i = 0; i < 2; i++) {
                uint32_t r = wm * 32 + i * 16 + g;
                af[i][0] = *reinterpret_cast<const uint32_t*>(&as[r][ks + 2 * t]);
                af[i][1] = *reinterpret_cast<const uint32_t*>(&as[r + 8][ks + 2 * t]);
                af[i][2] = *reinterpret_cast<const uint32_t*>(&as[r][ks + 2 * t + 8]);
                af[i][3] = *reinterpret_cast<const uint32_t*>(&as[r + 8][ks + 2 * t + 8]);
            }
            for (int j = 0; j < 4; j++) {
                uint32_t n = wn * 32 + j * 8 + g;
                bf[j][0] = *reinterpret_cast<const uint32_t*>(&bs[n][ks + 2 * t]);
                bf[j][1] = *reinterpret_cast<const uint32_t*>(&bs[n][ks + 2 * t + 8]);
            }
            for (int i = 0; i < 2; i++)
                for (int j = 0; j < 4; j++) mma_16816<T>(acc[i][j], af[i], bf[j]);
        }
        __syncthreads();
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            uint32_t r = m0 + wm * 32 + i * 16 + g, c = n0 + wn * 32 + j * 8 + 2 * t;
            store_out(y, M, N, r, c, acc[i][j][0], bias, res, act);
            store_out(y, M, N, r, c + 1, acc[i][j][1], bias, res, act);
            store_out(y, M, N, r + 8, c, acc[i][j][2], bias, res, act);
            store_out(y, M, N, r + 8, c + 1, acc[i][j][3], bias, res, act);
        }
}

// ---- SIMT (f32): GEMM_SIMT_THREADS (256) threads ----------------------------------------------

#define F32_BK 16

__device__ void gemm_simt(const float* __restrict__ x, const float* __restrict__ w,
                          const float* __restrict__ bias, const float* __restrict__ res,
                          float* __restrict__ y, uint32_t M, uint32_t N, uint32_t K, int act) {
    __shared__ float as[F32_BK][GEMM_BM + 4];
    __shared__ float bs[F32_BK][GEMM_BN + 4];
    uint32_t tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    uint32_t m0 = blockIdx.x * GEMM_BM, n0 = blockIdx.y * GEMM_BN;  // rows on x: up to 2^31 tiles
    float acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
    for (uint32_t k0 = 0; k0 < K; k0 += F32_BK) {
        for (uint32_t l = tid; l < GEMM_BM * F32_BK; l += GEMM_SIMT_THREADS) {
            uint32_t r = l / F32_BK, c = l % F32_BK, k = k0 + c;
            as[c][r] = (m0 + r < M && k < K) ? x[(uint64_t)(m0 + r) * K + k] : 0.0f;
            bs[c][r] = (n0 + r < N && k < K) ? w[(uint64_t)(n0 + r) * K + k] : 0.0f;
        }
        __syncthreads();
        for (uint32_t kk = 0; kk < F32_BK; kk++) {
            float a[4], b[4];
            for (int i = 0; i < 4; i++) a[i] = as[kk][ty * 4 + i];
            for (int j = 0; j < 4; j++) b[j] = bs[kk][tx * 4 + j];
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++)
            store_out(y, M, N, m0 + ty * 4 + i, n0 + tx * 4 + j, acc[i][j], bias, res, act);
}

extern "C" __global__ void gemm_f32(const float* x, const float* w, const float* bias,
                                    const float* res, float* y, uint32_t M, uint32_t N,
                                    uint32_t K, int act) {
    gemm_simt(x, w, bias, res, y, M, N, K, act);
}
extern "C" __global__ void gemm_f16(const f16* x, const f16* w, const f16* bias, const f16* res,
                                    f16* y, uint32_t M, uint32_t N, uint32_t K, int act) {
    gemm_tc(x, w, bias, res, y, M, N, K, act);
}
extern "C" __global__ void gemm_bf16(const bf16* x, const bf16* w, const bf16* bias,
                                     const bf16* res, bf16* y, uint32_t M, uint32_t N, uint32_t K,
                                     int act) {
    gemm_tc(x, w, bias, res, y, M, N, K, act);
}

// The pipelined kernel (common/gemm_pipe.cuh) in its three shapes.
extern "C" __global__ void __launch_bounds__(GEMM_PIPE_BIG_THREADS)
gemm_pipe_big_f16(const f16* x, const f16* w, const f16* bias, const f16* res, f16* y,
    uint32_t M, uint32_t N, uint32_t K, int act, float* partial, uint32_t per_split) {
    gemm_pipe_as<PipeBig>(DenseRows<f16>{x, M, K}, w, bias, res, y, M, N, K, act, partial, per_split);
}
extern "C" __global__ void __launch_bounds__(GEMM_PIPE_BIG_THREADS)
gemm_pipe_big_bf16(const bf16* x, const bf16* w, const bf16* bias, const bf16* res, bf16* y,
    uint32_t M, uint32_t N, uint32_t K, int act, float* partial, uint32_t per_split) {
    gemm_pipe_as<PipeBig>(DenseRows<bf16>{x, M, K}, w, bias, res, y, M, N, K, act, partial, per_split);
}
extern "C" __global__ void __launch_bounds__(GEMM_PIPE_BIG4_THREADS)
gemm_pipe_big4_f16(const f16* x, const f16* w, const f16* bias, const f16* res, f16* y,
    uint32_t M, uint32_t N, uint32_t K, int act, float* partial, uint32_t per_split) {
    gemm_pipe_as<PipeBig4>(DenseRows<f16>{x, M, K}, w, bias, res, y, M, N, K, act, partial, per_split);
}
extern "C" __global__ void __launch_bounds__(GEMM_PIPE_BIG4_THREADS)
gemm_pipe_big4_bf16(const bf16* x, const bf16* w, const bf16* bias, const bf16* res, bf16* y,
    uint32_t M, uint32_t N, uint32_t K, int act, float* partial, uint32_t per_split) {
    gemm_pipe_as<PipeBig4>(DenseRows<bf16>{x, M, K}, w, bias, res, y, M, N, K, act, partial, per_split);
}
extern "C" __global__ void __launch_bounds__(GEMM_PIPE_SMALL_THREADS)
gemm_pipe_small_f16(const f16* x, const f16* w, const f16* bias, const f16* res, f16* y,
    uint32_t M, uint32_t N, uint32_t K, int act, float* partial, uint32_t per_split) {
    gemm_pipe_as<PipeSmall>(DenseRows<f16>{x, M, K}, w, bias, res, y, M, N, K, act, partial, per_split);
}
extern "C" __global__ void __launch_bounds__(GEMM_PIPE_SMALL_THREADS)
gemm_pipe_small_bf16(const bf16* x, const bf16* w, const bf16* bias, const bf16* res, bf16* y,
    uint32_t M, uint32_t N, uint32_t K, int act, float* partial, uint32_t per_split) {
    gemm_pipe_as<PipeSmall>(DenseRows<bf16>{x, M, K}, w, bias, res, y, M, N, K, act, partial, per_split);
}

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
            for (int i = 0; i < 2; i++) {
                uint32_t r = r0 + 8 * i, c = c0 + 8 * j;
                if (r >= M) continue;
                if (c < N) p[(uint64_t)r * N + c] = acc[4 * j + 2 * i];
                if (c + 1 < N) p[(uint64_t)r * N + c + 1] = acc[4 * j + 2 * i + 1];
            }
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
    uint32_t ktiles_all = (K + BK - 1) / BK, k_first = 0, ktiles = ktiles_all;
    if (partial) {
        k_first = blockIdx.z * per_split;
        uint32_t end = k_first + per_split < ktiles_all ? k_first + per_split : ktiles_all;
        ktiles = end - k_first;  // the launcher leaves no split empty
    }

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
    uint32_t ktiles_all = (K + BK - 1) / BK, k_first = 0, ktiles = ktiles_all;
    if (partial) {
        k_first = blockIdx.z * per_split;
        uint32_t end = k_first + per_split < ktiles_all ? k_first + per_split : ktiles_all;
        ktiles = end - k_first;
    }
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
        k_first = splits > 1 ? z * per_split : 0;
        uint32_t end = splits > 1 && k_first + per_split < ktiles_all ? k_first + per_split
                                                                      : ktiles_all;
        ktiles = end - k_first;  // the launcher leaves no split empty
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

// The second half of a split-K GEMM: y = act(sum of the splits' partial sums + bias +
// residual), one thread per output, grid-stride.
template <typename T>
__device__ void splitk_reduce(const float* __restrict__ partial, uint32_t splits,
                              const T* __restrict__ bias, const T* __restrict__ res,
                              T* __restrict__ y, uint32_t M, uint32_t N, int act) {
    uint64_t total = (uint64_t)M * N;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (uint64_t)gridDim.x * blockDim.x) {
        float v = 0.0f;
        for (uint32_t z = 0; z < splits; z++) v += partial[z * total + i];
        store_out(y, M, N, (uint32_t)(i / N), (uint32_t)(i % N), v, bias, res, act);
    }
}
extern "C" __global__ void gemm_splitk_reduce_f16(const float* partial, uint32_t splits,
                                                  const f16* bias, const f16* res, f16* y,
                                                  uint32_t M, uint32_t N, int act) {
    splitk_reduce(partial, splits, bias, res, y, M, N, act);
}
extern "C" __global__ void gemm_splitk_reduce_bf16(const float* partial, uint32_t splits,
                                                   const bf16* bias, const bf16* res, bf16* y,
                                                   uint32_t M, uint32_t N, int act) {
    splitk_reduce(partial, splits, bias, res, y, M, N, act);
}

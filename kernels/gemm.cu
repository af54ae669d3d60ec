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

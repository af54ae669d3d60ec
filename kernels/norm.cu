// Row normalisations, statistics in f32 whatever the storage dtype: residual add + LayerNorm,
// fused, and L2 normalisation. Each in two kernels: one block per row (the reference; the
// LayerNorm keeps the row in shared memory between the mean and variance passes) and one warp
// per row with the row in registers (`RowKernel::Warp`).
#include "common/apparate.cuh"

template <typename T>
__device__ void add_layernorm(const T* __restrict__ x, const T* __restrict__ res,
                              const T* __restrict__ gamma, const T* __restrict__ beta,
                              T* __restrict__ out, uint32_t cols, float eps) {
    DYN_SHARED(float, row);  // cols values, then 32 floats of reduction scratch
    float* scratch = row + cols;
    uint64_t base = (uint64_t)blockIdx.x * cols;
    float local = 0.0f;
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = to_f32(x[base + c]) + to_f32(res[base + c]);
        row[c] = v;
        local += v;
    }
    layernorm_shared_row(row, local, cols, gamma, beta, eps, out + base, scratch);
}

extern "C" __global__ void add_layernorm_f32(const float* x, const float* res, const float* gamma,
                                             const float* beta, float* out, uint32_t cols, float eps) {
    add_layernorm(x, res, gamma, beta, out, cols, eps);
}
extern "C" __global__ void add_layernorm_f16(const f16* x, const f16* res, const f16* gamma,
                                             const f16* beta, f16* out, uint32_t cols, float eps) {
    add_layernorm(x, res, gamma, beta, out, cols, eps);
}
extern "C" __global__ void add_layernorm_bf16(const bf16* x, const bf16* res, const bf16* gamma,
                                              const bf16* beta, bf16* out, uint32_t cols, float eps) {
    add_layernorm(x, res, gamma, beta, out, cols, eps);
}

// The same, one warp per row (LN_WARP_ROWS rows per block) with the row in registers and
// 16-byte loads and stores: no shared memory and no block barrier. For rows of cols % (16 /
// sizeof(T)) == 0 up to LN_WARP_MAX_COLS and 16-byte aligned tensors (the launcher checks).
// `RowKernel::Warp`; the block-per-row kernel above is its reference.

template <typename T>
__device__ void add_layernorm_warp(const T* __restrict__ x, const T* __restrict__ res,
                                   const T* __restrict__ gamma, const T* __restrict__ beta,
                                   T* __restrict__ out, uint32_t rows, uint32_t cols, float eps) {
    constexpr int E = WarpRowShape<T>::E, V = WarpRowShape<T>::V;
    uint32_t lane = warp_lane(), row = warp_row();
    if (row >= rows) return;  // no block barrier below
    uint32_t nv = cols / E;
    uint64_t base = (uint64_t)row * cols;
    float v[V][E];
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < V; i++) {
        uint32_t j = lane + 32 * i;
        if (j >= nv) break;
        float b[E];
        load_vec16(x + base + (uint64_t)j * E, v[i]);
        load_vec16(res + base + (uint64_t)j * E, b);
#pragma unroll
        for (int e = 0; e < E; e++) {
            v[i][e] += b[e];
            sum += v[i][e];
        }
    }
    warp_layernorm_row(v, sum, lane, nv, cols, gamma, beta, eps, out + base);
}

extern "C" __global__ void add_layernorm_warp_f32(const float* x, const float* res,
                                                  const float* gamma, const float* beta,
                                                  float* out, uint32_t rows, uint32_t cols,
                                                  float eps) {
    add_layernorm_warp(x, res, gamma, beta, out, rows, cols, eps);
}
extern "C" __global__ void add_layernorm_warp_f16(const f16* x, const f16* res, const f16* gamma,
                                                  const f16* beta, f16* out, uint32_t rows,
                                                  uint32_t cols, float eps) {
    add_layernorm_warp(x, res, gamma, beta, out, rows, cols, eps);
}
extern "C" __global__ void add_layernorm_warp_bf16(const bf16* x, const bf16* res,
                                                   const bf16* gamma, const bf16* beta,
                                                   bf16* out, uint32_t rows, uint32_t cols,
                                                   float eps) {
    add_layernorm_warp(x, res, gamma, beta, out, rows, cols, eps);
}

// One block per row: x / max(||x||, 1e-12).
template <typename T>
__device__ void l2_normalize(const T* __restrict__ x, T* __restrict__ out, uint32_t cols) {
    __shared__ float scratch[ROW_SCRATCH];
    const T* r = x + (uint64_t)blockIdx.x * cols;
    float sq = 0.0f;
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = to_f32(r[c]);
        sq += v * v;
    }
    float inv = 1.0f / fmaxf(sqrtf(block_sum(sq, scratch)), 1e-12f);
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x)
        out[(uint64_t)blockIdx.x * cols + c] = from_f32<T>(to_f32(r[c]) * inv);
}

extern "C" __global__ void l2_normalize_f32(const float* x, float* out, uint32_t cols) { l2_normalize(x, out, cols); }
extern "C" __global__ void l2_normalize_f16(const f16* x, f16* out, uint32_t cols) { l2_normalize(x, out, cols); }
extern "C" __global__ void l2_normalize_bf16(const bf16* x, bf16* out, uint32_t cols) { l2_normalize(x, out, cols); }

// The same, one warp per row (`RowKernel::Warp`, the layout and limits of add_layernorm_warp).
template <typename T>
__device__ void l2_normalize_warp(const T* __restrict__ x, T* __restrict__ out, uint32_t rows,
                                  uint32_t cols) {
    constexpr int E = WarpRowShape<T>::E, V = WarpRowShape<T>::V;
    uint32_t lane = warp_lane(), row = warp_row();
    if (row >= rows) return;  // no block barrier below
    uint32_t nv = cols / E;
    uint64_t base = (uint64_t)row * cols;
    float v[V][E];
    warp_row_load(x + base, lane, nv, v);
    float sq = 0.0f;
#pragma unroll
    for (int i = 0; i < V; i++) {
        if (lane + 32 * i >= nv) break;
#pragma unroll
        for (int e = 0; e < E; e++) sq += v[i][e] * v[i][e];
    }
    warp_row_store_scaled(out + base, lane, nv, v, 1.0f / fmaxf(sqrtf(warp_sum(sq)), 1e-12f));
}

extern "C" __global__ void l2_normalize_warp_f32(const float* x, float* out, uint32_t rows, uint32_t cols) { l2_normalize_warp(x, out, rows, cols); }
extern "C" __global__ void l2_normalize_warp_f16(const f16* x, f16* out, uint32_t rows, uint32_t cols) { l2_normalize_warp(x, out, rows, cols); }
extern "C" __global__ void l2_normalize_warp_bf16(const bf16* x, bf16* out, uint32_t rows, uint32_t cols) { l2_normalize_warp(x, out, rows, cols); }

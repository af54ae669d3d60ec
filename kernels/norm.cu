// Row normalisations, one block per row, statistics in f32 whatever the storage dtype: residual
// add + LayerNorm, fused (the row kept in shared memory between the mean and variance passes),
// and L2 normalisation.
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

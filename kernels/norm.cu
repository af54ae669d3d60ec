// Residual add + LayerNorm, fused: one block per row, the row kept in shared memory between the
// mean and variance passes; statistics in f32 whatever the storage dtype.
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
    float mean = block_sum(local, scratch) / (float)cols;
    float sq = 0.0f;
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x) {
        float d = row[c] - mean;
        sq += d * d;
    }
    float inv = rsqrtf(block_sum(sq, scratch) / (float)cols + eps);
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x)
        out[base + c] = from_f32<T>((row[c] - mean) * inv * to_f32(gamma[c]) + to_f32(beta[c]));
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

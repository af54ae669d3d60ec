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

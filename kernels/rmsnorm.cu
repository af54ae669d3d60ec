// RMSNorm of rows, with the residual add fused: h = x + res (res may be null: h = x), written
// to h_out when it is not null, and y = h / sqrt(mean(h^2) + eps) * gamma. One block per row,
// the row kept in shared memory between the sum of squares and the scaling.
#include "common/apparate.cuh"

template <typename T>
__device__ void rms_norm(const T* __restrict__ x, const T* __restrict__ res,
                         const T* __restrict__ gamma, T* __restrict__ h_out, T* __restrict__ y,
                         uint32_t cols, float eps) {
    DYN_SHARED(float, row);  // cols values, then 32 floats of reduction scratch
    float* scratch = row + cols;
    uint64_t base = (uint64_t)blockIdx.x * cols;
    float sq = 0.0f;
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = to_f32(x[base + c]);
        if (res) v += to_f32(res[base + c]);
        // h is stored (and normalised) as the storage dtype holds it, as the CPU sees it.
        T hv = from_f32<T>(v);
        if (h_out) h_out[base + c] = hv;
        v = to_f32(hv);
        row[c] = v;
        sq += v * v;
    }
    float inv = rsqrtf(block_sum(sq, scratch) / (float)cols + eps);
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x)
        y[base + c] = from_f32<T>(row[c] * inv * to_f32(gamma[c]));
}

extern "C" __global__ void rms_norm_f32(const float* x, const float* res, const float* gamma,
                                        float* h_out, float* y, uint32_t cols, float eps) {
    rms_norm(x, res, gamma, h_out, y, cols, eps);
}
extern "C" __global__ void rms_norm_f16(const f16* x, const f16* res, const f16* gamma,
                                        f16* h_out, f16* y, uint32_t cols, float eps) {
    rms_norm(x, res, gamma, h_out, y, cols, eps);
}
extern "C" __global__ void rms_norm_bf16(const bf16* x, const bf16* res, const bf16* gamma,
                                         bf16* h_out, bf16* y, uint32_t cols, float eps) {
    rms_norm(x, res, gamma, h_out, y, cols, eps);
}

// The SwiGLU product of a LLaMA MLP: x is [m, 2f] (the gate projection's f values, then the up
// projection's), y = silu(gate) * up, [m, f]. Grid-stride, one thread per output.
#include "common/apparate.cuh"

template <typename T>
__device__ void silu_mul(const T* __restrict__ x, T* __restrict__ y, uint32_t m, uint32_t f) {
    uint64_t total = (uint64_t)m * f;
    uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t t = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += stride) {
        uint64_t r = t / f, c = t % f;
        float g = to_f32(x[r * 2 * f + c]), u = to_f32(x[r * 2 * f + f + c]);
        y[t] = from_f32<T>(g / (1.0f + expf(-g)) * u);
    }
}

extern "C" __global__ void silu_mul_f32(const float* x, float* y, uint32_t m, uint32_t f) { silu_mul(x, y, m, f); }
extern "C" __global__ void silu_mul_f16(const f16* x, f16* y, uint32_t m, uint32_t f) { silu_mul(x, y, m, f); }
extern "C" __global__ void silu_mul_bf16(const bf16* x, bf16* y, uint32_t m, uint32_t f) { silu_mul(x, y, m, f); }

// Casts between storage dtypes (f32 <-> f16 / bf16), round to nearest even.
#include "common/apparate.cuh"

template <typename From, typename To>
__device__ void cast(const From* __restrict__ x, To* __restrict__ y, uint32_t n) {
    uint32_t stride = gridDim.x * blockDim.x;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        y[i] = from_f32<To>(to_f32(x[i]));
}

extern "C" __global__ void cast_f32_f16(const float* x, f16* y, uint32_t n) { cast(x, y, n); }
extern "C" __global__ void cast_f32_bf16(const float* x, bf16* y, uint32_t n) { cast(x, y, n); }
extern "C" __global__ void cast_f16_f32(const f16* x, float* y, uint32_t n) { cast(x, y, n); }
extern "C" __global__ void cast_bf16_f32(const bf16* x, float* y, uint32_t n) { cast(x, y, n); }

// A plain copy: the practical memory-bandwidth ceiling the memory-bound kernels are measured
// against in the kernel benchmarks.
extern "C" __global__ void copy_u32(const uint32_t* x, uint32_t* y, uint32_t n) {
    uint32_t stride = gridDim.x * blockDim.x;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) y[i] = x[i];
}

// Casts between storage dtypes (f32 <-> f16 / bf16), round to nearest even; copies (plain,
// and a gather of rows).
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

// Row gather: y[i] = x[rows[i]] ([n, cols] from [*, cols]). Grid-stride.
template <typename T>
__device__ void gather_rows(const T* __restrict__ x, const int32_t* __restrict__ rows,
                            T* __restrict__ y, uint32_t n, uint32_t cols) {
    uint64_t total = (uint64_t)n * cols;
    uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t t = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += stride)
        y[t] = x[(uint64_t)rows[t / cols] * cols + t % cols];
}

extern "C" __global__ void gather_rows_f32(const float* x, const int32_t* rows, float* y, uint32_t n, uint32_t cols) { gather_rows(x, rows, y, n, cols); }
extern "C" __global__ void gather_rows_f16(const f16* x, const int32_t* rows, f16* y, uint32_t n, uint32_t cols) { gather_rows(x, rows, y, n, cols); }
extern "C" __global__ void gather_rows_bf16(const bf16* x, const int32_t* rows, bf16* y, uint32_t n, uint32_t cols) { gather_rows(x, rows, y, n, cols); }

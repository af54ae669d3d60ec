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

// The same in 16-byte vectors (`n` of them, both buffers 16-byte aligned), unrolled so each
// thread has four loads in flight: what a well-written memory-bound kernel can reach, the
// yardstick the row kernels are read against (copy_u32 reached 64% of an H200's bandwidth).
extern "C" __global__ void copy_vec16(const Vec16* __restrict__ x, Vec16* __restrict__ y,
                                      uint32_t n) {
    uint32_t stride = gridDim.x * blockDim.x;
    uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        Vec16 a = x[i], b = x[i + stride], c = x[i + 2 * stride], d = x[i + 3 * stride];
        y[i] = a;
        y[i + stride] = b;
        y[i + 2 * stride] = c;
        y[i + 3 * stride] = d;
    }
    for (; i < n; i += stride) y[i] = x[i];
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

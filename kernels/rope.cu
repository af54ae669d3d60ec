// Rotary position embeddings, in place: in each row, the first `heads` heads of `head_dim`
// have every adjacent pair (2i, 2i + 1) rotated by positions[row] * base^(-2i / head_dim)
// (GGUF's pairing). One thread per pair, grid-stride.
#include "common/apparate.cuh"

template <typename T>
__device__ void rope(T* __restrict__ x, const int32_t* __restrict__ positions, uint32_t rows,
                     uint32_t cols, uint32_t heads, uint32_t head_dim, float base) {
    uint32_t half = head_dim / 2, per_row = heads * half;
    uint64_t total = (uint64_t)rows * per_row;
    uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t t = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += stride) {
        uint32_t r = (uint32_t)(t / per_row), k = (uint32_t)(t % per_row);
        uint32_t h = k / half, i = k % half;
        float inv_freq = powf(base, -2.0f * (float)i / (float)head_dim);
        float s, c;
        sincosf((float)positions[r] * inv_freq, &s, &c);
        T* p = x + (uint64_t)r * cols + (uint64_t)h * head_dim + 2 * i;
        float a = to_f32(p[0]), b = to_f32(p[1]);
        p[0] = from_f32<T>(a * c - b * s);
        p[1] = from_f32<T>(a * s + b * c);
    }
}

extern "C" __global__ void rope_f32(float* x, const int32_t* positions, uint32_t rows,
                                    uint32_t cols, uint32_t heads, uint32_t head_dim, float base) {
    rope(x, positions, rows, cols, heads, head_dim, base);
}
extern "C" __global__ void rope_f16(f16* x, const int32_t* positions, uint32_t rows,
                                    uint32_t cols, uint32_t heads, uint32_t head_dim, float base) {
    rope(x, positions, rows, cols, heads, head_dim, base);
}
extern "C" __global__ void rope_bf16(bf16* x, const int32_t* positions, uint32_t rows,
                                     uint32_t cols, uint32_t heads, uint32_t head_dim, float base) {
    rope(x, positions, rows, cols, heads, head_dim, base);
}

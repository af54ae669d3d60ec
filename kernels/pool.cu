// Pooling of token states into one vector per input, and L2 normalisation of rows. f32
// arithmetic, any storage dtype.
#include "common/apparate.cuh"

#define POOL_MEAN 0
#define POOL_CLS 1

// One block per input; threads over columns.
template <typename T>
__device__ void pool(const T* __restrict__ x, const int32_t* __restrict__ lengths,
                     T* __restrict__ out, uint32_t seq, uint32_t width, int mode) {
    uint32_t b = blockIdx.x, len = mode == POOL_CLS ? 1u : (uint32_t)lengths[b];
    const T* rows = x + (uint64_t)b * seq * width;
    for (uint32_t c = threadIdx.x; c < width; c += blockDim.x) {
        float acc = 0.0f;
        for (uint32_t r = 0; r < len; r++) acc += to_f32(rows[(uint64_t)r * width + c]);
        out[(uint64_t)b * width + c] = from_f32<T>(acc / (float)len);
    }
}

// One block per row: x / max(||x||, 1e-12).
template <typename T>
__device__ void l2_normalize(const T* __restrict__ x, T* __restrict__ out, uint32_t cols) {
    __shared__ float scratch[32];
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

extern "C" __global__ void pool_f32(const float* x, const int32_t* lengths, float* out, uint32_t seq, uint32_t width, int mode) { pool(x, lengths, out, seq, width, mode); }
extern "C" __global__ void pool_f16(const f16* x, const int32_t* lengths, f16* out, uint32_t seq, uint32_t width, int mode) { pool(x, lengths, out, seq, width, mode); }
extern "C" __global__ void pool_bf16(const bf16* x, const int32_t* lengths, bf16* out, uint32_t seq, uint32_t width, int mode) { pool(x, lengths, out, seq, width, mode); }
extern "C" __global__ void l2_normalize_f32(const float* x, float* out, uint32_t cols) { l2_normalize(x, out, cols); }
extern "C" __global__ void l2_normalize_f16(const f16* x, f16* out, uint32_t cols) { l2_normalize(x, out, cols); }
extern "C" __global__ void l2_normalize_bf16(const bf16* x, bf16* out, uint32_t cols) { l2_normalize(x, out, cols); }

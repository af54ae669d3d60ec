// Pooling: token states into one vector per input, 2-D max/average windows and global average
// pooling over NHWC images. f32 arithmetic, any storage dtype.
#include "common/apparate.cuh"

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

extern "C" __global__ void pool_f32(const float* x, const int32_t* lengths, float* out, uint32_t seq, uint32_t width, int mode) { pool(x, lengths, out, seq, width, mode); }
extern "C" __global__ void pool_f16(const f16* x, const int32_t* lengths, f16* out, uint32_t seq, uint32_t width, int mode) { pool(x, lengths, out, seq, width, mode); }
extern "C" __global__ void pool_bf16(const bf16* x, const int32_t* lengths, bf16* out, uint32_t seq, uint32_t width, int mode) { pool(x, lengths, out, seq, width, mode); }

// Max / average pooling over NHWC windows, one thread per output element; averages count only
// the pixels inside the input (padding excluded).
template <typename T>
__device__ void pool2d(const T* __restrict__ x, T* __restrict__ out, uint32_t n, uint32_t h,
                       uint32_t w, uint32_t c, uint32_t oh, uint32_t ow, uint32_t kh,
                       uint32_t kw, uint32_t sh, uint32_t sw, uint32_t ph, uint32_t pw,
                       int is_max) {
    uint64_t total = (uint64_t)n * oh * ow * c, stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t e = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        uint32_t ch = (uint32_t)(e % c);
        uint64_t r = e / c;
        uint32_t xo = (uint32_t)(r % ow), y = (uint32_t)((r / ow) % oh), b = (uint32_t)(r / ((uint64_t)oh * ow));
        float acc = is_max ? -3.402823466e38f : 0.0f;
        uint32_t count = 0;
        for_each_tap(y, xo, h, w, kh, kw, sh, sw, ph, pw,
                     [&](uint32_t, uint32_t, uint32_t iy, uint32_t ix) {
                         float v = to_f32(x[(((uint64_t)b * h + iy) * w + ix) * c + ch]);
                         acc = is_max ? fmaxf(acc, v) : acc + v;
                         count++;
                     });
        out[e] = from_f32<T>(is_max ? acc : acc / (float)(count ? count : 1));
    }
}

// [n, hw, c] -> [n, c]: one thread per output element.
template <typename T>
__device__ void global_avg_pool(const T* __restrict__ x, T* __restrict__ out, uint32_t n,
                                uint32_t hw, uint32_t c) {
    uint64_t total = (uint64_t)n * c, stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t e = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        uint64_t b = e / c, ch = e % c;
        float acc = 0.0f;
        for (uint32_t p = 0; p < hw; p++) acc += to_f32(x[(b * hw + p) * c + ch]);
        out[e] = from_f32<T>(acc / (float)hw);
    }
}

#define POOL2D_ARGS uint32_t n, uint32_t h, uint32_t w, uint32_t c, uint32_t oh, uint32_t ow, \
    uint32_t kh, uint32_t kw, uint32_t sh, uint32_t sw, uint32_t ph, uint32_t pw, int is_max
#define POOL2D_PASS n, h, w, c, oh, ow, kh, kw, sh, sw, ph, pw, is_max
extern "C" __global__ void pool2d_f32(const float* x, float* out, POOL2D_ARGS) { pool2d(x, out, POOL2D_PASS); }
extern "C" __global__ void pool2d_f16(const f16* x, f16* out, POOL2D_ARGS) { pool2d(x, out, POOL2D_PASS); }
extern "C" __global__ void pool2d_bf16(const bf16* x, bf16* out, POOL2D_ARGS) { pool2d(x, out, POOL2D_PASS); }
extern "C" __global__ void global_avg_pool_f32(const float* x, float* out, uint32_t n, uint32_t hw, uint32_t c) { global_avg_pool(x, out, n, hw, c); }
extern "C" __global__ void global_avg_pool_f16(const f16* x, f16* out, uint32_t n, uint32_t hw, uint32_t c) { global_avg_pool(x, out, n, hw, c); }
extern "C" __global__ void global_avg_pool_bf16(const bf16* x, bf16* out, uint32_t n, uint32_t hw, uint32_t c) { global_avg_pool(x, out, n, hw, c); }

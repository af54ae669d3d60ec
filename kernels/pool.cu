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

// The same, vectorised (`RowKernel::Warp`; widths of width % (16 / sizeof(T)) == 0 and 16-byte
// aligned tensors: the launcher checks): one block per (input, chunk of 32 16-byte column
// vectors), its POOL_WARPS warps taking every POOL_WARPS-th row, each lane summing one vector
// of columns; the warps' sums meet in shared memory. The block kernel ran one block per input
// whose threads walked all its rows in turn: at batch 8, 8 blocks on a GPU of 132
// multiprocessors.
template <typename T>
__device__ void pool_warp(const T* __restrict__ x, const int32_t* __restrict__ lengths,
                          T* __restrict__ out, uint32_t seq, uint32_t width, int mode,
                          uint32_t chunks) {
    constexpr int E = WarpRowShape<T>::E;
    __shared__ float part[POOL_WARPS][E][32];  // [warp][element][lane]: no bank conflicts
    uint32_t b = blockIdx.x / chunks, lane = warp_lane(), warp = threadIdx.x / 32;
    uint32_t j = (blockIdx.x % chunks) * 32 + lane, nv = width / E;
    uint32_t len = mode == POOL_CLS ? 1u : (uint32_t)lengths[b];
    float acc[E];
#pragma unroll
    for (int e = 0; e < E; e++) acc[e] = 0.0f;
    if (j < nv) {
        const T* col = x + (uint64_t)b * seq * width + (uint64_t)j * E;
#pragma unroll 4
        for (uint32_t r = warp; r < len; r += POOL_WARPS) {
            float v[E];
            load_vec16(col + (uint64_t)r * width, v);
#pragma unroll
            for (int e = 0; e < E; e++) acc[e] += v[e];
        }
    }
#pragma unroll
    for (int e = 0; e < E; e++) part[warp][e][lane] = acc[e];
    __syncthreads();
    if (warp != 0 || j >= nv) return;
    float s[E];
#pragma unroll
    for (int e = 0; e < E; e++) {
        s[e] = 0.0f;
        for (int w = 0; w < POOL_WARPS; w++) s[e] += part[w][e][lane];
        s[e] /= (float)len;
    }
    store_vec16(out + (uint64_t)b * width + (uint64_t)j * E, s);
}

#define POOL_WARP_ARGS(T) const T* x, const int32_t* lengths, T* out, uint32_t seq, \
    uint32_t width, int mode, uint32_t chunks
extern "C" __global__ void pool_warp_f32(POOL_WARP_ARGS(float)) { pool_warp(x, lengths, out, seq, width, mode, chunks); }
extern "C" __global__ void pool_warp_f16(POOL_WARP_ARGS(f16)) { pool_warp(x, lengths, out, seq, width, mode, chunks); }
extern "C" __global__ void pool_warp_bf16(POOL_WARP_ARGS(bf16)) { pool_warp(x, lengths, out, seq, width, mode, chunks); }

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

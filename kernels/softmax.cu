// Row softmax (the classifier head's probabilities), numerically stable, f32 arithmetic, any
// storage dtype. Attention's scale + mask + softmax is fused into attention.cu instead.
#include "common/apparate.cuh"

// One block per row: numerically stable softmax.
template <typename T>
__device__ void softmax(const T* __restrict__ x, T* __restrict__ out, uint32_t cols) {
    __shared__ float scratch[ROW_SCRATCH];
    const T* r = x + (uint64_t)blockIdx.x * cols;
    float mx = -3.402823466e38f;
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x) mx = fmaxf(mx, to_f32(r[c]));
    mx = block_max(mx, scratch);
    float sum = 0.0f;
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x) sum += expf(to_f32(r[c]) - mx);
    float inv = 1.0f / block_sum(sum, scratch);
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x)
        out[(uint64_t)blockIdx.x * cols + c] = from_f32<T>(expf(to_f32(r[c]) - mx) * inv);
}

extern "C" __global__ void softmax_f32(const float* x, float* out, uint32_t cols) { softmax(x, out, cols); }
extern "C" __global__ void softmax_f16(const f16* x, f16* out, uint32_t cols) { softmax(x, out, cols); }
extern "C" __global__ void softmax_bf16(const bf16* x, bf16* out, uint32_t cols) { softmax(x, out, cols); }

// The same, one warp per row (LN_WARP_ROWS rows per block) with the row in registers and
// 16-byte loads and stores (`RowKernel::Warp`; rows of cols % (16 / sizeof(T)) == 0 up to
// LN_WARP_MAX_COLS, 16-byte aligned tensors: the launcher checks). One read and one write of
// the row instead of the block kernel's three reads, and no block barriers.
template <typename T>
__device__ void softmax_warp(const T* __restrict__ x, T* __restrict__ out, uint32_t rows,
                             uint32_t cols) {
    constexpr int E = WarpRowShape<T>::E, V = WarpRowShape<T>::V;
    uint32_t lane = warp_lane(), row = warp_row();
    if (row >= rows) return;  // no block barrier below
    uint32_t nv = cols / E;
    uint64_t base = (uint64_t)row * cols;
    float v[V][E];
    warp_row_load(x + base, lane, nv, v);
    float mx = -3.402823466e38f;
#pragma unroll
    for (int i = 0; i < V; i++) {
        if (lane + 32 * i >= nv) break;
#pragma unroll
        for (int e = 0; e < E; e++) mx = fmaxf(mx, v[i][e]);
    }
    mx = warp_max(mx);
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < V; i++) {
        if (lane + 32 * i >= nv) break;
#pragma unroll
        for (int e = 0; e < E; e++) {
            v[i][e] = expf(v[i][e] - mx);
            sum += v[i][e];
        }
    }
    warp_row_store_scaled(out + base, lane, nv, v, 1.0f / warp_sum(sum));
}

extern "C" __global__ void softmax_warp_f32(const float* x, float* out, uint32_t rows, uint32_t cols) { softmax_warp(x, out, rows, cols); }
extern "C" __global__ void softmax_warp_f16(const f16* x, f16* out, uint32_t rows, uint32_t cols) { softmax_warp(x, out, rows, cols); }
extern "C" __global__ void softmax_warp_bf16(const bf16* x, bf16* out, uint32_t rows, uint32_t cols) { softmax_warp(x, out, rows, cols); }

// Causal attention over a paged key/value cache (decode and chunked prefill alike).
//
// kv_store: the key and value parts of each fused qkv row (query heads, then key heads, then
// value heads) copied into cache slot slots[row]; grid-stride, one thread per value. It runs
// before kv_attention on the same stream, so the rows of a prefill chunk see each other.
//
// kv_attention: one warp per (row, query head), KV_WARPS per block. The row attends to its
// sequence's positions 0..positions[row], whose slots come from its block table
// (tables + starts[row]; position p is in block table[p / block_size] at p % block_size). Keys
// go 32 at a time, one per lane (the lane's full dot product with the query); the softmax is
// online (running maximum and sum, earlier sums rescaled when the maximum grows), so no
// memory grows with the context; for the weighted sum of values the lanes split the head
// dimension (head_dim / 32 accumulators each) and take each key's weight by a shuffle.
#include "common/apparate.cuh"

template <typename T>
__device__ void kv_store(const T* __restrict__ qkv, T* __restrict__ kc, T* __restrict__ vc,
                         const int32_t* __restrict__ slots, uint32_t rows, uint32_t qkv_width,
                         uint32_t q_width, uint32_t kv_width) {
    uint64_t total = (uint64_t)rows * kv_width;
    uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t t = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += stride) {
        uint32_t r = (uint32_t)(t / kv_width), c = (uint32_t)(t % kv_width);
        const T* src = qkv + (uint64_t)r * qkv_width + q_width;
        uint64_t dst = (uint64_t)slots[r] * kv_width + c;
        kc[dst] = src[c];
        vc[dst] = src[kv_width + c];
    }
}

template <typename T>
__device__ void kv_attention(const T* __restrict__ qkv, const T* __restrict__ kc,
                             const T* __restrict__ vc, const int32_t* __restrict__ positions,
                             const int32_t* __restrict__ starts, const int32_t* __restrict__ tables,
                             T* __restrict__ out, uint32_t rows, uint32_t heads, uint32_t kv_heads,
                             uint32_t head_dim, uint32_t block_size) {
    uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    uint32_t pair = blockIdx.x * KV_WARPS + warp;
    if (pair >= rows * heads) return;  // no block barriers below
    uint32_t r = pair / heads, h = pair % heads;
    uint32_t kvh = h / (heads / kv_heads), kv_width = kv_heads * head_dim;
    uint32_t qkv_width = (heads + 2 * kv_heads) * head_dim;
    const T* q = qkv + (uint64_t)r * qkv_width + (uint64_t)h * head_dim;
    const int32_t* table = tables + starts[r];
    uint32_t pos = (uint32_t)positions[r];
    uint32_t off = kvh * head_dim;
    float scale = rsqrtf((float)head_dim);
    float mx = -3.402823466e38f, sum = 0.0f;
    float acc[KV_MAX_HEAD_DIM / 32];
#pragma unroll
    for (int k = 0; k < KV_MAX_HEAD_DIM / 32; k++) acc[k] = 0.0f;
    for (uint32_t j0 = 0; j0 <= pos; j0 += 32) {
        uint32_t j = j0 + lane;
        float s = -3.402823466e38f;
        uint32_t slot = 0;
        if (j <= pos) {
            slot = (uint32_t)table[j / block_size] * block_size + j % block_size;
            const T* key = kc + (uint64_t)slot * kv_width + off;
            float d = 0.0f;
            for (uint32_t c = 0; c < head_dim; c++) d += to_f32(q[c]) * to_f32(key[c]);
            s = d * scale;
        }
        float new_mx = fmaxf(mx, warp_max(s));
        float p = j <= pos ? expf(s - new_mx) : 0.0f;
        float corr = expf(mx - new_mx);
        sum = sum * corr + warp_sum(p);
#pragma unroll
        for (int k = 0; k < KV_MAX_HEAD_DIM / 32; k++) acc[k] *= corr;
        mx = new_mx;
        uint32_t n = pos - j0 + 1 < 32 ? pos - j0 + 1 : 32;  // the same on every lane
        for (uint32_t jj = 0; jj < n; jj++) {
            float pj = __shfl_sync(0xffffffffu, p, jj);
            uint32_t sj = __shfl_sync(0xffffffffu, slot, jj);
            const T* val = vc + (uint64_t)sj * kv_width + off;
#pragma unroll
            for (int k = 0; k < KV_MAX_HEAD_DIM / 32; k++)  // constant bounds: acc stays in registers
                if (k * 32 + lane < head_dim) acc[k] += pj * to_f32(val[k * 32 + lane]);
        }
    }
    T* o = out + (uint64_t)r * heads * head_dim + (uint64_t)h * head_dim;
    float inv = 1.0f / sum;
#pragma unroll
    for (int k = 0; k < KV_MAX_HEAD_DIM / 32; k++)
        if (k * 32 + lane < head_dim) o[k * 32 + lane] = from_f32<T>(acc[k] * inv);
}

extern "C" __global__ void kv_store_f32(const float* qkv, float* kc, float* vc, const int32_t* slots,
                                       uint32_t rows, uint32_t qkv_width, uint32_t q_width,
                                       uint32_t kv_width) {
    kv_store(qkv, kc, vc, slots, rows, qkv_width, q_width, kv_width);
}
extern "C" __global__ void kv_attention_f32(const float* qkv, const float* kc, const float* vc,
                                           const int32_t* positions, const int32_t* starts,
                                           const int32_t* tables, float* out, uint32_t rows,
                                           uint32_t heads, uint32_t kv_heads, uint32_t head_dim,
                                           uint32_t block_size) {
    kv_attention(qkv, kc, vc, positions, starts, tables, out, rows, heads, kv_heads, head_dim,
                 block_size);
}
extern "C" __global__ void kv_store_f16(const f16* qkv, f16* kc, f16* vc, const int32_t* slots,
                                       uint32_t rows, uint32_t qkv_width, uint32_t q_width,
                                       uint32_t kv_width) {
    kv_store(qkv, kc, vc, slots, rows, qkv_width, q_width, kv_width);
}
extern "C" __global__ void kv_attention_f16(const f16* qkv, const f16* kc, const f16* vc,
                                           const int32_t* positions, const int32_t* starts,
                                           const int32_t* tables, f16* out, uint32_t rows,
                                           uint32_t heads, uint32_t kv_heads, uint32_t head_dim,
                                           uint32_t block_size) {
    kv_attention(qkv, kc, vc, positions, starts, tables, out, rows, heads, kv_heads, head_dim,
                 block_size);
}
extern "C" __global__ void kv_store_bf16(const bf16* qkv, bf16* kc, bf16* vc, const int32_t* slots,
                                       uint32_t rows, uint32_t qkv_width, uint32_t q_width,
                                       uint32_t kv_width) {
    kv_store(qkv, kc, vc, slots, rows, qkv_width, q_width, kv_width);
}
extern "C" __global__ void kv_attention_bf16(const bf16* qkv, const bf16* kc, const bf16* vc,
                                           const int32_t* positions, const int32_t* starts,
                                           const int32_t* tables, bf16* out, uint32_t rows,
                                           uint32_t heads, uint32_t kv_heads, uint32_t head_dim,
                                           uint32_t block_size) {
    kv_attention(qkv, kc, vc, positions, starts, tables, out, rows, heads, kv_heads, head_dim,
                 block_size);
}

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
//
// kv_flash + kv_flash_combine (AttentionKernel::Flash, "flash-decoding"): the same attention with
// the keys of a row split into chunks (grid.y) so that a decode step of a few rows still fills
// the GPU, and each key read once as 16-byte vectors by a group of lanes. A block of
// KV_FLASH_WARPS warps takes one (row, key/value head, chunk) and the query heads that share
// that key/value head one after another (grouped-query attention: the chunk comes from DRAM
// once, then from L1); the warps split the chunk's keys; a warp holds 32 / group keys at a
// time, `group` lanes each (the fewest power of two that covers head_dim / (16 / sizeof(T))
// vectors; a lane keeps its vector of the query and of the weighted sum). Every lane group keeps
// its own online softmax (maximum, sum, weighted sum, in base 2); groups meet by shuffles, warps
// in shared memory. With one chunk the block writes the row's output; with more it writes
// (maximum, sum, weighted sum) in f32 to `partial` and kv_flash_combine, one warp per (row,
// head), rescales the chunks to their common maximum and divides.
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

// Online softmax state of a lane group (base-2 scores): running maximum, sum of weights and the
// lane's E values of the weighted sum of values.
template <int E>
struct KvFlashState {
    float m, l, acc[E];
};

// Folds state b into a (both over disjoint keys). An empty state has m = -FLT_MAX and l = 0, so
// its weight exp2(m - M) is 0 beside a real one, and two empty states stay empty.
template <int E>
APPARATE_DEVICE void kv_flash_merge(KvFlashState<E>& a, float bm, float bl, const float (&bacc)[E]) {
    float mx = fmaxf(a.m, bm);
    float wa = exp2f(a.m - mx), wb = exp2f(bm - mx);
    a.l = a.l * wa + bl * wb;
#pragma unroll
    for (int e = 0; e < E; e++) a.acc[e] = a.acc[e] * wa + bacc[e] * wb;
    a.m = mx;
}

template <typename T>
__device__ void kv_flash(const T* __restrict__ qkv, const T* __restrict__ kc,
                         const T* __restrict__ vc, const int32_t* __restrict__ positions,
                         const int32_t* __restrict__ starts, const int32_t* __restrict__ tables,
                         T* __restrict__ out, float* __restrict__ partial, uint32_t heads,
                         uint32_t kv_heads, uint32_t head_dim, uint32_t block_size,
                         uint32_t group, uint32_t chunk) {
    constexpr int E = 16 / sizeof(T);
    __shared__ float part[KV_FLASH_WARPS][2 + KV_MAX_HEAD_DIM];
    uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    uint32_t split = blockIdx.y, splits = gridDim.y;
    uint32_t r = blockIdx.x / kv_heads, kvh = blockIdx.x % kv_heads;
    uint32_t shared_by = heads / kv_heads, kv_width = kv_heads * head_dim;
    uint32_t qkv_width = (heads + 2 * kv_heads) * head_dim;
    uint32_t pos = (uint32_t)positions[r];
    const int32_t* table = tables + starts[r];
    uint32_t begin = split * chunk;
    // Keys [begin, end): none for a chunk past the row's position.
    uint32_t end = begin > pos ? begin : (pos + 1 - begin < chunk ? pos + 1 : begin + chunk);
    uint32_t nvec = head_dim / E, per_warp = 32 / group;
    uint32_t g = lane / group, sub = lane % group;
    bool live = sub < nvec;  // lanes past the head's vectors hold zeros
    uint32_t off = kvh * head_dim + sub * E;
    uint32_t stride = KV_FLASH_WARPS * per_warp;
    // Scores in base 2: exp(s) = exp2(s * log2 e), the scale folded into the query.
    const float qscale = rsqrtf((float)head_dim) * 1.4426950408889634f;
    // The query heads that read this key/value head, one after another over the same chunk:
    // the first reads it from memory, the others find it in L1 (a chunk's keys and values
    // are at most KvSplit::max_chunk x 2 x 16-byte vectors per lane group).
    for (uint32_t hh = 0; hh < shared_by; hh++) {
        uint32_t h = kvh * shared_by + hh, pair = r * heads + h;
        float q[E];
#pragma unroll
        for (int e = 0; e < E; e++) q[e] = 0.0f;
        if (live)
            load_vec16<T, E>(qkv + (uint64_t)r * qkv_width + (uint64_t)h * head_dim + sub * E, q);
#pragma unroll
        for (int e = 0; e < E; e++) q[e] *= qscale;
        KvFlashState<E> st;
        st.m = -3.402823466e38f;
        st.l = 0.0f;
#pragma unroll
        for (int e = 0; e < E; e++) st.acc[e] = 0.0f;
        // b is the same on every lane of the warp, so the shuffles below see all 32 lanes.
        for (uint32_t b = begin + warp * per_warp; b < end; b += stride * KV_FLASH_UNROLL) {
            float k[KV_FLASH_UNROLL][E], v[KV_FLASH_UNROLL][E];
#pragma unroll
            for (int u = 0; u < KV_FLASH_UNROLL; u++) {
                uint32_t j = b + g + u * stride;
#pragma unroll
                for (int e = 0; e < E; e++) k[u][e] = v[u][e] = 0.0f;
                if (live && j < end) {
                    uint64_t slot = (uint64_t)table[j / block_size] * block_size + j % block_size;
                    load_vec16<T, E>(kc + slot * kv_width + off, k[u]);
                    load_vec16<T, E>(vc + slot * kv_width + off, v[u]);
                }
            }
#pragma unroll
            for (int u = 0; u < KV_FLASH_UNROLL; u++) {
                float s = 0.0f;
#pragma unroll
                for (int e = 0; e < E; e++) s += q[e] * k[u][e];
                for (uint32_t o = group / 2; o > 0; o >>= 1)
                    s += __shfl_xor_sync(0xffffffffu, s, o);
                if (b + g + u * stride < end) kv_flash_merge<E>(st, s, 1.0f, v[u]);
            }
        }
        // The warp's lane groups into group 0 (lanes with the same `sub` hold the same
        // dimensions).
        for (uint32_t o = group; o < 32; o <<= 1) {
            float bm = __shfl_xor_sync(0xffffffffu, st.m, o);
            float bl = __shfl_xor_sync(0xffffffffu, st.l, o);
            float bacc[E];
#pragma unroll
            for (int e = 0; e < E; e++) bacc[e] = __shfl_xor_sync(0xffffffffu, st.acc[e], o);
            kv_flash_merge<E>(st, bm, bl, bacc);
        }
        __syncthreads();  // warp 0 has read the previous head's part
        if (g == 0 && live) {
#pragma unroll
            for (int e = 0; e < E; e++) part[warp][2 + sub * E + e] = st.acc[e];
            if (sub == 0) {
                part[warp][0] = st.m;
                part[warp][1] = st.l;
            }
        }
        __syncthreads();
        if (warp != 0) continue;  // the barriers above are reached by every warp
        float mx = -3.402823466e38f;
        for (int w = 0; w < KV_FLASH_WARPS; w++) mx = fmaxf(mx, part[w][0]);
        float sum = 0.0f, wt[KV_FLASH_WARPS];
#pragma unroll
        for (int w = 0; w < KV_FLASH_WARPS; w++) {
            wt[w] = exp2f(part[w][0] - mx);
            sum += part[w][1] * wt[w];
        }
        // One chunk: the row's output; more: this chunk's (maximum, sum, weighted sum).
        T* o = out + (uint64_t)pair * head_dim;  // out is [rows, heads * head_dim]
        // `partial` is null with one chunk: no pointer arithmetic on it then.
        float* p = splits > 1 ? partial + ((uint64_t)pair * splits + split) * (2 + head_dim)
                              : nullptr;
        float inv = 1.0f / sum;
        if (splits > 1 && lane == 0) {
            p[0] = mx;
            p[1] = sum;
        }
        for (uint32_t d = lane; d < head_dim; d += 32) {
            float a = 0.0f;
#pragma unroll
            for (int w = 0; w < KV_FLASH_WARPS; w++) a += part[w][2 + d] * wt[w];
            if (splits == 1)
                o[d] = from_f32<T>(a * inv);
            else
                p[2 + d] = a;
        }
    }
}

// The chunks of every (row, head) pair into its output: one warp per pair, KV_WARPS per block.
template <typename T>
__device__ void kv_flash_combine(const float* __restrict__ partial, T* __restrict__ out,
                                 uint32_t pairs, uint32_t splits, uint32_t head_dim) {
    uint32_t lane = threadIdx.x % 32;
    uint32_t pair = blockIdx.x * KV_WARPS + threadIdx.x / 32;
    if (pair >= pairs) return;  // no block barriers below
    const float* p = partial + (uint64_t)pair * splits * (2 + head_dim);
    float mx = -3.402823466e38f;
    for (uint32_t s = lane; s < splits; s += 32) mx = fmaxf(mx, p[(uint64_t)s * (2 + head_dim)]);
    mx = warp_max(mx);
    float sum = 0.0f;
    for (uint32_t s = lane; s < splits; s += 32) {
        const float* ps = p + (uint64_t)s * (2 + head_dim);
        sum += ps[1] * exp2f(ps[0] - mx);
    }
    float inv = 1.0f / warp_sum(sum);
    T* o = out + (uint64_t)pair * head_dim;  // out is [rows, heads * head_dim]: pair-major
    for (uint32_t d = lane; d < head_dim; d += 32) {
        float a = 0.0f;
        for (uint32_t s = 0; s < splits; s++) {
            const float* ps = p + (uint64_t)s * (2 + head_dim);
            a += ps[2 + d] * exp2f(ps[0] - mx);
        }
        o[d] = from_f32<T>(a * inv);
    }
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
extern "C" __global__ void __launch_bounds__(32 * KV_FLASH_WARPS)
kv_flash_f32(const float* qkv, const float* kc, const float* vc, const int32_t* positions,
            const int32_t* starts, const int32_t* tables, float* out, float* partial,
            uint32_t heads, uint32_t kv_heads, uint32_t head_dim, uint32_t block_size,
            uint32_t group, uint32_t chunk) {
    kv_flash(qkv, kc, vc, positions, starts, tables, out, partial, heads, kv_heads, head_dim,
             block_size, group, chunk);
}
extern "C" __global__ void kv_flash_combine_f32(const float* partial, float* out, uint32_t pairs,
                                              uint32_t splits, uint32_t head_dim) {
    kv_flash_combine(partial, out, pairs, splits, head_dim);
}
extern "C" __global__ void __launch_bounds__(32 * KV_FLASH_WARPS)
kv_flash_f16(const f16* qkv, const f16* kc, const f16* vc, const int32_t* positions,
            const int32_t* starts, const int32_t* tables, f16* out, float* partial,
            uint32_t heads, uint32_t kv_heads, uint32_t head_dim, uint32_t block_size,
            uint32_t group, uint32_t chunk) {
    kv_flash(qkv, kc, vc, positions, starts, tables, out, partial, heads, kv_heads, head_dim,
             block_size, group, chunk);
}
extern "C" __global__ void kv_flash_combine_f16(const float* partial, f16* out, uint32_t pairs,
                                              uint32_t splits, uint32_t head_dim) {
    kv_flash_combine(partial, out, pairs, splits, head_dim);
}
extern "C" __global__ void __launch_bounds__(32 * KV_FLASH_WARPS)
kv_flash_bf16(const bf16* qkv, const bf16* kc, const bf16* vc, const int32_t* positions,
            const int32_t* starts, const int32_t* tables, bf16* out, float* partial,
            uint32_t heads, uint32_t kv_heads, uint32_t head_dim, uint32_t block_size,
            uint32_t group, uint32_t chunk) {
    kv_flash(qkv, kc, vc, positions, starts, tables, out, partial, heads, kv_heads, head_dim,
             block_size, group, chunk);
}
extern "C" __global__ void kv_flash_combine_bf16(const float* partial, bf16* out, uint32_t pairs,
                                              uint32_t splits, uint32_t head_dim) {
    kv_flash_combine(partial, out, pairs, splits, head_dim);
}

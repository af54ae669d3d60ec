// Embedding gather (word + position + token type) + sum + LayerNorm, fused: one block per token.
// Token ids are checked on the host before the launch.
#include "common/apparate.cuh"

template <typename T>
__device__ void embed(const int32_t* __restrict__ ids, const int32_t* __restrict__ types,
                      const T* __restrict__ word, const T* __restrict__ pos,
                      const T* __restrict__ type_table, const T* __restrict__ gamma,
                      const T* __restrict__ beta, T* __restrict__ out, uint32_t seq,
                      uint32_t width, float eps) {
    DYN_SHARED(float, row);  // width values, then 32 floats of reduction scratch
    float* scratch = row + width;
    uint32_t r = blockIdx.x, p = r % seq;
    const T* w = word + (uint64_t)ids[r] * width;
    const T* pe = pos + (uint64_t)p * width;
    const T* te = type_table + (uint64_t)types[r] * width;
    float local = 0.0f;
    for (uint32_t c = threadIdx.x; c < width; c += blockDim.x) {
        float v = to_f32(w[c]) + to_f32(pe[c]) + to_f32(te[c]);
        row[c] = v;
        local += v;
    }
    layernorm_shared_row(row, local, width, gamma, beta, eps, out + (uint64_t)r * width, scratch);
}

extern "C" __global__ void embed_f32(const int32_t* ids, const int32_t* types, const float* word,
                                     const float* pos, const float* type_table, const float* gamma,
                                     const float* beta, float* out, uint32_t seq, uint32_t width,
                                     float eps) {
    embed(ids, types, word, pos, type_table, gamma, beta, out, seq, width, eps);
}
extern "C" __global__ void embed_f16(const int32_t* ids, const int32_t* types, const f16* word,
                                     const f16* pos, const f16* type_table, const f16* gamma,
                                     const f16* beta, f16* out, uint32_t seq, uint32_t width,
                                     float eps) {
    embed(ids, types, word, pos, type_table, gamma, beta, out, seq, width, eps);
}
extern "C" __global__ void embed_bf16(const int32_t* ids, const int32_t* types, const bf16* word,
                                      const bf16* pos, const bf16* type_table, const bf16* gamma,
                                      const bf16* beta, bf16* out, uint32_t seq, uint32_t width,
                                      float eps) {
    embed(ids, types, word, pos, type_table, gamma, beta, out, seq, width, eps);
}

// The same, one warp per token (LN_WARP_ROWS tokens per block) with the row in registers and
// 16-byte loads and stores (`RowKernel::Warp`; widths of width % (16 / sizeof(T)) == 0 up to
// LN_WARP_MAX_COLS, 16-byte aligned tables: the launcher checks). A token's three table rows
// are independent 16-byte loads in flight together; a block per token kept most of its 128
// threads idle at MiniLM's 384 and paid four block barriers.
template <typename T>
__device__ void embed_warp(const int32_t* __restrict__ ids, const int32_t* __restrict__ types,
                           const T* __restrict__ word, const T* __restrict__ pos,
                           const T* __restrict__ type_table, const T* __restrict__ gamma,
                           const T* __restrict__ beta, T* __restrict__ out, uint32_t rows,
                           uint32_t seq, uint32_t width, float eps) {
    constexpr int E = WarpRowShape<T>::E, V = WarpRowShape<T>::V;
    uint32_t lane = warp_lane(), r = warp_row();
    if (r >= rows) return;  // no block barrier below
    uint32_t nv = width / E;
    const T* w = word + (uint64_t)ids[r] * width;
    const T* pe = pos + (uint64_t)(r % seq) * width;
    const T* te = type_table + (uint64_t)types[r] * width;
    float v[V][E];
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < V; i++) {
        uint32_t j = lane + 32 * i;
        if (j >= nv) break;
        float p[E], t[E];
        load_vec16(w + (uint64_t)j * E, v[i]);
        load_vec16(pe + (uint64_t)j * E, p);
        load_vec16(te + (uint64_t)j * E, t);
#pragma unroll
        for (int e = 0; e < E; e++) {
            v[i][e] += p[e] + t[e];
            sum += v[i][e];
        }
    }
    warp_layernorm_row(v, sum, lane, nv, width, gamma, beta, eps, out + (uint64_t)r * width);
}

#define EMBED_WARP_ARGS(T) const int32_t* ids, const int32_t* types, const T* word, const T* pos, \
    const T* type_table, const T* gamma, const T* beta, T* out, uint32_t rows, uint32_t seq, \
    uint32_t width, float eps
#define EMBED_WARP_PASS ids, types, word, pos, type_table, gamma, beta, out, rows, seq, width, eps
extern "C" __global__ void embed_warp_f32(EMBED_WARP_ARGS(float)) { embed_warp(EMBED_WARP_PASS); }
extern "C" __global__ void embed_warp_f16(EMBED_WARP_ARGS(f16)) { embed_warp(EMBED_WARP_PASS); }
extern "C" __global__ void embed_warp_bf16(EMBED_WARP_ARGS(bf16)) { embed_warp(EMBED_WARP_PASS); }

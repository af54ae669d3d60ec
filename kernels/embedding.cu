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

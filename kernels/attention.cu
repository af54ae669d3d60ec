// Self-attention core, fused: QK^T, scale, key-length mask, softmax and PV in one kernel.
// Grid: (batch * heads, ceil(seq / ATTN_WARPS)); each warp owns one query row of one (input, head):
// its lanes split the keys for the scores (kept in shared memory), reduce max and sum with
// shuffles, then split the head dimension for the weighted sum of values. Padding keys are
// never read; padding query rows are written as zeros (as the CPU backend does).
#include "common/apparate.cuh"

template <typename T>
__device__ void attention(const T* __restrict__ qkv, const int32_t* __restrict__ lengths,
                          T* __restrict__ out, uint32_t seq, uint32_t width, uint32_t heads,
                          float scale) {
    DYN_SHARED(float, smem);  // ATTN_WARPS * seq scores
    uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    uint32_t b = blockIdx.x / heads, h = blockIdx.x % heads, d = width / heads;
    uint32_t i = blockIdx.y * ATTN_WARPS + warp;
    if (i >= seq) return;  // no block barriers below, so an idle warp may leave
    uint32_t len = (uint32_t)lengths[b];
    uint64_t ld = 3ull * width, base = (uint64_t)b * seq;
    T* o = out + (base + i) * width + (uint64_t)h * d;
    if (i >= len) {
        for (uint32_t c = lane; c < d; c += 32) o[c] = from_f32<T>(0.0f);
        return;
    }
    const T* q = qkv + (base + i) * ld + (uint64_t)h * d;
    float* scores = smem + warp * seq;
    float mx = -3.402823466e38f;
    for (uint32_t j = lane; j < len; j += 32) {
        const T* k = qkv + (base + j) * ld + width + (uint64_t)h * d;
        float s = 0.0f;
        for (uint32_t c = 0; c < d; c++) s += to_f32(q[c]) * to_f32(k[c]);
        s *= scale;
        scores[j] = s;
        mx = fmaxf(mx, s);
    }
    mx = warp_max(mx);
    float sum = 0.0f;
    for (uint32_t j = lane; j < len; j += 32) {
        float e = expf(scores[j] - mx);
        scores[j] = e;
        sum += e;
    }
    float inv = 1.0f / warp_sum(sum);
    __syncwarp();  // every lane reads all scores below
    for (uint32_t c = lane; c < d; c += 32) {
        float acc = 0.0f;
        for (uint32_t j = 0; j < len; j++)
            acc += scores[j] * to_f32(qkv[(base + j) * ld + 2ull * width + (uint64_t)h * d + c]);
        o[c] = from_f32<T>(acc * inv);
    }
}

extern "C" __global__ void attention_f32(const float* qkv, const int32_t* lengths, float* out,
                                         uint32_t seq, uint32_t width, uint32_t heads, float scale) {
    attention(qkv, lengths, out, seq, width, heads, scale);
}
extern "C" __global__ void attention_f16(const f16* qkv, const int32_t* lengths, f16* out,
                                         uint32_t seq, uint32_t width, uint32_t heads, float scale) {
    attention(qkv, lengths, out, seq, width, heads, scale);
}
extern "C" __global__ void attention_bf16(const bf16* qkv, const int32_t* lengths, bf16* out,
                                          uint32_t seq, uint32_t width, uint32_t heads, float scale) {
    attention(qkv, lengths, out, seq, width, heads, scale);
}

// Block-quantized weights (GGUF's Q4_1 and Q8_0 layouts, kept as the file stores them): the
// product y = x W^T with f32 math on the decoded weights, and the gather of decoded rows (a
// quantized token embedding).
//
// Q4_1 block (20 bytes): f16 scale d, f16 minimum m, 16 bytes of 4-bit codes; value j < 16 is
// the low nibble of byte j, value j >= 16 the high nibble of byte j - 16; w = d q + m.
// Q8_0 block (34 bytes): f16 scale d, 32 signed 8-bit codes; w = d q.
//
// The product: a block of QMM_WARPS warps, one weight row per warp, QMM_TILE rows of x per
// block row of the grid (grid.y). Lane l decodes value l of every 32-value block of the row (so
// a warp reads a block's bytes together and x's values coalesced) and keeps one partial sum
// per activation row; a warp sum at the end gives the outputs.
#include "common/apparate.cuh"

APPARATE_DEVICE float half_at(const unsigned char* p) {
    f16 h;
    h.bits = (uint16_t)(p[0] | ((uint32_t)p[1] << 8));
    return to_f32(h);
}

// The block types: bytes per block and value `l` (0..31) of a block.
struct Q4_1 {
    static const uint32_t BYTES = 20;
    static APPARATE_DEVICE float value(const unsigned char* blk, uint32_t l) {
        uint32_t byte = blk[4 + (l & 15)];
        uint32_t q = l < 16 ? (byte & 15u) : (byte >> 4);
        return half_at(blk) * (float)q + half_at(blk + 2);
    }
};
struct Q8_0 {
    static const uint32_t BYTES = 34;
    static APPARATE_DEVICE float value(const unsigned char* blk, uint32_t l) {
        return half_at(blk) * (float)(signed char)blk[2 + l];
    }
};

template <typename Q, typename T>
__device__ void qmatmul(const unsigned char* __restrict__ w, const T* __restrict__ x,
                        T* __restrict__ y, uint32_t m, uint32_t rows, uint32_t cols) {
    uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    uint32_t r = blockIdx.x * QMM_WARPS + warp;
    if (r >= rows) return;  // no block barriers below
    uint32_t i0 = blockIdx.y * QMM_TILE;
    uint32_t tile = m - i0 < QMM_TILE ? m - i0 : QMM_TILE;
    uint32_t blocks = cols / 32;
    const unsigned char* row = w + (uint64_t)r * blocks * Q::BYTES;
    float acc[QMM_TILE];
    for (int t = 0; t < QMM_TILE; t++) acc[t] = 0.0f;
    for (uint32_t b = 0; b < blocks; b++) {
        float wv = Q::value(row + (uint64_t)b * Q::BYTES, lane);
        uint32_t c = b * 32 + lane;
        for (uint32_t t = 0; t < tile; t++) acc[t] += wv * to_f32(x[(uint64_t)(i0 + t) * cols + c]);
    }
    for (uint32_t t = 0; t < tile; t++) {
        float s = warp_sum(acc[t]);
        if (lane == 0) y[(uint64_t)(i0 + t) * rows + r] = from_f32<T>(s);
    }
}

// One block per output row: row ids[i] of the table, decoded.
template <typename Q, typename T>
__device__ void qembed(const unsigned char* __restrict__ w, const int32_t* __restrict__ ids,
                       T* __restrict__ out, uint32_t cols) {
    const unsigned char* row = w + (uint64_t)ids[blockIdx.x] * (cols / 32) * Q::BYTES;
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x)
        out[(uint64_t)blockIdx.x * cols + c] = from_f32<T>(Q::value(row + (c / 32) * Q::BYTES, c % 32));
}

extern "C" __global__ void qmatmul_q4_1_f32(const unsigned char* w, const float* x, float* y, uint32_t m,
                                          uint32_t rows, uint32_t cols) {
    qmatmul<Q4_1, float>(w, x, y, m, rows, cols);
}
extern "C" __global__ void qembed_q4_1_f32(const unsigned char* w, const int32_t* ids, float* out,
                                         uint32_t cols) {
    qembed<Q4_1, float>(w, ids, out, cols);
}
extern "C" __global__ void qmatmul_q4_1_f16(const unsigned char* w, const f16* x, f16* y, uint32_t m,
                                          uint32_t rows, uint32_t cols) {
    qmatmul<Q4_1, f16>(w, x, y, m, rows, cols);
}
extern "C" __global__ void qembed_q4_1_f16(const unsigned char* w, const int32_t* ids, f16* out,
                                         uint32_t cols) {
    qembed<Q4_1, f16>(w, ids, out, cols);
}
extern "C" __global__ void qmatmul_q4_1_bf16(const unsigned char* w, const bf16* x, bf16* y, uint32_t m,
                                          uint32_t rows, uint32_t cols) {
    qmatmul<Q4_1, bf16>(w, x, y, m, rows, cols);
}
extern "C" __global__ void qembed_q4_1_bf16(const unsigned char* w, const int32_t* ids, bf16* out,
                                         uint32_t cols) {
    qembed<Q4_1, bf16>(w, ids, out, cols);
}
extern "C" __global__ void qmatmul_q8_0_f32(const unsigned char* w, const float* x, float* y, uint32_t m,
                                          uint32_t rows, uint32_t cols) {
    qmatmul<Q8_0, float>(w, x, y, m, rows, cols);
}
extern "C" __global__ void qembed_q8_0_f32(const unsigned char* w, const int32_t* ids, float* out,
                                         uint32_t cols) {
    qembed<Q8_0, float>(w, ids, out, cols);
}
extern "C" __global__ void qmatmul_q8_0_f16(const unsigned char* w, const f16* x, f16* y, uint32_t m,
                                          uint32_t rows, uint32_t cols) {
    qmatmul<Q8_0, f16>(w, x, y, m, rows, cols);
}
extern "C" __global__ void qembed_q8_0_f16(const unsigned char* w, const int32_t* ids, f16* out,
                                         uint32_t cols) {
    qembed<Q8_0, f16>(w, ids, out, cols);
}
extern "C" __global__ void qmatmul_q8_0_bf16(const unsigned char* w, const bf16* x, bf16* y, uint32_t m,
                                          uint32_t rows, uint32_t cols) {
    qmatmul<Q8_0, bf16>(w, x, y, m, rows, cols);
}
extern "C" __global__ void qembed_q8_0_bf16(const unsigned char* w, const int32_t* ids, bf16* out,
                                         uint32_t cols) {
    qembed<Q8_0, bf16>(w, ids, out, cols);
}

// Greedy sampling on the device: the index of the largest value of each row (the lowest index
// among equals; NaN never wins; 0 when every value is NaN), so one id per sequence crosses to
// the host instead of the vocabulary's logits. One block of ROW_THREADS per row.
#include "common/apparate.cuh"

// Whether (v, i) beats (bv, bi) under the rule above. An empty candidate is (NaN, 0xffffffff).
APPARATE_DEVICE bool beats(float v, uint32_t i, float bv, uint32_t bi) {
    if (v != v) return false;
    if (bv != bv) return true;
    return v > bv || (v == bv && i < bi);
}

template <typename T>
__device__ void argmax(const T* __restrict__ x, int32_t* __restrict__ out, uint32_t cols) {
    __shared__ float sv[32];
    __shared__ uint32_t si[32];
    const T* row = x + (uint64_t)blockIdx.x * cols;
    float bv = __uint_as_float(0x7fc00000u);
    uint32_t bi = 0xffffffffu;
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = to_f32(row[c]);
        if (beats(v, c, bv, bi)) {
            bv = v;
            bi = c;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float v = __shfl_xor_sync(0xffffffffu, bv, o);
        uint32_t i = __shfl_xor_sync(0xffffffffu, bi, o);
        if (beats(v, i, bv, bi)) {
            bv = v;
            bi = i;
        }
    }
    uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    if (lane == 0) {
        sv[warp] = bv;
        si[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (uint32_t w = 1; w < nwarps; w++)
            if (beats(sv[w], si[w], bv, bi)) {
                bv = sv[w];
                bi = si[w];
            }
        out[blockIdx.x] = bi == 0xffffffffu ? 0 : (int32_t)bi;
    }
}

extern "C" __global__ void argmax_f32(const float* x, int32_t* out, uint32_t cols) { argmax(x, out, cols); }
extern "C" __global__ void argmax_f16(const f16* x, int32_t* out, uint32_t cols) { argmax(x, out, cols); }
extern "C" __global__ void argmax_bf16(const bf16* x, int32_t* out, uint32_t cols) { argmax(x, out, cols); }

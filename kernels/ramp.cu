// The fused ramp + exit check: for each input (one block each), pool the stage output over its
// valid positions (mean, or the first position), apply the ramp head (optionally dense + tanh,
// then linear), softmax, and write the predicted class, the uncertainty u = 1 - max p, and the
// exit flag u < threshold, the threshold read from device memory (so it can change between
// batches without recompiling or re-capturing anything).
#include "common/apparate.cuh"

// out[j] = f(bias[j] + w[j, :] . in) for j < rows (w [rows, cols] of T, `in` in shared
// memory). WARP = false: the block's threads over j, each walking its own weight row (the
// reference: neighbouring threads read addresses `cols` apart). WARP = true
// (`RowKernel::Warp`): a warp per j, its lanes over the row, so a warp's loads are 32
// consecutive weights.
template <bool WARP, typename T, typename F>
APPARATE_DEVICE void block_matvec(const T* __restrict__ w, const T* __restrict__ bias,
                                  const float* in, uint32_t rows, uint32_t cols, float* out,
                                  F&& f) {
    if (WARP) {
        uint32_t lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
        for (uint32_t j = threadIdx.x / 32; j < rows; j += nwarps) {
            const T* wr = w + (uint64_t)j * cols;
            float acc = 0.0f;
            for (uint32_t c = lane; c < cols; c += 32) acc += to_f32(wr[c]) * in[c];
            acc = warp_sum(acc);
            if (lane == 0) out[j] = f((bias ? to_f32(bias[j]) : 0.0f) + acc);
        }
    } else {
        for (uint32_t j = threadIdx.x; j < rows; j += blockDim.x) {
            float acc = bias ? to_f32(bias[j]) : 0.0f;
            for (uint32_t c = 0; c < cols; c++) acc += to_f32(w[(uint64_t)j * cols + c]) * in[c];
            out[j] = f(acc);
        }
    }
}

template <bool WARP, typename T>
__device__ void ramp_exit(const T* __restrict__ x, const int32_t* __restrict__ lengths,
                          const T* __restrict__ dense_w, const T* __restrict__ dense_b,
                          const T* __restrict__ out_w, const T* __restrict__ out_b,
                          const T* __restrict__ threshold, int32_t* __restrict__ cls,
                          float* __restrict__ uncertainty, int32_t* __restrict__ exits,
                          uint32_t positions, uint32_t width, uint32_t classes, int mode) {
    DYN_SHARED(float, smem);  // pooled[width], hidden[width], logits[classes], scratch[ROW_SCRATCH]
    float* pooled = smem;
    float* hidden = smem + width;
    float* logits = hidden + width;
    float* scratch = logits + classes;
    uint32_t b = blockIdx.x;
    uint32_t len = mode == POOL_CLS ? 1u : (uint32_t)lengths[b];
    const T* rows = x + (uint64_t)b * positions * width;
    for (uint32_t c = threadIdx.x; c < width; c += blockDim.x) {
        float acc = 0.0f;
        for (uint32_t p = 0; p < len; p++) acc += to_f32(rows[(uint64_t)p * width + c]);
        pooled[c] = acc / (float)len;
    }
    __syncthreads();
    const float* feat = pooled;
    if (dense_w) {
        block_matvec<WARP>(dense_w, dense_b, pooled, width, width, hidden,
                           [](float v) { return tanhf(v); });
        __syncthreads();
        feat = hidden;
    }
    block_matvec<WARP>(out_w, out_b, feat, classes, width, logits, [](float v) { return v; });
    __syncthreads();
    float mx = -3.402823466e38f;
    for (uint32_t k = threadIdx.x; k < classes; k += blockDim.x) mx = fmaxf(mx, logits[k]);
    mx = block_max(mx, scratch);
    float sum = 0.0f;
    for (uint32_t k = threadIdx.x; k < classes; k += blockDim.x) sum += expf(logits[k] - mx);
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0) {
        // The first class holding the maximum, as the CPU's argmax picks it.
        uint32_t best = 0;
        while (best < classes && logits[best] != mx) best++;
        float u = 1.0f - 1.0f / sum;  // max p = exp(0) / sum
        cls[b] = (int32_t)best;
        uncertainty[b] = u;
        exits[b] = u < to_f32(threshold[0]) ? 1 : 0;
    }
}

#define RAMP_ARGS(T) const T* x, const int32_t* lengths, const T* dense_w, const T* dense_b, \
    const T* out_w, const T* out_b, const T* threshold, int32_t* cls, float* uncertainty, \
    int32_t* exits, uint32_t positions, uint32_t width, uint32_t classes, int mode
#define RAMP_PASS x, lengths, dense_w, dense_b, out_w, out_b, threshold, cls, uncertainty, exits, \
    positions, width, classes, mode
extern "C" __global__ void ramp_exit_f32(RAMP_ARGS(float)) { ramp_exit<false>(RAMP_PASS); }
extern "C" __global__ void ramp_exit_f16(RAMP_ARGS(f16)) { ramp_exit<false>(RAMP_PASS); }
extern "C" __global__ void ramp_exit_bf16(RAMP_ARGS(bf16)) { ramp_exit<false>(RAMP_PASS); }
extern "C" __global__ void ramp_exit_warp_f32(RAMP_ARGS(float)) { ramp_exit<true>(RAMP_PASS); }
extern "C" __global__ void ramp_exit_warp_f16(RAMP_ARGS(f16)) { ramp_exit<true>(RAMP_PASS); }
extern "C" __global__ void ramp_exit_warp_bf16(RAMP_ARGS(bf16)) { ramp_exit<true>(RAMP_PASS); }

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

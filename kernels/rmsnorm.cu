// RMSNorm of rows, with the residual add fused: h = x + res (res may be null: h = x), written
// to h_out when it is not null, and y = h / sqrt(mean(h^2) + eps) * gamma. Two kernels: one
// block per row, the row kept in shared memory between the sum of squares and the scaling (the
// reference), and one warp per row with the row in registers (`RowKernel::Warp`, below).
#include "common/apparate.cuh"

template <typename T>
__device__ void rms_norm(const T* __restrict__ x, const T* __restrict__ res,
                         const T* __restrict__ gamma, T* __restrict__ h_out, T* __restrict__ y,
                         uint32_t cols, float eps) {
    DYN_SHARED(float, row);  // cols values, then 32 floats of reduction scratch
    float* scratch = row + cols;
    uint64_t base = (uint64_t)blockIdx.x * cols;
    float sq = 0.0f;
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = to_f32(x[base + c]);
        if (res) v += to_f32(res[base + c]);
        // h is stored (and normalised) as the storage dtype holds it, as the CPU sees it.
        T hv = from_f32<T>(v);
        if (h_out) h_out[base + c] = hv;
        v = to_f32(hv);
        row[c] = v;
        sq += v * v;
    }
    float inv = rsqrtf(block_sum(sq, scratch) / (float)cols + eps);
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x)
        y[base + c] = from_f32<T>(row[c] * inv * to_f32(gamma[c]));
}

extern "C" __global__ void rms_norm_f32(const float* x, const float* res, const float* gamma,
                                        float* h_out, float* y, uint32_t cols, float eps) {
    rms_norm(x, res, gamma, h_out, y, cols, eps);
}
extern "C" __global__ void rms_norm_f16(const f16* x, const f16* res, const f16* gamma,
                                        f16* h_out, f16* y, uint32_t cols, float eps) {
    rms_norm(x, res, gamma, h_out, y, cols, eps);
}
extern "C" __global__ void rms_norm_bf16(const bf16* x, const bf16* res, const bf16* gamma,
                                         bf16* h_out, bf16* y, uint32_t cols, float eps) {
    rms_norm(x, res, gamma, h_out, y, cols, eps);
}

// The same, one warp per row (LN_WARP_ROWS rows per block) with the row in registers and
// 16-byte loads and stores: no shared memory and no block barrier. For rows of cols % (16 /
// sizeof(T)) == 0 up to LN_WARP_MAX_COLS and 16-byte aligned tensors (the launcher checks).
// A decoder's hidden rows (576 for SmolLM2-135M) are 1-4 KB: a block per row left most of its
// 128 threads idle and paid two block barriers per row.

template <typename T>
__device__ void rms_norm_warp(const T* __restrict__ x, const T* __restrict__ res,
                              const T* __restrict__ gamma, T* __restrict__ h_out,
                              T* __restrict__ y, uint32_t rows, uint32_t cols, float eps) {
    constexpr int E = WarpRowShape<T>::E, V = WarpRowShape<T>::V;
    uint32_t lane = warp_lane(), row = warp_row();
    if (row >= rows) return;  // no block barrier below
    uint32_t nv = cols / E;
    uint64_t base = (uint64_t)row * cols;
    float v[V][E];
    float sq = 0.0f;
#pragma unroll
    for (int i = 0; i < V; i++) {
        uint32_t j = lane + 32 * i;
        if (j >= nv) break;
        uint64_t at = base + (uint64_t)j * E;
        Vec16 a = *reinterpret_cast<const Vec16*>(x + at);
        Vec16 b;
        b.w[0] = b.w[1] = b.w[2] = b.w[3] = 0u;
        if (res) b = *reinterpret_cast<const Vec16*>(res + at);
        const T* ae = reinterpret_cast<const T*>(&a);
        const T* be = reinterpret_cast<const T*>(&b);
        Vec16 h;
        T* he = reinterpret_cast<T*>(&h);
#pragma unroll
        for (int e = 0; e < E; e++) {
            float s = to_f32(ae[e]);
            if (res) s += to_f32(be[e]);
            // h is stored (and normalised) as the storage dtype holds it, as the CPU sees it.
            he[e] = from_f32<T>(s);
            v[i][e] = to_f32(he[e]);
            sq += v[i][e] * v[i][e];
        }
        if (h_out) *reinterpret_cast<Vec16*>(h_out + at) = h;
    }
    float inv = rsqrtf(warp_sum(sq) / (float)cols + eps);
#pragma unroll
    for (int i = 0; i < V; i++) {
        uint32_t j = lane + 32 * i;
        if (j >= nv) break;
        Vec16 g = *reinterpret_cast<const Vec16*>(gamma + (uint64_t)j * E);
        const T* ge = reinterpret_cast<const T*>(&g);
        Vec16 o;
        T* oe = reinterpret_cast<T*>(&o);
#pragma unroll
        for (int e = 0; e < E; e++) oe[e] = from_f32<T>(v[i][e] * inv * to_f32(ge[e]));
        *reinterpret_cast<Vec16*>(y + base + (uint64_t)j * E) = o;
    }
}

extern "C" __global__ void rms_norm_warp_f32(const float* x, const float* res, const float* gamma,
                                             float* h_out, float* y, uint32_t rows, uint32_t cols,
                                             float eps) {
    rms_norm_warp(x, res, gamma, h_out, y, rows, cols, eps);
}
extern "C" __global__ void rms_norm_warp_f16(const f16* x, const f16* res, const f16* gamma,
                                             f16* h_out, f16* y, uint32_t rows, uint32_t cols,
                                             float eps) {
    rms_norm_warp(x, res, gamma, h_out, y, rows, cols, eps);
}
extern "C" __global__ void rms_norm_warp_bf16(const bf16* x, const bf16* res, const bf16* gamma,
                                              bf16* h_out, bf16* y, uint32_t rows, uint32_t cols,
                                              float eps) {
    rms_norm_warp(x, res, gamma, h_out, y, rows, cols, eps);
}

// 2-D convolution over NHWC tensors. Dense convolutions run as im2col (this file) + the GEMM
// of gemm.cu (tensor cores for f16/bf16), whose epilogue adds the bias and the residual and
// applies the activation; 1x1 stride-1 convolutions skip im2col. Grouped and depthwise
// convolutions have their own direct kernel: one thread per output element, f32 accumulation.
#include "common/apparate.cuh"

// cols [n * oh * ow, kh * kw * cin]: the receptive field of every output pixel, zero where it
// falls in the padding.
template <typename T>
__device__ void im2col(const T* __restrict__ x, T* __restrict__ cols, uint32_t n, uint32_t h,
                       uint32_t w, uint32_t cin, uint32_t kh, uint32_t kw, uint32_t oh,
                       uint32_t ow, uint32_t sh, uint32_t sw, uint32_t ph, uint32_t pw) {
    uint64_t k = (uint64_t)kh * kw * cin, total = (uint64_t)n * oh * ow * k;
    uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t e = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        uint64_t r = e / k, q = e % k;
        uint32_t c = (uint32_t)(q % cin), j = (uint32_t)((q / cin) % kw), i = (uint32_t)(q / cin / kw);
        uint32_t xo = (uint32_t)(r % ow), y = (uint32_t)((r / ow) % oh), b = (uint32_t)(r / ((uint64_t)oh * ow));
        int iy = (int)(y * sh + i) - (int)ph, ix = (int)(xo * sw + j) - (int)pw;
        T v = from_f32<T>(0.0f);
        if (iy >= 0 && iy < (int)h && ix >= 0 && ix < (int)w)
            v = x[(((uint64_t)b * h + iy) * w + ix) * cin + c];
        cols[e] = v;
    }
}

// out [n, oh, ow, cout] = act(grouped conv + bias + residual); w [cout, kh, kw, cin / groups].
template <typename T>
__device__ void conv_grouped(const T* __restrict__ x, const T* __restrict__ wt,
                             const T* __restrict__ bias, const T* __restrict__ res,
                             T* __restrict__ out, uint32_t n, uint32_t h, uint32_t w,
                             uint32_t cin, uint32_t cout, uint32_t kh, uint32_t kw, uint32_t oh,
                             uint32_t ow, uint32_t sh, uint32_t sw, uint32_t ph, uint32_t pw,
                             uint32_t groups, int act) {
    uint32_t cg = cin / groups, og = cout / groups;
    uint64_t total = (uint64_t)n * oh * ow * cout;
    uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t e = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        uint32_t co = (uint32_t)(e % cout);
        uint64_t r = e / cout;
        uint32_t xo = (uint32_t)(r % ow), y = (uint32_t)((r / ow) % oh), b = (uint32_t)(r / ((uint64_t)oh * ow));
        uint32_t g = co / og;
        float acc = bias ? to_f32(bias[co]) : 0.0f;
        for_each_tap(y, xo, h, w, kh, kw, sh, sw, ph, pw,
                     [&](uint32_t i, uint32_t j, uint32_t iy, uint32_t ix) {
                         const T* xs = x + (((uint64_t)b * h + iy) * w + ix) * cin + (uint64_t)g * cg;
                         const T* ws = wt + (((uint64_t)co * kh + i) * kw + j) * cg;
                         for (uint32_t c = 0; c < cg; c++) acc += to_f32(xs[c]) * to_f32(ws[c]);
                     });
        if (res) acc += to_f32(res[e]);
        out[e] = from_f32<T>(activate(acc, act));
    }
}

#define IM2COL_ARGS uint32_t n, uint32_t h, uint32_t w, uint32_t cin, uint32_t kh, uint32_t kw, \
    uint32_t oh, uint32_t ow, uint32_t sh, uint32_t sw, uint32_t ph, uint32_t pw
#define IM2COL_PASS n, h, w, cin, kh, kw, oh, ow, sh, sw, ph, pw
extern "C" __global__ void im2col_f32(const float* x, float* cols, IM2COL_ARGS) { im2col(x, cols, IM2COL_PASS); }
extern "C" __global__ void im2col_f16(const f16* x, f16* cols, IM2COL_ARGS) { im2col(x, cols, IM2COL_PASS); }
extern "C" __global__ void im2col_bf16(const bf16* x, bf16* cols, IM2COL_ARGS) { im2col(x, cols, IM2COL_PASS); }

#define CONV_ARGS uint32_t n, uint32_t h, uint32_t w, uint32_t cin, uint32_t cout, uint32_t kh, \
    uint32_t kw, uint32_t oh, uint32_t ow, uint32_t sh, uint32_t sw, uint32_t ph, uint32_t pw, \
    uint32_t groups, int act
#define CONV_PASS n, h, w, cin, cout, kh, kw, oh, ow, sh, sw, ph, pw, groups, act
extern "C" __global__ void conv_grouped_f32(const float* x, const float* wt, const float* bias, const float* res, float* out, CONV_ARGS) {
    conv_grouped(x, wt, bias, res, out, CONV_PASS);
}
extern "C" __global__ void conv_grouped_f16(const f16* x, const f16* wt, const f16* bias, const f16* res, f16* out, CONV_ARGS) {
    conv_grouped(x, wt, bias, res, out, CONV_PASS);
}
extern "C" __global__ void conv_grouped_bf16(const bf16* x, const bf16* wt, const bf16* bias, const bf16* res, bf16* out, CONV_ARGS) {
    conv_grouped(x, wt, bias, res, out, CONV_PASS);
}

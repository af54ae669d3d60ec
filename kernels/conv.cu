// 2-D convolution over NHWC tensors. Dense convolutions are GEMMs over the receptive fields:
// in f16/bf16 with 8-channel multiples, `conv_pipe_*` (below) gathers them from the input as
// the pipelined GEMM's copies go (an implicit GEMM: no im2col buffer); else im2col (this file)
// + the GEMM of gemm.cu. Either way the GEMM's epilogue adds the bias and the residual and
// applies the activation; 1x1 stride-1 convolutions skip im2col. Grouped and depthwise
// convolutions have their own direct kernel: one thread per output element, f32 accumulation.
#include "common/apparate.cuh"
#include "common/gemm_pipe.cuh"

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

// The same (`RowKernel::Warp`), one thread per unit U of `cols` (a 16-byte vector of channels
// when cin * sizeof(T) is a multiple of 16 and both tensors are 16-byte aligned, else one
// element), 32-bit indices, every division by a launch constant done by `fast_div`: the
// reference spends six 64-bit divisions per element. Consecutive threads write consecutive
// units of `cols` and read consecutive channels of a pixel. `units` < 2^32 (the launcher
// checks); cu = cin in units; each divisor comes as (d, mul, l) for fast_div.
#define FAST_DIV(name) uint32_t name, uint32_t name##_mul, uint32_t name##_l
template <typename U>
__device__ void im2col_fast(const U* __restrict__ x, U* __restrict__ cols, uint32_t units,
                            uint32_t h, uint32_t w, FAST_DIV(cu), FAST_DIV(taps), FAST_DIV(kw),
                            FAST_DIV(ow), FAST_DIV(oh), uint32_t sh, uint32_t sw, uint32_t ph,
                            uint32_t pw) {
    uint32_t stride = gridDim.x * blockDim.x;
    for (uint32_t u = blockIdx.x * blockDim.x + threadIdx.x; u < units; u += stride) {
        uint32_t t = fast_div(u, cu_mul, cu_l), c = u - t * cu;  // t = pixel * taps + tap
        uint32_t r = fast_div(t, taps_mul, taps_l), tap = t - r * taps;
        uint32_t i = fast_div(tap, kw_mul, kw_l), j = tap - i * kw;
        uint32_t q = fast_div(r, ow_mul, ow_l), xo = r - q * ow;  // q = b * oh + y
        uint32_t b = fast_div(q, oh_mul, oh_l), y = q - b * oh;
        int iy = (int)(y * sh + i) - (int)ph, ix = (int)(xo * sw + j) - (int)pw;
        U v = U{};  // zero bits: +0 in every storage dtype
        if (iy >= 0 && iy < (int)h && ix >= 0 && ix < (int)w)
            v = x[(((uint64_t)b * h + iy) * w + ix) * cu + c];
        cols[u] = v;
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

#define IM2COL_FAST_ARGS uint32_t units, uint32_t h, uint32_t w, FAST_DIV(cu), FAST_DIV(taps), \
    FAST_DIV(kw), FAST_DIV(ow), FAST_DIV(oh), uint32_t sh, uint32_t sw, uint32_t ph, uint32_t pw
#define IM2COL_FAST_PASS units, h, w, cu, cu_mul, cu_l, taps, taps_mul, taps_l, kw, kw_mul, kw_l, \
    ow, ow_mul, ow_l, oh, oh_mul, oh_l, sh, sw, ph, pw
// 16-byte units (any storage dtype: the copy does not look inside them)
extern "C" __global__ void im2col_vec16(const Vec16* x, Vec16* cols, IM2COL_FAST_ARGS) { im2col_fast(x, cols, IM2COL_FAST_PASS); }
// one element at a time
extern "C" __global__ void im2col_fast_f32(const float* x, float* cols, IM2COL_FAST_ARGS) { im2col_fast(x, cols, IM2COL_FAST_PASS); }
extern "C" __global__ void im2col_fast_f16(const f16* x, f16* cols, IM2COL_FAST_ARGS) { im2col_fast(x, cols, IM2COL_FAST_PASS); }
extern "C" __global__ void im2col_fast_bf16(const bf16* x, bf16* cols, IM2COL_FAST_ARGS) { im2col_fast(x, cols, IM2COL_FAST_PASS); }

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

// ---- implicit GEMM: the pipelined GEMM with A gathered from the input ----------------------
//
// A divisor fixed at launch, divided by with fast_div (constants from the launcher's FastDiv).
struct Divisor {
    uint32_t d, mul, l;
    APPARATE_DEVICE uint32_t div(uint32_t n) const { return fast_div(n, mul, l); }
};

// A = the receptive fields of the output pixels: row m is pixel (b, y, xo) in [n, oh, ow]
// order, column k is (i, j, c) in the weights' [kh, kw, cin] order, so the weights are the
// GEMM's W [cout, K] as stored. cin % 8 == 0 keeps each 16-byte chunk of a row inside one tap
// (one input pixel's channels): the chunk is then wholly in the image or wholly in the padding,
// and 16-byte aligned in a 16-byte aligned input. A row's pixel is worked out once per block
// (its image and top-left input corner), a column's tap once per k-step: per copy, two adds
// and a bounds check where im2col writes and reads the whole K x M matrix.
template <typename T>
struct ConvRows {
    const T* x;
    uint32_t M, K, h, w;
    Divisor cin, kw, ow, oh;
    uint32_t sh, sw, ph, pw;
    struct Row {
        const T* image;
        int iy0, ix0;
        bool in;
    };
    struct Column {
        uint32_t i, j, c;
        bool in;
    };
    APPARATE_DEVICE Row row(uint32_t m) const {
        if (m >= M) return Row{x, 0, 0, false};
        uint32_t q = ow.div(m), xo = m - q * ow.d;  // q = b * oh + y
        uint32_t b = oh.div(q), y = q - b * oh.d;
        return Row{x + (uint64_t)b * h * w * cin.d, (int)(y * sh) - (int)ph,
                   (int)(xo * sw) - (int)pw, true};
    }
    APPARATE_DEVICE Column column(uint32_t k) const {
        uint32_t tap = cin.div(k), i = kw.div(tap);
        return Column{i, tap - i * kw.d, k - tap * cin.d, k < K};
    }
    APPARATE_DEVICE const T* at(const Row& r, const Column& c, bool& in) const {
        int iy = r.iy0 + (int)c.i, ix = r.ix0 + (int)c.j;
        in = r.in && c.in && iy >= 0 && iy < (int)h && ix >= 0 && ix < (int)w;
        return in ? r.image + ((uint64_t)iy * w + ix) * cin.d + c.c : x;
    }
};

// y [M = n * oh * ow, N = cout] = act(A W^T + bias + residual), A as above, K = kh * kw * cin;
// the pipelined GEMM's contract otherwise (split-K through `partial`, its three tile shapes).
#define CONV_PIPE_ARGS(T) const T* x, const T* wt, const T* bias, const T* res, T* y, uint32_t M, \
    uint32_t N, uint32_t K, int act, float* partial, uint32_t per_split, uint32_t h, uint32_t w, \
    FAST_DIV(cin), FAST_DIV(kw), FAST_DIV(ow), FAST_DIV(oh), uint32_t sh, uint32_t sw, \
    uint32_t ph, uint32_t pw
#define CONV_ROWS(T) ConvRows<T>{x, M, K, h, w, {cin, cin_mul, cin_l}, {kw, kw_mul, kw_l}, \
    {ow, ow_mul, ow_l}, {oh, oh_mul, oh_l}, sh, sw, ph, pw}
extern "C" __global__ void __launch_bounds__(GEMM_PIPE_BIG_THREADS) conv_pipe_big_f16(CONV_PIPE_ARGS(f16)) {
    gemm_pipe_as<PipeBig>(CONV_ROWS(f16), wt, bias, res, y, M, N, K, act, partial, per_split);
}
extern "C" __global__ void __launch_bounds__(GEMM_PIPE_BIG_THREADS) conv_pipe_big_bf16(CONV_PIPE_ARGS(bf16)) {
    gemm_pipe_as<PipeBig>(CONV_ROWS(bf16), wt, bias, res, y, M, N, K, act, partial, per_split);
}
extern "C" __global__ void __launch_bounds__(GEMM_PIPE_BIG4_THREADS) conv_pipe_big4_f16(CONV_PIPE_ARGS(f16)) {
    gemm_pipe_as<PipeBig4>(CONV_ROWS(f16), wt, bias, res, y, M, N, K, act, partial, per_split);
}
extern "C" __global__ void __launch_bounds__(GEMM_PIPE_BIG4_THREADS) conv_pipe_big4_bf16(CONV_PIPE_ARGS(bf16)) {
    gemm_pipe_as<PipeBig4>(CONV_ROWS(bf16), wt, bias, res, y, M, N, K, act, partial, per_split);
}
extern "C" __global__ void __launch_bounds__(GEMM_PIPE_SMALL_THREADS) conv_pipe_small_f16(CONV_PIPE_ARGS(f16)) {
    gemm_pipe_as<PipeSmall>(CONV_ROWS(f16), wt, bias, res, y, M, N, K, act, partial, per_split);
}
extern "C" __global__ void __launch_bounds__(GEMM_PIPE_SMALL_THREADS) conv_pipe_small_bf16(CONV_PIPE_ARGS(bf16)) {
    gemm_pipe_as<PipeSmall>(CONV_ROWS(bf16), wt, bias, res, y, M, N, K, act, partial, per_split);
}

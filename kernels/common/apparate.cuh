// The portable kernel API. Kernel bodies use only portable CUDA C++ plus what this header and
// mma.cuh provide; every inline-PTX piece lives here behind a function with an emulated twin
// (APPARATE_EMU: the kernel is compiled by the host C++ compiler and runs on the emulated
// device, see kernels/emu/).
#pragma once
// Guarded too: NVRTC sees this header under two names (from kernels/ and from common/).
#ifndef APPARATE_APPARATE_CUH
#define APPARATE_APPARATE_CUH

#include "params.cuh"

#ifdef APPARATE_EMU
#include "../emu/emu.h"
#define APPARATE_DEVICE inline
#define DYN_SHARED(T, name) T* name = reinterpret_cast<T*>(apparate_emu_block->dyn_shared)
#else
// NVRTC: no standard headers.
typedef unsigned int uint32_t;
typedef int int32_t;
typedef unsigned short uint16_t;
typedef unsigned long long uint64_t;
#define APPARATE_DEVICE __device__ __forceinline__
#define DYN_SHARED(T, name)                                      \
    extern __shared__ __align__(16) unsigned char apparate_dyn_smem_[]; \
    T* name = reinterpret_cast<T*>(apparate_dyn_smem_)
#endif

// ---- storage types: f32 compute, f32/f16/bf16 storage ---------------------------------------

struct f16 {
    uint16_t bits;
};
struct bf16 {
    uint16_t bits;
};

APPARATE_DEVICE float to_f32(float x) { return x; }
APPARATE_DEVICE float to_f32(bf16 x) { return __uint_as_float((uint32_t)x.bits << 16); }
#ifdef APPARATE_EMU
inline float apparate_emu_f16_decode(uint32_t h) {
    uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0x1f) return __uint_as_float(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {  // zero or subnormal: man * 2^-24
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return __uint_as_float(sign | ((exp + 112) << 23) | (man << 13));
}
// All 65536 halves decoded once: the emulated tensor-core multiply decodes every operand.
inline const float* apparate_emu_f16_table() {
    static const float* table = [] {
        float* t = new float[65536];
        for (uint32_t h = 0; h < 65536; h++) t[h] = apparate_emu_f16_decode(h);
        return t;
    }();
    return table;
}
#endif
APPARATE_DEVICE float to_f32(f16 x) {
#ifdef APPARATE_EMU
    return apparate_emu_f16_table()[x.bits];
#else
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(x.bits));
    return r;
#endif
}

template <typename T>
APPARATE_DEVICE T from_f32(float x);

template <>
APPARATE_DEVICE float from_f32<float>(float x) {
    return x;
}
template <>
APPARATE_DEVICE bf16 from_f32<bf16>(float x) {
    bf16 r;
#ifdef APPARATE_EMU
    uint32_t u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (uint16_t)((u >> 16) | 0x40);  // quiet NaN
    } else {
        r.bits = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round to nearest even
    }
#else
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
#endif
    return r;
}
template <>
APPARATE_DEVICE f16 from_f32<f16>(float x) {
    f16 r;
#ifdef APPARATE_EMU
    uint32_t u = __float_as_uint(x), sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) {
        r.bits = (uint16_t)(sign | 0x7e00u);
    } else if (a >= 0x477ff000u) {  // rounds to >= 65520: infinity
        r.bits = (uint16_t)(sign | 0x7c00u);
    } else if (a < 0x38800000u) {  // below 2^-14: subnormal half, round to nearest even
        float v = __uint_as_float(a) * 16777216.0f;  // in units of 2^-24
        uint32_t m = (uint32_t)v;
        float frac = v - (float)m;
        if (frac > 0.5f || (frac == 0.5f && (m & 1u))) m++;
        r.bits = (uint16_t)(sign | m);
    } else {
        uint32_t m = a + 0xfffu + ((a >> 13) & 1u);  // round mantissa to 10 bits, nearest even
        r.bits = (uint16_t)(sign | ((m - 0x38000000u) >> 13));
    }
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
#endif
    return r;
}

// ---- warp-per-row kernels (RowKernel::Warp) ---------------------------------------------------

// 16 bytes of a row: what the warp-per-row kernels load and store at a time.
struct __align__(16) Vec16 {
    uint32_t w[4];
};

// The elements of T in a Vec16, and the Vec16s per lane of a row of at most LN_WARP_MAX_COLS.
template <typename T>
struct WarpRowShape {
    static constexpr int E = 16 / sizeof(T);
    static constexpr int V = LN_WARP_MAX_COLS / (32 * E);
};

// This thread's row (LN_WARP_ROWS rows per block, one warp each) and lane in it.
APPARATE_DEVICE uint32_t warp_row() { return blockIdx.x * LN_WARP_ROWS + threadIdx.x / 32; }
APPARATE_DEVICE uint32_t warp_lane() { return threadIdx.x % 32; }

// One 16-byte vector of T at p (16-byte aligned) as E floats, and back.
template <typename T, int E = WarpRowShape<T>::E>
APPARATE_DEVICE void load_vec16(const T* p, float (&out)[E]) {
    Vec16 a = *reinterpret_cast<const Vec16*>(p);
    const T* ae = reinterpret_cast<const T*>(&a);
#pragma unroll
    for (int e = 0; e < E; e++) out[e] = to_f32(ae[e]);
}
template <typename T, int E = WarpRowShape<T>::E>
APPARATE_DEVICE void store_vec16(T* p, const float (&in)[E]) {
    Vec16 o;
    T* oe = reinterpret_cast<T*>(&o);
#pragma unroll
    for (int e = 0; e < E; e++) oe[e] = from_f32<T>(in[e]);
    *reinterpret_cast<Vec16*>(p) = o;
}

// ---- reductions ----------------------------------------------------------------------------

#ifdef APPARATE_EMU
// The butterfly below for the whole warp in one exchange (five shuffles would be five warp
// barriers on the emulated device): the same pairs combined in the same order, so the same bits.
template <bool Max>
inline float apparate_emu_warp_butterfly(float v) {
    uint32_t* s = apparate_emu_warp_exchange();
    int lane = (int)apparate_emu_thread->lane;
    std::memcpy(&s[lane * 16], &v, 4);
    apparate_emu_warp_collective(s, [](uint32_t* s) {
        float x[32], y[32];
        for (int l = 0; l < 32; l++) std::memcpy(&x[l], &s[l * 16], 4);
        for (int o = 16; o > 0; o >>= 1) {
            for (int l = 0; l < 32; l++) y[l] = Max ? fmaxf(x[l], x[l ^ o]) : x[l] + x[l ^ o];
            std::memcpy(x, y, sizeof(x));
        }
        for (int l = 0; l < 32; l++) std::memcpy(&s[l * 16 + 8], &x[l], 4);
    });
    std::memcpy(&v, &s[lane * 16 + 8], 4);
    return v;
}
#endif

APPARATE_DEVICE float warp_sum(float v) {
#ifdef APPARATE_EMU
    return apparate_emu_warp_butterfly<false>(v);
#else
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
#endif
}
APPARATE_DEVICE float warp_max(float v) {
#ifdef APPARATE_EMU
    return apparate_emu_warp_butterfly<true>(v);
#else
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
#endif
}

// Sum over the block; every thread gets the result. `scratch` holds >= 32 floats of shared
// memory; the block size must be a multiple of 32. Safe to call repeatedly with the same scratch.
APPARATE_DEVICE float block_sum(float v, float* scratch) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(r);
}
APPARATE_DEVICE float block_max(float v, float* scratch) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = lane < nwarps ? scratch[lane] : -3.402823466e38f;
    return warp_max(r);
}

// LayerNorm of one row of `cols` f32 values that this block's threads hold in shared memory
// `row` (each thread wrote the entries c = threadIdx.x + k * blockDim.x and passes their sum as
// `local`), written to `out` as T. `scratch`: 32 floats of shared memory.
template <typename T, typename G>
APPARATE_DEVICE void layernorm_shared_row(const float* row, float local, uint32_t cols,
                                          const G* gamma, const G* beta, float eps, T* out,
                                          float* scratch) {
    float mean = block_sum(local, scratch) / (float)cols;
    float sq = 0.0f;
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x) {
        float d = row[c] - mean;
        sq += d * d;
    }
    float inv = rsqrtf(block_sum(sq, scratch) / (float)cols + eps);
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x)
        out[c] = from_f32<T>((row[c] - mean) * inv * to_f32(gamma[c]) + to_f32(beta[c]));
}

// A row of nv 16-byte vectors at `row` into a warp's registers: lane `lane`'s v[i] is vector
// lane + 32 i (the layout every warp-per-row kernel keeps).
template <typename T, int V, int E>
APPARATE_DEVICE void warp_row_load(const T* row, uint32_t lane, uint32_t nv, float (&v)[V][E]) {
#pragma unroll
    for (int i = 0; i < V; i++) {
        uint32_t j = lane + 32 * i;
        if (j >= nv) break;
        load_vec16(row + (uint64_t)j * E, v[i]);
    }
}

// The registers of warp_row_load, each times `scale`, stored to `row` as T.
template <typename T, int V, int E>
APPARATE_DEVICE void warp_row_store_scaled(T* row, uint32_t lane, uint32_t nv, float (&v)[V][E],
                                           float scale) {
#pragma unroll
    for (int i = 0; i < V; i++) {
        uint32_t j = lane + 32 * i;
        if (j >= nv) break;
#pragma unroll
        for (int e = 0; e < E; e++) v[i][e] *= scale;
        store_vec16(row + (uint64_t)j * E, v[i]);
    }
}

// LayerNorm of one row of `cols` f32 values that a warp holds in registers (lane `lane`'s
// v[i][e] is column (lane + 32 i) * E + e, for the nv = cols / E vectors of the row; `sum` is
// this lane's part of their sum), written to `out` (16-byte aligned) as T with 16-byte stores.
// Two passes over the registers (mean, then the centred variance), as the block kernels do.
template <typename T, int V, int E>
APPARATE_DEVICE void warp_layernorm_row(float (&v)[V][E], float sum, uint32_t lane, uint32_t nv,
                                        uint32_t cols, const T* gamma, const T* beta, float eps,
                                        T* out) {
    float mean = warp_sum(sum) / (float)cols, sq = 0.0f;
#pragma unroll
    for (int i = 0; i < V; i++) {
        if (lane + 32 * i >= nv) break;
#pragma unroll
        for (int e = 0; e < E; e++) {
            float d = v[i][e] - mean;
            sq += d * d;
        }
    }
    float inv = rsqrtf(warp_sum(sq) / (float)cols + eps);
#pragma unroll
    for (int i = 0; i < V; i++) {
        uint32_t j = lane + 32 * i;
        if (j >= nv) break;
        float g[E], b[E], o[E];
        load_vec16(gamma + (uint64_t)j * E, g);
        load_vec16(beta + (uint64_t)j * E, b);
#pragma unroll
        for (int e = 0; e < E; e++) o[e] = (v[i][e] - mean) * inv * g[e] + b[e];
        store_vec16(out + (uint64_t)j * E, o);
    }
}

// ---- division by a divisor fixed for a launch -------------------------------------------------

// n / d for any 32-bit n, as a multiply-high and two shifts (Granlund and Montgomery, "Division
// by invariant integers using multiplication", 1994, figure 4.1): the launcher computes, once
// per divisor d >= 1, l = ceil(log2 d) and mul = floor(2^32 (2^l - d) / d) + 1 (`FastDiv` in
// src/backend/gpu/conv.rs, which checks the identity). A 32-bit division is a loop of about 20
// instructions on a GPU, a 64-bit one several times that.
APPARATE_DEVICE uint32_t fast_div(uint32_t n, uint32_t mul, uint32_t l) {
    uint32_t t = (uint32_t)(((uint64_t)n * mul) >> 32);
    uint32_t sh1 = l < 1 ? l : 1u, sh2 = l > 0 ? l - 1 : 0u;
    return (t + ((n - t) >> sh1)) >> sh2;
}

// ---- windows over NHWC images --------------------------------------------------------------

// The taps of a kh x kw window at output pixel (y, x), stride (sh, sw), zero padding (ph, pw),
// that land inside an h x w image: f(i, j, iy, ix) for each, row by row. Taps in the padding
// are skipped (they contribute zero to a convolution and nothing to a pooling window).
template <typename F>
APPARATE_DEVICE void for_each_tap(uint32_t y, uint32_t x, uint32_t h, uint32_t w, uint32_t kh,
                                  uint32_t kw, uint32_t sh, uint32_t sw, uint32_t ph,
                                  uint32_t pw, F&& f) {
    for (uint32_t i = 0; i < kh; i++) {
        int iy = (int)(y * sh + i) - (int)ph;
        if (iy < 0 || iy >= (int)h) continue;
        for (uint32_t j = 0; j < kw; j++) {
            int ix = (int)(x * sw + j) - (int)pw;
            if (ix < 0 || ix >= (int)w) continue;
            f(i, j, (uint32_t)iy, (uint32_t)ix);
        }
    }
}

// Activations fused into epilogues; the ACT_* codes are in params.cuh.
APPARATE_DEVICE float activate(float x, int act) {
    if (act == ACT_GELU_ERF) return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    if (act == ACT_TANH) return tanhf(x);
    if (act == ACT_RELU) return fmaxf(x, 0.0f);
    if (act == ACT_RELU6) return fminf(fmaxf(x, 0.0f), 6.0f);
    return x;
}

#endif  // APPARATE_APPARATE_CUH

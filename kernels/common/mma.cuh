// Warp-level tensor-core multiply: D(16x8, f32) += A(16x16) * B(16x8), A row-major, B
// column-major, f16 or bf16 inputs. On the GPU this is one `mma.sync.aligned.m16n8k16`; on the
// emulated device the warp exchanges its fragments and every lane computes its own outputs.
//
// Fragment layout (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), with
// g = lane / 4 and t = lane % 4; each 32-bit register holds two consecutive-column values, the
// lower column in the low half:
//   a[0]: A[g][2t, 2t+1]      a[1]: A[g+8][2t, 2t+1]
//   a[2]: A[g][2t+8, 2t+9]    a[3]: A[g+8][2t+8, 2t+9]
//   b[0]: B[2t, 2t+1][g]      b[1]: B[2t+8, 2t+9][g]     (rows of B = k)
//   d[0..1]: D[g][2t, 2t+1]   d[2..3]: D[g+8][2t, 2t+1]
#pragma once
// Guarded too: NVRTC sees this header under two names (from kernels/ and from common/).
#ifndef APPARATE_MMA_CUH
#define APPARATE_MMA_CUH

#include "apparate.cuh"

#ifndef APPARATE_EMU
template <typename T>
APPARATE_DEVICE void mma_16816_ptx(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
APPARATE_DEVICE void mma_16816_ptx<f16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
APPARATE_DEVICE void mma_16816_ptx<bf16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

template <typename T>
APPARATE_DEVICE float mma_half_to_f32(uint32_t packed, int hi) {
    T v;
    v.bits = (uint16_t)(hi ? packed >> 16 : packed & 0xffffu);
    return to_f32(v);
}

#ifdef APPARATE_EMU
// The warp's multiply on the emulated device, run once by one lane (apparate_emu_warp_collective):
// lane l's fragments are words 0..3 (A) and 4..5 (B) of its slot; its four sums of products go to
// words 8..11 (as f32 bits), in d's order. Each output is summed over k in order 0..15 and then
// added to the accumulator, as when every lane computed its own.
template <typename T>
inline void apparate_emu_mma_16816_warp(uint32_t* s) {
    apparate_emu_count_mma();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; l++) {
        int g = l / 4, t = l % 4;
        const uint32_t* r = &s[l * 16];
        for (int h = 0; h < 2; h++) {
            A[g][2 * t + h] = mma_half_to_f32<T>(r[0], h);
            A[g + 8][2 * t + h] = mma_half_to_f32<T>(r[1], h);
            A[g][2 * t + 8 + h] = mma_half_to_f32<T>(r[2], h);
            A[g + 8][2 * t + 8 + h] = mma_half_to_f32<T>(r[3], h);
            B[2 * t + h][g] = mma_half_to_f32<T>(r[4], h);
            B[2 * t + 8 + h][g] = mma_half_to_f32<T>(r[5], h);
        }
    }
    for (int row = 0; row < 16; row++) {
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int k = 0; k < 16; k++)
            for (int n = 0; n < 8; n++) acc[n] += A[row][k] * B[k][n];
        // D[row][n] is lane (row % 8) * 4 + n / 2's d[2 * (row >= 8) + n % 2].
        for (int n = 0; n < 8; n++)
            std::memcpy(&s[((row % 8) * 4 + n / 2) * 16 + 8 + 2 * (row >= 8) + n % 2], &acc[n], 4);
    }
}
#endif

template <typename T>
APPARATE_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef APPARATE_EMU
    uint32_t* s = apparate_emu_warp_exchange();
    int lane = (int)apparate_emu_thread->lane;
    for (int i = 0; i < 4; i++) s[lane * 16 + i] = a[i];
    for (int i = 0; i < 2; i++) s[lane * 16 + 4 + i] = b[i];
    apparate_emu_warp_collective(s, apparate_emu_mma_16816_warp<T>);
    for (int i = 0; i < 4; i++) {
        float p;
        std::memcpy(&p, &s[lane * 16 + 8 + i], 4);
        d[i] += p;
    }
#else
    mma_16816_ptx<T>(d, a, b);
#endif
}

#endif  // APPARATE_MMA_CUH

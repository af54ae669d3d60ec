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

template <typename T>
APPARATE_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef APPARATE_EMU
    uint32_t* s = apparate_emu_warp_scratch();  // 32 lanes x 16 words
    int lane = (int)apparate_emu_thread->lane;
    for (int i = 0; i < 4; i++) s[lane * 16 + i] = a[i];
    for (int i = 0; i < 2; i++) s[lane * 16 + 4 + i] = b[i];
    apparate_emu_warp_barrier();
    int g = lane / 4, t = lane % 4;
    for (int r = 0; r < 2; r++) {       // output rows g, g+8
        for (int c = 0; c < 2; c++) {   // output cols 2t, 2t+1
            int row = g + 8 * r, col = 2 * t + c;
            float acc = 0.0f;
            for (int k = 0; k < 16; k++) {
                // A[row][k]: lane (row%8)*4 + (k%8)/2, register (row>=8) + 2*(k>=8), half k%2.
                int al = (row % 8) * 4 + (k % 8) / 2, ar = (row >= 8) + 2 * (k >= 8);
                // B[k][col]: lane col*4 + (k%8)/2, register (k>=8), half k%2.
                int bl = col * 4 + (k % 8) / 2, br = (k >= 8);
                acc += mma_half_to_f32<T>(s[al * 16 + ar], k % 2) *
                       mma_half_to_f32<T>(s[bl * 16 + 4 + br], k % 2);
            }
            d[2 * r + c] += acc;
        }
    }
    apparate_emu_warp_barrier();
#else
    mma_16816_ptx<T>(d, a, b);
#endif
}

#endif  // APPARATE_MMA_CUH

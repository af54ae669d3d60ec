// Warpgroup tensor-core multiply of Hopper (sm_90a): `wgmma.mma_async` with both operands in
// shared memory, read through 64-bit matrix descriptors, and the fences and groups around it.
// The GPU path needs the `sm_90a` target (the backend compiles for it on compute capability
// 9.0); elsewhere `WGMMA_AVAILABLE` is 0 and a kernel built on it must not be launched (the
// launcher asks the device). On the emulated device each piece has a twin that follows the PTX
// ISA ("Asynchronous Warpgroup Level Matrix Multiply-Accumulate"):
// - a multiply is queued per thread and performed only when a `wgmma.wait_group` lets it (or
//   the queue is full), reading shared memory then, so a kernel that refills a stage before the
//   multiplies reading it have completed reads the new contents, as it may on a GPU;
// - descriptors are decoded bit by bit (start address, strides, swizzle mode) and the 128-byte
//   swizzle is applied to shared-window address bits, as the hardware does.
//
// Operand layout used here (the only one the twin accepts; anything else aborts with a message):
// both operands K-major (A [m][k], B [n][k], i.e. imm-trans-a = imm-trans-b = 0), 16-bit
// elements, the 128-byte swizzle: rows of 64 elements (128 bytes) stored 128 bytes apart, 8-row
// groups SBO bytes apart, and within each 1024-byte group the 16-byte chunk c of row r stored
// at chunk c ^ (r % 8). The group's base must be 1024-byte aligned in the shared window; the
// k16 slices of a 64-element row are addressed by advancing the start address 32 bytes at a
// time (the swizzle acts on the absolute address bits).
//
// Accumulator fragment of m64nNk16 (f32), thread t of the warpgroup (warp w = t / 32 % 4,
// lane l): d[4j + 2i + c] = D[16 w + l / 4 + 8 i][8 j + 2 (l % 4) + c], j < N / 8: the
// mma.m16n8 accumulator layout, warp w owning rows 16w..16w+15, repeated along N.
#pragma once
// Guarded too: NVRTC sees this header under two names (from kernels/ and from common/).
#ifndef APPARATE_WGMMA_CUH
#define APPARATE_WGMMA_CUH

#include "apparate.cuh"

#if defined(APPARATE_EMU) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WGMMA_AVAILABLE 1
#else
#define WGMMA_AVAILABLE 0
#endif

// The 32-bit shared-window address of a pointer into shared memory. On the emulated device the
// window is the block's dynamic shared memory, so only pointers into it have an address.
#ifdef APPARATE_EMU
APPARATE_DEVICE uint32_t wgmma_smem_addr(const void* p) {
    const unsigned char* base = apparate_emu_block->dyn_shared;
    const unsigned char* q = static_cast<const unsigned char*>(p);
    if (q < base || q >= base + apparate_emu_block->dyn_shared_bytes) {
        std::fprintf(stderr, "wgmma: %p is not in the block's dynamic shared memory\n", p);
        std::abort();
    }
    return (uint32_t)(q - base);
}
#else
APPARATE_DEVICE uint32_t wgmma_smem_addr(const void* p) {
    uint64_t a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (uint32_t)a;
}
#endif

// Descriptor of a K-major, 128-byte-swizzled operand at shared-window address `addr`, 8-row
// groups `sbo` bytes apart. Bits: 0-13 start address >> 4, 16-29 leading byte offset >> 4
// (unused by this layout: 1 by convention), 32-45 stride byte offset >> 4, 49-51 base offset
// (0: groups 1024-byte aligned), 62-63 swizzle mode (1 = 128 bytes).
APPARATE_DEVICE uint64_t wgmma_desc_sw128(uint32_t addr, uint32_t sbo) {
    return (uint64_t)((addr & 0x3FFFFu) >> 4) | ((uint64_t)1 << 16) |
           ((uint64_t)((sbo & 0x3FFFFu) >> 4) << 32) | ((uint64_t)1 << 62);
}

// Makes this thread's earlier generic-proxy writes of shared memory (stores, cp.async copies
// that have landed) visible to the async proxy that wgmma reads through. Then a barrier.
APPARATE_DEVICE void fence_proxy_async_shared() {
#ifndef APPARATE_EMU
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Orders this thread's register accesses to accumulators before the wgmma that follow.
APPARATE_DEVICE void wgmma_fence() {
#if defined(APPARATE_EMU)
#elif WGMMA_AVAILABLE
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

// Keeps the compiler from moving accesses of an accumulator across the asynchronous multiply.
APPARATE_DEVICE void wgmma_fence_operand(float& r) {
#ifndef APPARATE_EMU
    asm volatile("" : "+f"(r)::"memory");
#endif
}

#ifdef APPARATE_EMU
// Row `row` (k = 0..15) of a K-major 128-byte-swizzled operand, decoded from its descriptor.
template <typename T>
inline void apparate_emu_wgmma_row(uint64_t desc, int row, float (&out)[16]) {
    uint32_t start = apparate_emu_desc_start(desc), sbo = apparate_emu_desc_sbo(desc);
    uint32_t base_offset = (uint32_t)((desc >> 49) & 7u), swizzle = (uint32_t)(desc >> 62);
    if (swizzle != 1 || base_offset != 0) {
        std::fprintf(stderr, "wgmma: the emulated device has the 128-byte swizzle with base offset 0 "
                             "only (descriptor swizzle %u, base offset %u)\n", swizzle, base_offset);
        std::abort();
    }
    uint32_t first = start + (uint32_t)(row / 8) * sbo + (uint32_t)(row % 8) * 128;
    for (int k = 0; k < 16; k++) {
        uint32_t a = first + (uint32_t)k * 2;
        a ^= ((a >> 7) & 7u) << 4;  // 16-byte chunk ^= row within the 1024-byte pattern
        if (a + 2 > apparate_emu_block->dyn_shared_bytes) {
            std::fprintf(stderr, "wgmma: operand address %u past %u bytes of dynamic shared memory\n",
                         a, (unsigned)apparate_emu_block->dyn_shared_bytes);
            std::abort();
        }
        T v;
        std::memcpy(&v.bits, apparate_emu_block->dyn_shared + a, 2);
        out[k] = to_f32(v);
    }
}

// Performs one queued multiply: this thread's accumulators only (they depend on shared memory
// and its own registers, so no exchange between lanes is needed). Its two rows of A are decoded
// once, each column of B once for both rows.
template <typename T>
inline void apparate_emu_wgmma_run_as(const ApparateEmuWgmma& op) {
    ApparateEmuThread* t = apparate_emu_thread;
    int w = (int)(t->warp % 4), l = (int)t->lane;
    float a[2][16], b[16];
    for (int i = 0; i < 2; i++) apparate_emu_wgmma_row<T>(op.desc_a, 16 * w + l / 4 + 8 * i, a[i]);
    for (int j = 0; j < op.n / 8; j++)
        for (int c = 0; c < 2; c++) {
            apparate_emu_wgmma_row<T>(op.desc_b, 8 * j + 2 * (l % 4) + c, b);
            for (int i = 0; i < 2; i++) {
                float acc = 0.0f;
                for (int k = 0; k < 16; k++) acc += a[i][k] * b[k];
                float& d = op.d[4 * j + 2 * i + c];
                d = op.scale_d ? d + acc : acc;
            }
        }
}
inline void apparate_emu_wgmma_run(const ApparateEmuWgmma& op) {
    if (op.bf16)
        apparate_emu_wgmma_run_as<bf16>(op);
    else
        apparate_emu_wgmma_run_as<f16>(op);
}

// Lands this thread's queued multiplies of groups before `keep_from` (in issue order).
inline void apparate_emu_wgmma_land(unsigned keep_from) {
    ApparateEmuThread* t = apparate_emu_thread;
    unsigned kept = 0;
    for (unsigned i = 0; i < t->n_wgmma; i++) {
        ApparateEmuWgmma op = t->wgmma[i];
        if (op.group != ~0u && op.group < keep_from)
            apparate_emu_wgmma_run(op);
        else
            t->wgmma[kept++] = op;
    }
    t->n_wgmma = kept;
}
#endif

// D (64 x N, f32, in N / 2 registers per thread) = A (64 x 16) * B (16 x N) + (scale_d ? D : 0),
// N = 128 or 256, issued by all 128 threads of a warpgroup (four consecutive warps, the first a
// multiple of 4). Asynchronous: D must not be read or written until a wgmma_wait lets the group
// complete.
#if !defined(APPARATE_EMU) && WGMMA_AVAILABLE
// The PTX per shape (operands: the N / 2 accumulators, then the two descriptors and scale-d as
// a predicate; scale-a and scale-b 1, both operands K-major: imm-trans 0) and storage type (it
// names the instruction's .atype and .btype).
#define WGMMA_M64N128K16(TY)  \
    asm volatile(  \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"  \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {"  \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "  \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "  \
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "  \
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "  \
        "%64, %65, p, 1, 1, 0, 0;\n}\n"  \
        :  \
          "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
        : "l"(da), "l"(db), "r"(scale_d))
#define WGMMA_M64N256K16(TY)  \
    asm volatile(  \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"  \
        "wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY " {"  \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "  \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "  \
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "  \
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "  \
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "  \
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "  \
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "  \
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "  \
        "%128, %129, p, 1, 1, 0, 0;\n}\n"  \
        :  \
          "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127]) \
        : "l"(da), "l"(db), "r"(scale_d))
template <typename T, int N>
struct wgmma_ptx;
#define WGMMA_PTX(T, N)                                                                      \
    template <>                                                                              \
    struct wgmma_ptx<T, N> {                                                                 \
        static APPARATE_DEVICE void run(float (&d)[N / 2], uint64_t da, uint64_t db,         \
                                        int scale_d) {                                       \
            WGMMA_M64N##N##K16(#T);                                                          \
        }                                                                                    \
    };
WGMMA_PTX(f16, 128)
WGMMA_PTX(bf16, 128)
WGMMA_PTX(f16, 256)
WGMMA_PTX(bf16, 256)
#endif

template <typename T, int N>
APPARATE_DEVICE void wgmma_m64k16(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b,
                                  int scale_d) {
    static_assert(N == 128 || N == 256, "wgmma shapes: m64n128k16, m64n256k16");
#ifdef APPARATE_EMU
    ApparateEmuThread* t = apparate_emu_thread;
    if (t->n_wgmma == APPARATE_EMU_MAX_WGMMA) {
        // Full: complete the oldest now (a GPU may complete one any time before its wait).
        ApparateEmuWgmma op = t->wgmma[0];
        std::memmove(&t->wgmma[0], &t->wgmma[1], (t->n_wgmma - 1) * sizeof(ApparateEmuWgmma));
        t->n_wgmma--;
        apparate_emu_wgmma_run(op);
    }
    t->wgmma[t->n_wgmma++] =
        ApparateEmuWgmma{d, desc_a, desc_b, N, scale_d != 0, std::is_same<T, bf16>::value, ~0u};
#elif WGMMA_AVAILABLE
    wgmma_ptx<T, N>::run(d, desc_a, desc_b, scale_d);
#else
    __trap();  // not built for sm_90a: the launcher never picks a wgmma kernel here
#endif
}

// Closes the group of this thread's multiplies issued since the last commit.
APPARATE_DEVICE void wgmma_commit() {
#ifdef APPARATE_EMU
    ApparateEmuThread* t = apparate_emu_thread;
    for (unsigned i = 0; i < t->n_wgmma; i++)
        if (t->wgmma[i].group == ~0u) t->wgmma[i].group = t->wgmma_groups;
    t->wgmma_groups++;
#elif WGMMA_AVAILABLE
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's most recently committed groups are pending; the
// accumulators of the completed ones may then be read, and the shared memory they read reused.
template <int N>
APPARATE_DEVICE void wgmma_wait() {
#ifdef APPARATE_EMU
    ApparateEmuThread* t = apparate_emu_thread;
    apparate_emu_wgmma_land(t->wgmma_groups >= (unsigned)N ? t->wgmma_groups - N : 0);
#elif WGMMA_AVAILABLE
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

#endif  // APPARATE_WGMMA_CUH

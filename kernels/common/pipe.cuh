// Asynchronous global-to-shared copies and warp-wide matrix loads from shared memory (sm_80+):
// the building blocks of the pipelined GEMM. On the GPU each is one PTX instruction; on the
// emulated device each has a twin that follows the PTX ISA's semantics closely enough to catch
// the mistakes that matter:
// - `cp.async` copies are queued per thread and land only when a `cp.async.wait_group` lets them
//   (a read of shared memory before the wait sees the old contents, as it may on a GPU);
// - `ldmatrix` exchanges row addresses across the warp exactly as the fragment layout says.
#pragma once
// Guarded too: NVRTC sees this header under two names (from kernels/ and from common/).
#ifndef APPARATE_PIPE_CUH
#define APPARATE_PIPE_CUH

#include "apparate.cuh"

#ifndef APPARATE_EMU
// The 32-bit shared-window address of a generic pointer into shared memory.
APPARATE_DEVICE uint32_t smem_addr(const void* p) {
    uint64_t a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (uint32_t)a;
}
#endif

// 16 bytes global -> shared without passing through registers (cp.async.cg: cached in L2 only).
// `pred` false zero-fills the 16 bytes and reads nothing (src-size 0); `src` must still be a
// valid address, so callers pass the tensor's base there. Both addresses 16-byte aligned.
APPARATE_DEVICE void cp_async16(void* dst, const void* src, bool pred) {
#ifdef APPARATE_EMU
    ApparateEmuThread* t = apparate_emu_thread;
    if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % 16 != 0) {
        std::fprintf(stderr, "cp.async: address not 16-byte aligned (dst %p, src %p)\n", dst, src);
        std::abort();  // a GPU raises a misaligned-address fault
    }
    apparate_emu_note_cp_async(dst);
    if (t->early_copies) {
        t->early_copies ^= t->early_copies << 13;  // xorshift64
        t->early_copies ^= t->early_copies >> 7;
        t->early_copies ^= t->early_copies << 17;
        if (t->early_copies & 1) {
            std::memcpy(dst, src, pred ? 16 : 0);
            std::memset((char*)dst + (pred ? 16 : 0), 0, pred ? 0 : 16);
            return;
        }
    }
    if (t->n_copies == APPARATE_EMU_MAX_COPIES) {
        // Full: land the oldest early (a GPU may complete a copy at any time before the wait).
        ApparateEmuCopy& c = t->copies[0];
        std::memcpy(c.dst, c.src, c.src_bytes);
        std::memset((char*)c.dst + c.src_bytes, 0, c.bytes - c.src_bytes);
        std::memmove(&t->copies[0], &t->copies[1], (t->n_copies - 1) * sizeof(ApparateEmuCopy));
        t->n_copies--;
    }
    t->copies[t->n_copies++] = ApparateEmuCopy{dst, src, 16u, pred ? 16u : 0u, ~0u};
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(pred ? 16 : 0));
#endif
}

// Closes the group of this thread's copies issued since the last commit.
APPARATE_DEVICE void cp_async_commit() {
#ifdef APPARATE_EMU
    ApparateEmuThread* t = apparate_emu_thread;
    for (unsigned i = 0; i < t->n_copies; i++)
        if (t->copies[i].group == ~0u) t->copies[i].group = t->groups_committed;
    t->groups_committed++;
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's most recently committed groups are still in flight.
// Copies land in shared memory visible to this thread only; a __syncthreads() after the wait
// makes every thread's copies visible to the block.
template <int N>
APPARATE_DEVICE void cp_async_wait() {
#ifdef APPARATE_EMU
    ApparateEmuThread* t = apparate_emu_thread;
    unsigned keep_from = t->groups_committed >= (unsigned)N ? t->groups_committed - N : 0;
    unsigned kept = 0;
    for (unsigned i = 0; i < t->n_copies; i++) {
        ApparateEmuCopy c = t->copies[i];
        if (c.group != ~0u && c.group < keep_from) {
            std::memcpy(c.dst, c.src, c.src_bytes);
            std::memset((char*)c.dst + c.src_bytes, 0, c.bytes - c.src_bytes);
        } else {
            t->copies[kept++] = c;
        }
    }
    t->n_copies = kept;
#else
    // "memory": plain loads of the landed bytes must not move above the wait.
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// The row and 16-byte chunk that the idx-th 16-byte copy into a shared tile takes, for rows of
// CHUNKS chunks stored with an odd pitch (padded by one chunk, so consecutive rows start on
// different groups of four banks). A warp's 16-byte accesses are served eight lanes at a time,
// and eight lanes whose chunks share a bank group take that many wavefronts. With CHUNKS >= 8
// the order is row-major: eight lanes take eight neighbouring chunks of one row. With CHUNKS = 4
// row-major would give eight lanes two rows (pitch 5 chunks: chunk 3 of the first row and chunk
// 0 of the second share a bank group, every phase twice as long), so each warp's 32 copies take
// 8 rows x 4 chunks with the eight lanes of a phase going down the rows. Either way a warp reads
// the same bytes of global memory, so coalescing does not change. Needs idx's range to be whole
// warps of copies (rows a multiple of 8 when CHUNKS = 4).
template <int CHUNKS>
APPARATE_DEVICE void copy_slot(uint32_t idx, uint32_t& row, uint32_t& chunk) {
    static_assert(CHUNKS == 4 || CHUNKS % 8 == 0, "rows of 4 or of a multiple of 8 chunks");
    if (CHUNKS == 4) {
        row = (idx / 32) * 8 + idx % 8;
        chunk = (idx % 32) / 8;
    } else {
        row = idx / CHUNKS;
        chunk = idx % CHUNKS;
    }
}

#ifdef APPARATE_EMU
// Both ldmatrix twins: the warp exchanges its row addresses, then each lane gathers its four
// registers; `trans` picks the transposed element of each matrix.
inline void apparate_emu_ldmatrix(uint32_t (&r)[4], const void* row, bool trans) {
    if (reinterpret_cast<uintptr_t>(row) % 16 != 0) {
        std::fprintf(stderr, "ldmatrix: row address %p not 16-byte aligned\n", row);
        std::abort();  // a GPU raises a misaligned-address fault
    }
    uint32_t* s = apparate_emu_warp_exchange();
    int lane = (int)apparate_emu_thread->lane;
    std::memcpy(&s[lane * 16], &row, sizeof(row));
    // One lane gathers for the warp while the others wait, so no lane's later shared-memory
    // store can land in another lane's fragment (the instruction reads for the whole warp).
    apparate_emu_warp_collective(s, [trans](uint32_t* s) {
        uint32_t addr[32];
        for (int l = 0; l < 32; l++) {
            const void* p;
            std::memcpy(&p, &s[l * 16], sizeof(p));
            addr[l] = apparate_emu_smem_offset(p);
        }
        apparate_emu_bank_phases(addr, 0xffffffffu, apparate_emu_ldmatrix_banks());
        // Element (row q, column c) of matrix i, from the row address lane 8i + q gave.
        auto at = [&](int i, int q, int c) {
            const unsigned char* src;
            std::memcpy(&src, &s[(i * 8 + q) * 16], sizeof(src));
            uint16_t h;
            std::memcpy(&h, src + 2 * c, 2);
            return (uint32_t)h;
        };
        for (int l = 0; l < 32; l++) {
            int q = l / 4, c = 2 * (l % 4);
            for (int i = 0; i < 4; i++)
                s[l * 16 + 8 + i] = trans ? at(i, c, q) | at(i, c + 1, q) << 16
                                          : at(i, q, c) | at(i, q, c + 1) << 16;
        }
    });
    for (int i = 0; i < 4; i++) r[i] = s[lane * 16 + 8 + i];
}
#endif

// Four 8x8 matrices of 16-bit elements from shared memory, one register per matrix per lane:
// lanes 8i..8i+7 give the addresses of matrix i's rows 0..7 (16 contiguous bytes each, 16-byte
// aligned); lane l receives in r[i] matrix i's row l/4, elements 2(l%4) and 2(l%4)+1 (the lower
// one in the low half). That is the mma.m16n8k16 A fragment when the four matrices are the
// 16x16 tile's (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15),
// and two B fragments for rows of a [n, k] operand.
APPARATE_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#ifdef APPARATE_EMU
    apparate_emu_ldmatrix(r, row, false);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
#endif
}

// ldmatrix_x4 with .trans: each 8x8 matrix arrives transposed, so lane l receives in r[i]
// matrix i's elements (row 2(l%4), column l/4) and (row 2(l%4)+1, column l/4), rows addressed
// as above. That is the mma B fragment of a [k, n] operand stored with n contiguous (attention's
// values: rows are keys, columns the head dimension).
APPARATE_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
#ifdef APPARATE_EMU
    apparate_emu_ldmatrix(r, row, true);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
#endif
}

#endif  // APPARATE_PIPE_CUH

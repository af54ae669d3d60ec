// The emulated CUDA device: what kernel sources see when they are compiled by the host C++
// compiler (APPARATE_EMU). A launch runs each block's threads as cooperative fibers on one OS
// thread: __syncthreads is a real block barrier, warp operations (shuffles, votes, the
// matrix-multiply wrappers) meet at warp barriers, `__shared__` storage is per block.
// See emu.cpp for the scheduler; kernels/common/apparate.cuh for the portable kernel API.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

struct uint3 {
    unsigned int x, y, z;
};
typedef uint3 dim3;

// An asynchronous global-to-shared copy (`cp.async`) not yet landed: the emulated device
// performs it only when a `cp.async.wait_group` lets it, so a kernel that reads the shared
// memory before waiting sees the old contents there as it could on a GPU.
struct ApparateEmuCopy {
    void* dst;
    const void* src;
    unsigned int bytes, src_bytes;  // src_bytes < bytes: the rest is zero-filled
    unsigned int group;             // commit-group number; ~0u while not yet committed
};
#define APPARATE_EMU_MAX_COPIES 256

// A warpgroup multiply (`wgmma.mma_async`) not yet performed: it reads shared memory and updates
// this thread's accumulators only when a `wgmma.wait_group` lets it (kernels/common/wgmma.cuh).
struct ApparateEmuWgmma {
    float* d;                  // this thread's accumulators
    uint64_t desc_a, desc_b;   // shared-memory matrix descriptors
    int n;                     // the instruction's N
    bool scale_d, bf16;        // accumulate into d (or overwrite); operand type
    unsigned int group;        // commit-group number; ~0u while not yet committed
};
#define APPARATE_EMU_MAX_WGMMA 16

// Per-fiber and per-block state visible to kernel code.
struct ApparateEmuThread {
    uint3 thread_idx;
    unsigned int lane;  // linear thread index % 32
    unsigned int warp;  // linear thread index / 32
    // This thread's cp.async copies in flight, in issue order, and its commit-group count.
    ApparateEmuCopy copies[APPARATE_EMU_MAX_COPIES];
    unsigned int n_copies, groups_committed;
    // Non-zero (shuffled schedules only): the state of a generator that lands about half of
    // this thread's copies at issue.
    uint64_t early_copies;
    // This thread's wgmma multiplies in flight, in issue order, and its commit-group count.
    ApparateEmuWgmma wgmma[APPARATE_EMU_MAX_WGMMA];
    unsigned int n_wgmma, wgmma_groups;
    // Which of its warp's two exchange buffers this lane's next warp operation uses.
    unsigned int exchange_parity;
    // cp.async copies this thread has issued in its block: the k-th copy of every lane of a
    // warp is one instruction of the warp (apparate_emu_note_cp_async).
    unsigned int cp_async_issued;
};
// A tensor copy (`cp.async.bulk.tensor`, TMA) not yet landed: the block's copies land one at a
// time while some thread waits on an mbarrier phase that is not complete, and then complete
// their bytes on the barrier they name (kernels/common/tma.cuh). A copy belongs to the block,
// not to the thread that issued it (which may exit before it lands).
struct ApparateEmuBulk {
    unsigned char* dst;       // shared memory, 128-byte aligned
    uint64_t map[16];         // the tensor map, by value (the issuer's parameter copy may go)
    int32_t c0, c1;           // box coordinates: column (innermost), row
    uint64_t* bar;            // the mbarrier whose transaction count the bytes complete
};
#define APPARATE_EMU_MAX_BULK 64

struct ApparateEmuBlock {
    uint3 block_idx;
    uint3 block_dim;
    uint3 grid_dim;
    unsigned char* dyn_shared;
    size_t dyn_shared_bytes;
    // The block's tensor copies in flight, in issue order; a block must not exit with any.
    ApparateEmuBulk bulk[APPARATE_EMU_MAX_BULK];
    unsigned int n_bulk;
    // Non-zero (shuffled schedules only): the generator that picks which copy lands next, lands
    // copies early at arrivals and issues (emu/mbarrier.cpp, shuffle_point).
    uint64_t bulk_shuffle;
};

extern thread_local ApparateEmuThread* apparate_emu_thread;
extern thread_local ApparateEmuBlock* apparate_emu_block;

#define threadIdx (apparate_emu_thread->thread_idx)
#define blockIdx (apparate_emu_block->block_idx)
#define blockDim (apparate_emu_block->block_dim)
#define gridDim (apparate_emu_block->grid_dim)
#define warpSize 32

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __restrict__ __restrict
// One OS thread runs one block at a time and every fiber of the block on itself, so storage that
// is static per OS thread is exactly per-block shared memory.
#define __shared__ static thread_local
#define __align__(n) __attribute__((aligned(n)))
// Register and occupancy hints for the GPU compiler; nothing to do on the host.
#define __launch_bounds__(...)
// A kernel parameter the kernel may take the address of (a tensor map): a plain parameter here.
#define __grid_constant__

// Scheduler entry points (emu.cpp).
void apparate_emu_syncthreads();
void apparate_emu_warp_barrier();
// A thread waiting for a condition other threads of its block will make true yields here (it is
// run again every round); whatever may make such a condition true reports progress, so that a
// round of spinning without any is reported as a deadlock instead of hanging.
void apparate_emu_spin();
void apparate_emu_progress();
// Fields of a wgmma shared-memory matrix descriptor (kernels/common/wgmma.cuh): the start
// address and the stride byte offset (8-row groups), in bytes.
inline uint32_t apparate_emu_desc_start(uint64_t desc) { return (uint32_t)(desc & 0x3FFFu) << 4; }
inline uint32_t apparate_emu_desc_sbo(uint64_t desc) {
    return (uint32_t)((desc >> 32) & 0x3FFFu) << 4;
}
// A thread of the block whose queued (not yet waited for) wgmma reads shared-window bytes
// [lo, hi), or -1: what lands there now may be what that multiply reads on a GPU.
int apparate_emu_wgmma_reader(uint32_t lo, uint32_t hi);
// mbarrier and tensor-copy (TMA) twins (mbarrier.cpp): init, arrival announcing `tx_bytes` of
// copies (0: a plain arrival), the wait for a phase of a parity (landing queued copies while
// it is incomplete), and a 2-D box copy that completes its bytes on `bar`.
void apparate_emu_mbar_init(uint64_t* bar, uint32_t count);
void apparate_emu_mbar_arrive(uint64_t* bar, uint32_t tx_bytes);
void apparate_emu_mbar_wait(uint64_t* bar, uint32_t parity);
void apparate_emu_tma_load_2d(void* dst, const uint64_t* map, int32_t c0, int32_t c1,
                              uint64_t* bar);
// Shared-memory bank accounting of the instructions the emulated device sees for the whole
// warp: `ldmatrix` (one instruction, its 32 row addresses) and `cp.async` (the k-th copy of each
// lane of a warp, matched up when the block ends). A 16-byte access of a warp is served in four
// phases of eight lanes (for ldmatrix.x4: one 8x8 matrix's eight rows each); a phase takes as
// many wavefronts as the most distinct 16-byte chunks that fall on one group of four banks
// (address bits 4-6), and one when they all differ. `ideal` counts the phases, `actual` their
// wavefronts: actual > ideal is a bank conflict the GPU would serialize.
struct ApparateEmuBankCount {
    uint64_t ideal, actual;
};
// What a launch hands back (the layout of BankTraffic in src/backend/emu.rs): ldmatrix's and
// cp.async's wavefronts, and the warp-wide mma.m16n8k16 they fed.
struct ApparateEmuCounts {
    ApparateEmuBankCount ldmatrix, cp_async;
    uint64_t mma;
};
// Offset in the shared window: from the block's dynamic shared memory, which the GPU places on a
// 128-byte boundary of the window (a pointer outside it keeps its own address bits).
uint32_t apparate_emu_smem_offset(const void* p);
// Adds the phases of one warp access of 16 bytes per lane (lanes in `mask`, offsets `addr`).
void apparate_emu_bank_phases(const uint32_t (&addr)[32], uint32_t mask, ApparateEmuBankCount& c);
// The running launch's counts for ldmatrix and for cp.async's shared-memory writes.
ApparateEmuBankCount& apparate_emu_ldmatrix_banks();
// Counts one warp's mma.m16n8k16 in the running launch (the work the wavefronts feed).
void apparate_emu_count_mma();
// Records this lane's next cp.async destination (counted when the block ends).
void apparate_emu_note_cp_async(const void* dst);

// The exchange buffer of this lane's next warp operation: 32 lanes x 16 words, shared by the
// warp. A warp operation writes its lane's words, meets the warp at one barrier, then reads: the
// warp's operations alternate between two buffers, so the next operation writes the other one,
// and the one after it cannot start before every lane has passed the next one's barrier, which
// it reaches only after its reads here. (Every lane runs the same warp operations in the same
// order, as `*_sync` with a full mask requires, so the lanes' parities agree.)
uint32_t* apparate_emu_warp_exchange();

// A collective warp operation (mma, ldmatrix, a whole-warp reduction): every lane has written its
// inputs to words 0..7 of its 16-word slot in `s` (from apparate_emu_warp_exchange); after the
// warp barrier, the first lane to resume runs `whole_warp(s)` once for the warp, while every
// other lane still waits at the barrier: the hardware's view (one instruction for the warp,
// before any lane's next step), at the cost of one barrier. `whole_warp` leaves each lane's
// results in words 8..14 of its slot (word 15 of lane 0's slot is the flag).
template <typename F>
inline void apparate_emu_warp_collective(uint32_t* s, F whole_warp) {
    volatile uint32_t* done = &s[15];
    if (apparate_emu_thread->lane == 0) *done = 0;
    apparate_emu_warp_barrier();
    if (!*done) {
        whole_warp(s);
        *done = 1;
    }
}

inline void __syncthreads() { apparate_emu_syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { apparate_emu_warp_barrier(); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() {}

// ---- warp exchange -------------------------------------------------------------------------

template <typename T>
inline T apparate_emu_shfl(T v, int src_of_lane(int, int, int), int arg, int width) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    uint32_t* s = apparate_emu_warp_exchange();
    int lane = (int)apparate_emu_thread->lane;
    std::memcpy(&s[lane * 2], &v, sizeof(T));
    apparate_emu_warp_barrier();
    int src = src_of_lane(lane, arg, width);
    T r;
    std::memcpy(&r, &s[src * 2], sizeof(T));
    return r;
}
inline int apparate_emu_src_xor(int lane, int m, int width) {
    int src = lane ^ m;
    return (src / width == lane / width) ? src : lane;
}
inline int apparate_emu_src_down(int lane, int d, int width) {
    int src = lane + d;
    return (src / width == lane / width) ? src : lane;
}
inline int apparate_emu_src_up(int lane, int d, int width) {
    int src = lane - d;
    return (src >= (lane / width) * width) ? src : lane;
}
inline int apparate_emu_src_idx(int lane, int s, int width) { return (lane / width) * width + (s % width); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int m, int width = 32) {
    return apparate_emu_shfl(v, apparate_emu_src_xor, m, width);
}
template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned d, int width = 32) {
    return apparate_emu_shfl(v, apparate_emu_src_down, (int)d, width);
}
template <typename T>
inline T __shfl_up_sync(unsigned, T v, unsigned d, int width = 32) {
    return apparate_emu_shfl(v, apparate_emu_src_up, (int)d, width);
}
template <typename T>
inline T __shfl_sync(unsigned, T v, int s, int width = 32) {
    return apparate_emu_shfl(v, apparate_emu_src_idx, s, width);
}

inline unsigned __ballot_sync(unsigned, int pred) {
    uint32_t* s = apparate_emu_warp_exchange();
    int lane = (int)apparate_emu_thread->lane;
    s[lane * 2] = pred ? 1u : 0u;
    apparate_emu_warp_barrier();
    unsigned r = 0;
    for (int i = 0; i < 32; i++) r |= (s[i * 2] & 1u) << i;
    return r;
}
inline int __any_sync(unsigned m, int pred) { return __ballot_sync(m, pred) != 0; }
inline int __all_sync(unsigned m, int pred) { return __ballot_sync(m, pred) == 0xffffffffu; }

// ---- atomics (blocks of one launch run in parallel on several OS threads) --------------------

inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline float atomicAdd(float* p, float v) {
    uint32_t* u = reinterpret_cast<uint32_t*>(p);
    uint32_t old = __atomic_load_n(u, __ATOMIC_RELAXED);
    for (;;) {
        float f;
        std::memcpy(&f, &old, 4);
        f += v;
        uint32_t next;
        std::memcpy(&next, &f, 4);
        if (__atomic_compare_exchange_n(u, &old, next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
            std::memcpy(&f, &old, 4);
            return f;
        }
    }
}
inline int atomicMax(int* p, int v) {
    int old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
inline int atomicCAS(int* p, int cmp, int v) {
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return cmp;
}

// ---- math and bit casts --------------------------------------------------------------------

inline float __expf(float x) { return expf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __int_as_float(int x) {
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
inline float __uint_as_float(unsigned x) {
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned x;
    std::memcpy(&x, &f, 4);
    return x;
}
inline int __float_as_int(float f) {
    int x;
    std::memcpy(&x, &f, 4);
    return x;
}

// The emulated device's mbarriers (phases, arrivals and transaction counts) and the tensor copies
// (TMA, `cp.async.bulk.tensor`) that complete transaction counts, following the PTX ISA
// ("Parallel Synchronization and Communication Instructions: mbarrier", "Data Movement and
// Conversion Instructions: cp.async.bulk.tensor"). kernels/common/mbarrier.cuh and tma.cuh call
// these from their emulated branches.
//
// A barrier is its 8 bytes of shared memory: bits 0-19 arrivals still expected in the current
// phase, 20-39 arrivals expected per phase, 40-61 the transaction count (bytes still expected,
// 22-bit two's complement: a copy may complete before its bytes were announced), 63 the phase
// bit. A phase completes when both the arrivals and the transaction count reach zero.
//
// Tensor copies are queued per block and land one at a time while a thread waits on an
// incomplete phase (any barrier: on a GPU the copies progress on their own), so a kernel that
// reads a stage before the barrier naming its copies completed sees the old contents there.
// Under a shuffle seed copies also land at random arrivals and issues, and an arriving thread
// yields to the others (see shuffle_point).
#include "emu.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

constexpr uint64_t kCountMask = (1u << 20) - 1;
constexpr int64_t kTxLimit = (1 << 20) - 1;  // the PTX ISA's range of a transaction count
// The last word of an emulated tensor map (EMU_TENSOR_MAP_MARK in src/backend/emu.rs).
constexpr uint64_t kMapMark = 0x50414d5441505041ull;

struct Mbar {
    uint32_t pending, expected;
    int64_t tx;
    uint32_t phase;
};

[[noreturn]] void fail(const char* what, const void* bar) {
    std::fprintf(stderr, "mbarrier %p: %s\n", bar, what);
    std::abort();
}

Mbar load(const uint64_t* bar) {
    if (reinterpret_cast<uintptr_t>(bar) % 8 != 0) fail("not 8-byte aligned", bar);
    uint64_t v = *bar;
    int64_t tx = (int64_t)((v >> 40) & ((1ull << 22) - 1));
    if (tx >= (1 << 21)) tx -= 1 << 22;
    return Mbar{(uint32_t)(v & kCountMask), (uint32_t)((v >> 20) & kCountMask), tx,
                (uint32_t)(v >> 63)};
}

// Completes the phase when nothing more is expected in it, then stores.
void settle_store(uint64_t* bar, Mbar m) {
    if (m.tx > kTxLimit || m.tx < -kTxLimit) fail("transaction count out of range", bar);
    if (m.pending == 0 && m.tx == 0) {
        m.pending = m.expected;
        m.phase ^= 1;
    }
    *bar = (uint64_t)m.pending | ((uint64_t)m.expected << 20) |
           (((uint64_t)m.tx & ((1ull << 22) - 1)) << 40) | ((uint64_t)m.phase << 63);
    apparate_emu_progress();
}

// Performs one queued tensor copy (removing it from the queue) and completes its bytes.
void land(ApparateEmuBlock* b, unsigned i) {
    ApparateEmuBulk c = b->bulk[i];
    std::memmove(&b->bulk[i], &b->bulk[i + 1], (b->n_bulk - i - 1) * sizeof(ApparateEmuBulk));
    b->n_bulk--;
    const uint64_t* m = c.map;
    const unsigned char* base = reinterpret_cast<const unsigned char*>(m[0]);
    int64_t cols = (int64_t)m[1], rows = (int64_t)m[2];
    uint64_t stride = m[3];
    uint32_t box_cols = (uint32_t)m[4], box_rows = (uint32_t)m[5], elem = (uint32_t)m[6];
    uint32_t row_bytes = box_cols * elem;
    uint32_t window = (uint32_t)(c.dst - b->dyn_shared);
    int reader = apparate_emu_wgmma_reader(window, window + row_bytes * box_rows);
    if (reader >= 0) {
        // On a GPU the multiply may read the old bytes, the new ones or a mix.
        std::fprintf(stderr,
                     "tma: a copy lands on shared memory [%u, %u) that a wgmma of thread %d reads "
                     "and that thread has not waited for: the stage was released before the "
                     "multiplies reading it completed\n",
                     window, window + row_bytes * box_rows, reader);
        std::abort();
    }
    for (uint32_t r = 0; r < box_rows; r++)
        for (uint32_t e = 0; e < box_cols; e++) {
            int64_t gr = (int64_t)c.c1 + r, gc = (int64_t)c.c0 + e;
            // The 128-byte swizzle acts on the shared-window address: bits 4-6 ^= bits 7-9.
            uint32_t a = window + r * row_bytes + e * elem;
            a ^= ((a >> 7) & 7) << 4;
            unsigned char* d = b->dyn_shared + a;
            if (gr >= 0 && gr < rows && gc >= 0 && gc < cols)
                std::memcpy(d, base + (uint64_t)gr * stride + (uint64_t)gc * elem, elem);
            else
                std::memset(d, 0, elem);
        }
    Mbar bar = load(c.bar);
    bar.tx -= (int64_t)row_bytes * box_rows;  // the whole box, filled elements included
    settle_store(c.bar, bar);
}

// Shuffled schedules only: a coin from the block's generator (xorshift64).
bool coin(ApparateEmuBlock* b) {
    b->bulk_shuffle ^= b->bulk_shuffle << 13;
    b->bulk_shuffle ^= b->bulk_shuffle >> 7;
    b->bulk_shuffle ^= b->bulk_shuffle << 17;
    return b->bulk_shuffle & 1;
}

// Shuffled schedules only: a GPU may land a copy any time after its issue, and run any other
// warp between an arrival and the arriving thread's next instruction. So at an arrival or an
// issue, land a queued copy half the time, and yield at an arrival, so that a stage released
// before its readers are done (an arrival ahead of the wait for the multiplies reading it) is
// refilled under them; `land` reports a copy onto bytes a queued wgmma still reads.
void shuffle_point(bool yield) {
    ApparateEmuBlock* b = apparate_emu_block;
    if (!b->bulk_shuffle) return;
    if (b->n_bulk > 0 && coin(b)) land(b, (unsigned)(b->bulk_shuffle % b->n_bulk));
    if (yield) apparate_emu_spin();  // runs again next round (the arrival was progress)
}

}  // namespace

void apparate_emu_mbar_init(uint64_t* bar, uint32_t count) {
    if (reinterpret_cast<uintptr_t>(bar) % 8 != 0) fail("not 8-byte aligned", bar);
    if (count == 0 || count > kCountMask) fail("init with a count outside 1 ..= 2^20 - 1", bar);
    *bar = (uint64_t)count | ((uint64_t)count << 20);  // phase 0, no transactions
}

void apparate_emu_mbar_arrive(uint64_t* bar, uint32_t tx_bytes) {
    Mbar m = load(bar);
    if (m.pending == 0) fail("an arrival on a phase that expects no more", bar);
    m.tx += tx_bytes;  // expect-tx first, then the arrival (mbarrier.arrive.expect_tx)
    m.pending--;
    settle_store(bar, m);
    // A plain arrival yields (a consumer releasing a stage); one announcing copies does not,
    // so a producer runs ahead until the ring is full, as it does on a GPU while the
    // multiplies take their time, and every release is then followed by a refill at once.
    shuffle_point(tx_bytes == 0);
}

void apparate_emu_mbar_wait(uint64_t* bar, uint32_t parity) {
    for (;;) {
        Mbar m = load(bar);
        if (m.phase != (parity & 1)) return;  // the phase of that parity has completed
        ApparateEmuBlock* b = apparate_emu_block;
        if (b->n_bulk > 0) {
            // Any copy may land first on a GPU: a random one under a shuffle seed.
            unsigned i = b->bulk_shuffle && coin(b) ? (unsigned)(b->bulk_shuffle % b->n_bulk) : 0;
            land(b, i);
            continue;
        }
        apparate_emu_spin();
    }
}

void apparate_emu_tma_load_2d(void* dst, const uint64_t* map, int32_t c0, int32_t c1,
                              uint64_t* bar) {
    ApparateEmuBlock* b = apparate_emu_block;
    unsigned char* d = static_cast<unsigned char*>(dst);
    if (map[15] != kMapMark) {
        std::fprintf(stderr, "tma: the tensor map was not made by the emulated device\n");
        std::abort();
    }
    if (d < b->dyn_shared || d >= b->dyn_shared + b->dyn_shared_bytes ||
        (uint64_t)(d - b->dyn_shared) % 128 != 0) {
        std::fprintf(stderr, "tma: destination %p is not 128-byte aligned dynamic shared memory\n",
                     dst);
        std::abort();  // a GPU faults
    }
    uint64_t bytes = map[4] * map[5] * map[6];
    if (map[4] * map[6] != map[7]) {
        std::fprintf(stderr, "tma: a box row of %llu bytes is not one %llu-byte swizzle row\n",
                     (unsigned long long)(map[4] * map[6]), (unsigned long long)map[7]);
        std::abort();  // the only layout this twin knows
    }
    if ((uint64_t)(d - b->dyn_shared) + bytes > b->dyn_shared_bytes) {
        std::fprintf(stderr, "tma: a %llu-byte box at %p runs past dynamic shared memory\n",
                     (unsigned long long)bytes, dst);
        std::abort();
    }
    if (b->n_bulk == APPARATE_EMU_MAX_BULK) land(b, 0);  // full: the oldest lands early
    ApparateEmuBulk& c = b->bulk[b->n_bulk++];
    c.dst = d;
    std::memcpy(c.map, map, sizeof(c.map));
    c.c0 = c0;
    c.c1 = c1;
    c.bar = bar;
    apparate_emu_progress();  // a waiter may now land it: not a deadlock
    shuffle_point(false);
}

// Scheduler of the emulated CUDA device: runs the blocks [begin, end) of one launch on the calling
// OS thread, each block's threads as fibers that switch only at barriers (cooperative), so a
// kernel's barrier structure is honoured exactly and a missing barrier shows up as wrong results
// (more so with the seeded shuffle of fiber order between barriers). Threads waiting at barriers
// that can never release (e.g. part of a block at __syncthreads, the rest exited inside a warp
// operation) are reported as a deadlock with the kernel's name instead of hanging.
#include "emu.h"

#include <sys/mman.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#include "trampoline.h"

thread_local ApparateEmuThread* apparate_emu_thread = nullptr;
thread_local ApparateEmuBlock* apparate_emu_block = nullptr;

namespace {

// Each fiber's stack. Kernels keep small frames (register-sized locals), so 64 KiB is ample; a
// guard page below each stack turns an overflow into a crash instead of silent corruption.
constexpr size_t kStack = 64 * 1024;
constexpr size_t kPage = 4096;
constexpr int kMaxThreads = 1024;

// Spin: waiting for a condition other threads of the block may make true (an mbarrier phase);
// run again every round until it holds.
enum State { Ready, WaitBlock, WaitWarp, Spin, Done };

struct Fiber {
    void* sp = nullptr;
    State state = Ready;
    ApparateEmuThread t{};
};

#if defined(__x86_64__)
// Saves callee-saved registers and the SSE/x87 control words on the current stack, stores the
// stack pointer into *from, switches to `to` and restores the same from there.
extern "C" void apparate_emu_switch(void** from, void* to);
asm(R"(
.text
.globl apparate_emu_switch
.type apparate_emu_switch,@function
apparate_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size apparate_emu_switch, .-apparate_emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");
#else
#error "the emulated device needs an x86-64 host (fiber switch is x86-64 assembly)"
#endif

struct Worker {
    unsigned char* stacks = nullptr;  // kMaxThreads stacks with guard pages
    Fiber fibers[kMaxThreads];
    void* sched_sp = nullptr;
    int current = -1;
    int nthreads = 0;
    void (*entry)(void**) = nullptr;
    void** args = nullptr;
    uint32_t exchange[kMaxThreads / 32][2][32 * 16];  // per warp, two buffers
    std::vector<unsigned char> dyn_shared;
    ApparateEmuBlock block{};
    // Per warp, its k-th cp.async instruction: each lane's shared-window offset, and which
    // lanes issued it (counted and cleared when the block ends).
    struct CopyIssue {
        uint32_t addr[32];
        uint32_t lanes;
    };
    std::vector<CopyIssue> cp_log[kMaxThreads / 32];
    // The launch's bank accounting so far (apparate_emu_run hands it back).
    ApparateEmuCounts counts{};
    // Bumped by every event that can end a Spin (an mbarrier arrival): a round of spinning
    // with no such event is a deadlock.
    uint64_t progress = 0;

    bool init() {
        if (stacks) return true;
        size_t slot = kStack + kPage;
        void* m = mmap(nullptr, slot * kMaxThreads, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) return false;
        stacks = static_cast<unsigned char*>(m);
        for (int i = 0; i < kMaxThreads; i++) mprotect(stacks + i * slot, kPage, PROT_NONE);
        return true;
    }
    unsigned char* stack_top(int i) { return stacks + (size_t)(i + 1) * (kStack + kPage); }
    ~Worker() {
        if (stacks) munmap(stacks, (kStack + kPage) * kMaxThreads);
    }
};

// One per OS thread that runs blocks, freed with the thread.
thread_local std::unique_ptr<Worker> worker_owner;
thread_local Worker* worker = nullptr;

[[noreturn]] void fiber_main() {
    Worker* w = worker;
    w->entry(w->args);
    Fiber& f = w->fibers[w->current];
    f.state = Done;
    apparate_emu_switch(&f.sp, w->sched_sp);
    std::abort();  // a finished fiber is never resumed
}

void prepare(Worker* w, int i) {
    // Stack image that apparate_emu_switch "returns" into fiber_main with an ABI-aligned stack.
    uintptr_t top = reinterpret_cast<uintptr_t>(w->stack_top(i)) & ~uintptr_t(15);
    uint64_t* sp = reinterpret_cast<uint64_t*>(top);
    *--sp = 0;                                             // fake return address of fiber_main
    *--sp = reinterpret_cast<uint64_t>(&fiber_main);       // where `ret` goes
    for (int r = 0; r < 6; r++) *--sp = 0;                 // rbp rbx r12 r13 r14 r15
    uint32_t ctl[2];
    asm volatile("stmxcsr %0" : "=m"(ctl[0]));
    asm volatile("fnstcw %0" : "=m"(ctl[1]));
    *--sp = (uint64_t)ctl[0] | ((uint64_t)(ctl[1] & 0xffff) << 32);
    w->fibers[i].sp = sp;
    w->fibers[i].state = Ready;
}

void yield_to_scheduler(State s) {
    Worker* w = worker;
    Fiber& f = w->fibers[w->current];
    f.state = s;
    apparate_emu_switch(&f.sp, w->sched_sp);
    apparate_emu_thread = &f.t;  // back on this fiber
}

uint64_t splitmix(uint64_t& s) {
    s += 0x9E3779B97F4A7C15ull;
    uint64_t z = s;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Runs one block to completion. Returns false on deadlock (message in err).
bool run_block(Worker* w, uint64_t* seed, const char* name, char* err, size_t errlen) {
    int n = w->nthreads;
    for (int i = 0; i < n; i++) {
        prepare(w, i);
        // No cp.async copy outlives its block (a block cut short by an error leaves some); with
        // a shuffle seed, some copies land at issue instead of at their wait (a GPU may land
        // them any time in between). That alone does not expose a stage refilled before every
        // warp has read it; the warp-by-warp order below (half the blocks under a seed) does.
        ApparateEmuThread& t = w->fibers[i].t;
        t.n_copies = 0;
        t.groups_committed = 0;
        t.n_wgmma = 0;
        t.wgmma_groups = 0;
        t.exchange_parity = 0;
        t.cp_async_issued = 0;
        t.early_copies = seed ? splitmix(*seed) | 1 : 0;
    }
    for (auto& log : w->cp_log) log.clear();
    w->block.n_bulk = 0;
    w->block.bulk_shuffle = seed ? splitmix(*seed) | 1 : 0;
    // Dynamic shared memory starts as NaN bytes in every block, so a read before a write shows.
    if (!w->dyn_shared.empty()) std::memset(w->dyn_shared.data(), 0xff, w->dyn_shared.size());
    std::vector<int> order(n);
    for (int i = 0; i < n; i++) order[i] = i;
    int nwarps = (n + 31) / 32;
    std::vector<int> warps(nwarps);
    for (int i = 0; i < nwarps; i++) warps[i] = i;
    // With a seed, half the blocks run warp by warp: each warp, in a shuffled order, runs
    // through its warp operations until every lane waits at __syncthreads or has exited, before
    // the next warp starts. A GPU may schedule warps that way (one far ahead of another between
    // block barriers); the round-robin order keeps warps within a warp operation of each other,
    // which hides a barrier missing between two shuffle-heavy phases over the same shared memory.
    bool warp_major = seed && (splitmix(*seed) & 1);
    uint64_t progress_seen = w->progress;
    auto run = [&](int i) {
        w->current = i;
        apparate_emu_thread = &w->fibers[i].t;
        apparate_emu_switch(&w->sched_sp, w->fibers[i].sp);
    };
    for (;;) {
        if (seed) {
            for (int i = n - 1; i > 0; i--) std::swap(order[i], order[splitmix(*seed) % (uint64_t)(i + 1)]);
        }
        if (warp_major) {
            for (int i = nwarps - 1; i > 0; i--)
                std::swap(warps[i], warps[splitmix(*seed) % (uint64_t)(i + 1)]);
            for (int wp : warps) {
                int lo = wp * 32, hi = lo + 32 < n ? lo + 32 : n;
                for (;;) {
                    for (int i = lo; i < hi; i++)
                        if (w->fibers[i].state == Ready || w->fibers[i].state == Spin) run(i);
                    // Release this warp's own operation when all its lanes wait at it (lanes
                    // that exited leave it to the checks below, which report it).
                    int waiting = 0;
                    for (int i = lo; i < hi; i++) waiting += w->fibers[i].state == WaitWarp;
                    if (waiting == 0 || waiting < hi - lo) break;
                    for (int i = lo; i < hi; i++) w->fibers[i].state = Ready;
                }
            }
        } else {
            for (int k = 0; k < n; k++) {
                int i = order[k];
                if (w->fibers[i].state == Ready || w->fibers[i].state == Spin) run(i);
            }
        }
        // Every fiber is now Done or waiting. Release whatever barrier is complete.
        int done = 0, at_block = 0, at_warp = 0, spinning = 0;
        for (int i = 0; i < n; i++) {
            State s = w->fibers[i].state;
            done += s == Done;
            at_block += s == WaitBlock;
            at_warp += s == WaitWarp;
            spinning += s == Spin;
        }
        if (done == n) {
            for (int wp = 0; wp < nwarps; wp++)
                for (const auto& c : w->cp_log[wp])
                    apparate_emu_bank_phases(c.addr, c.lanes, w->counts.cp_async);
            if (w->block.n_bulk == 0) return true;
            // On a GPU the copies would land in shared memory the next block may already own.
            std::snprintf(err, errlen,
                          "kernel `%s`: block (%u,%u,%u) exited with %u tensor copies (TMA) in "
                          "flight that no thread waited for",
                          name, w->block.block_idx.x, w->block.block_idx.y, w->block.block_idx.z,
                          w->block.n_bulk);
            return false;
        }
        bool released = false;
        for (int wp = 0; wp < nwarps; wp++) {
            int lo = wp * 32, hi = lo + 32 < n ? lo + 32 : n;
            int waiting = 0, live = 0;
            for (int i = lo; i < hi; i++) {
                live += w->fibers[i].state != Done;
                waiting += w->fibers[i].state == WaitWarp;
            }
            if (waiting > 0 && waiting == live && live < hi - lo) {
                // A full-warp operation with lanes that already exited: undefined on a GPU.
                std::snprintf(err, errlen,
                              "kernel `%s`: warp %d of block (%u,%u,%u) runs a warp operation after "
                              "%d of its lanes exited",
                              name, wp, w->block.block_idx.x, w->block.block_idx.y,
                              w->block.block_idx.z, (hi - lo) - live);
                return false;
            }
            if (waiting > 0 && waiting == live) {
                for (int i = lo; i < hi; i++)
                    if (w->fibers[i].state == WaitWarp) w->fibers[i].state = Ready;
                released = true;
            }
        }
        if (spinning > 0 && !released) {
            // Spinners run again next round; only a round in which nothing they may wait for
            // happened (and no barrier released) is a deadlock.
            if (w->progress != progress_seen) {
                progress_seen = w->progress;
                continue;
            }
            std::snprintf(err, errlen,
                          "kernel `%s` deadlocked in block (%u,%u,%u): %d threads wait on an "
                          "mbarrier no thread will complete, %d at __syncthreads, %d at a warp "
                          "operation, %d exited",
                          name, w->block.block_idx.x, w->block.block_idx.y, w->block.block_idx.z,
                          spinning, at_block, at_warp, done);
            return false;
        }
        if (!released && at_warp == 0 && at_block > 0) {
            // Threads that exited count as arrived (as on the hardware).
            for (int i = 0; i < n; i++)
                if (w->fibers[i].state == WaitBlock) w->fibers[i].state = Ready;
            released = true;
        }
        if (!released) {
            std::snprintf(err, errlen,
                          "kernel `%s` deadlocked in block (%u,%u,%u): %d threads at __syncthreads, "
                          "%d at a warp operation, %d exited",
                          name, w->block.block_idx.x, w->block.block_idx.y, w->block.block_idx.z,
                          at_block, at_warp, done);
            return false;
        }
    }
}

}  // namespace

void apparate_emu_syncthreads() { yield_to_scheduler(WaitBlock); }
void apparate_emu_warp_barrier() { yield_to_scheduler(WaitWarp); }
void apparate_emu_spin() { yield_to_scheduler(Spin); }
void apparate_emu_progress() { worker->progress++; }

int apparate_emu_wgmma_reader(uint32_t lo, uint32_t hi) {
    Worker* w = worker;
    // The bytes an operand's rows span: `rows` rows of 128 bytes in 8-row groups `sbo` apart
    // from the 128-byte row of the descriptor's start (the swizzle stays within a row).
    auto overlaps = [&](uint64_t desc, int rows) {
        uint32_t start = apparate_emu_desc_start(desc) & ~127u;
        uint32_t sbo = apparate_emu_desc_sbo(desc);
        uint32_t end = start + (uint32_t)(rows / 8 - 1) * sbo + 8 * 128;
        return start < hi && lo < end;
    };
    for (int i = 0; i < w->nthreads; i++) {
        const ApparateEmuThread& t = w->fibers[i].t;
        for (unsigned q = 0; q < t.n_wgmma; q++)
            if (overlaps(t.wgmma[q].desc_a, 64) || overlaps(t.wgmma[q].desc_b, t.wgmma[q].n))
                return i;
    }
    return -1;
}
uint32_t apparate_emu_smem_offset(const void* p) {
    const unsigned char* base = apparate_emu_block->dyn_shared;
    const unsigned char* q = static_cast<const unsigned char*>(p);
    if (base && q >= base && q < base + apparate_emu_block->dyn_shared_bytes)
        return (uint32_t)(q - base);
    return (uint32_t)reinterpret_cast<uintptr_t>(p);
}

void apparate_emu_bank_phases(const uint32_t (&addr)[32], uint32_t mask, ApparateEmuBankCount& c) {
    for (int phase = 0; phase < 4; phase++) {
        uint32_t chunks[8];
        int n = 0;
        for (int l = phase * 8; l < phase * 8 + 8; l++) {
            if (!(mask >> l & 1u)) continue;
            uint32_t chunk = addr[l] >> 4;
            bool seen = false;
            for (int i = 0; i < n; i++) seen |= chunks[i] == chunk;  // same chunk: one read
            if (!seen) chunks[n++] = chunk;
        }
        if (n == 0) continue;
        int most = 0;
        for (uint32_t group = 0; group < 8; group++) {
            int k = 0;
            for (int i = 0; i < n; i++) k += (chunks[i] & 7u) == group;
            most = k > most ? k : most;
        }
        c.ideal += 1;
        c.actual += (uint64_t)most;
    }
}

ApparateEmuBankCount& apparate_emu_ldmatrix_banks() { return worker->counts.ldmatrix; }
void apparate_emu_count_mma() { worker->counts.mma++; }

void apparate_emu_note_cp_async(const void* dst) {
    ApparateEmuThread* t = apparate_emu_thread;
    auto& log = worker->cp_log[t->warp];
    unsigned k = t->cp_async_issued++;
    if (log.size() <= k) log.resize(k + 1, Worker::CopyIssue{{}, 0u});
    log[k].addr[t->lane] = apparate_emu_smem_offset(dst);
    log[k].lanes |= 1u << t->lane;
}

uint32_t* apparate_emu_warp_exchange() {
    ApparateEmuThread* t = apparate_emu_thread;
    uint32_t* s = worker->exchange[t->warp][t->exchange_parity];
    t->exchange_parity ^= 1;
    return s;
}

extern "C" int apparate_emu_has_kernel(const char* name) { return apparate_emu_find(name) != nullptr; }

// Runs blocks [begin, end) (linear block index, x fastest) of a launch. Returns 0 on success,
// non-zero with a message in `err` otherwise. `seed` = 0: fibers run in thread order; otherwise
// their order is shuffled (seeded) between barriers. `counts` receives the blocks' shared-memory
// bank accounting and multiplies (emu.h).
extern "C" int apparate_emu_run(const char* name, const uint32_t grid[3], const uint32_t block[3],
                                uint32_t dyn_shared, void** args, uint64_t begin, uint64_t end,
                                uint64_t seed, char* err, size_t errlen, ApparateEmuCounts* counts) {
    void (*entry)(void**) = apparate_emu_find(name);
    if (!entry) {
        std::snprintf(err, errlen, "no kernel named `%s` in the emulated device", name);
        return 1;
    }
    uint64_t nthreads = (uint64_t)block[0] * block[1] * block[2];
    if (nthreads == 0 || nthreads > (uint64_t)kMaxThreads) {
        std::snprintf(err, errlen, "kernel `%s`: block of %llu threads (must be 1..=%d)", name,
                      (unsigned long long)nthreads, kMaxThreads);
        return 1;
    }
    if (!worker) {
        worker_owner.reset(new Worker());
        worker = worker_owner.get();
    }
    Worker* w = worker;
    if (!w->init()) {
        std::snprintf(err, errlen, "cannot map fiber stacks");
        return 1;
    }
    w->entry = entry;
    w->args = args;
    w->counts = ApparateEmuCounts{};
    w->nthreads = (int)nthreads;
    w->dyn_shared.assign(dyn_shared, 0);
    for (uint32_t z = 0, i = 0; z < block[2]; z++)
        for (uint32_t y = 0; y < block[1]; y++)
            for (uint32_t x = 0; x < block[0]; x++, i++) {
                w->fibers[i].t.thread_idx = {x, y, z};
                w->fibers[i].t.lane = i % 32;
                w->fibers[i].t.warp = i / 32;
            }
    w->block.block_dim = {block[0], block[1], block[2]};
    w->block.grid_dim = {grid[0], grid[1], grid[2]};
    w->block.dyn_shared = w->dyn_shared.data();
    w->block.dyn_shared_bytes = w->dyn_shared.size();
    ApparateEmuBlock* saved_block = apparate_emu_block;
    apparate_emu_block = &w->block;
    int rc = 0;
    for (uint64_t b = begin; b < end; b++) {
        w->block.block_idx = {(uint32_t)(b % grid[0]), (uint32_t)((b / grid[0]) % grid[1]),
                              (uint32_t)(b / ((uint64_t)grid[0] * grid[1]))};
        // Seeded per block, so the schedule does not depend on how blocks are split over threads.
        uint64_t s = seed ^ ((b + 1) * 0xD1B54A32D192ED03ull);
        if (!run_block(w, seed ? &s : nullptr, name, err, errlen)) {
            rc = 2;
            break;
        }
    }
    apparate_emu_block = saved_block;
    apparate_emu_thread = nullptr;
    *counts = w->counts;
    return rc;
}

// Shared-memory barriers with phases (`mbarrier`, sm_80+; used here on sm_90a): what lets a
// producer warpgroup hand stages to consumer warpgroups without stopping the whole block at
// __syncthreads. A barrier expects `count` arrivals per phase; the last arrival completes the
// phase and starts the next. A waiter names the parity of the phase it waits for: it returns
// once that phase has completed, i.e. at once while the barrier's current phase has the other
// parity (so a wait for parity 1 on a fresh barrier returns at once: the usual "stage is empty"
// start of a ring).
//
// On the emulated device a barrier is the same 8 bytes of shared memory holding (arrivals still
// expected, expected per phase, transaction bytes still expected, phase bit: emu/mbarrier.cpp);
// a waiter lands queued tensor copies or spins by yielding to the scheduler, which reports a
// deadlock when a round of spinning sees no arrival.
#pragma once
// Guarded too: NVRTC sees this header under two names (from kernels/ and from common/).
#ifndef APPARATE_MBARRIER_CUH
#define APPARATE_MBARRIER_CUH

#include "apparate.cuh"
#include "wgmma.cuh"

// Sets up a barrier for `count` arrivals per phase (one thread; then a __syncthreads before
// anyone uses it).
APPARATE_DEVICE void mbar_init(uint64_t* bar, uint32_t count) {
#ifdef APPARATE_EMU
    apparate_emu_mbar_init(bar, count);
#else
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(wgmma_smem_addr(bar)), "r"(count)
                 : "memory");
#endif
}

// After the initialising thread's last mbar_init, before the __syncthreads that publishes the
// barriers: makes the initialised barriers visible to the async proxy, through which tensor
// copies (TMA) complete their bytes on them (the CUDA programming guide's TMA example fences
// the same way). sm_90; nothing elsewhere (only the generic proxy uses barriers there).
APPARATE_DEVICE void mbar_init_fence() {
#if !defined(APPARATE_EMU) && WGMMA_AVAILABLE
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// One arrival (release: this thread's earlier writes are visible to whoever waits for the phase).
APPARATE_DEVICE void mbar_arrive(uint64_t* bar) {
#ifdef APPARATE_EMU
    apparate_emu_mbar_arrive(bar, 0);
#else
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(wgmma_smem_addr(bar)) : "memory");
#endif
}

// One arrival that first announces `bytes` of asynchronous copies (TMA, kernels/common/tma.cuh)
// completing on this barrier: the phase then completes once the arrivals are in and those
// bytes have landed. sm_90.
APPARATE_DEVICE void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#ifdef APPARATE_EMU
    apparate_emu_mbar_arrive(bar, bytes);
#elif WGMMA_AVAILABLE
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(
                     wgmma_smem_addr(bar)),
                 "r"(bytes)
                 : "memory");
#else
    __trap();  // sm_90 only: the launcher never picks a kernel built on it elsewhere
#endif
}

// Waits until the phase of parity `parity` has completed (acquire: the arrivals' writes, and
// the copies that completed the phase, are visible afterwards).
APPARATE_DEVICE void mbar_wait(uint64_t* bar, uint32_t parity) {
#ifdef APPARATE_EMU
    apparate_emu_mbar_wait(bar, parity);
#else
    uint32_t addr = wgmma_smem_addr(bar), done = 0;
    while (!done) {
        // sm_90 has try_wait (the thread may sleep until the phase completes); sm_80 polls.
        asm volatile(
#if WGMMA_AVAILABLE
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
#else
            "{\n.reg .pred p;\nmbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n"
#endif
            "selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(addr), "r"(parity & 1)
            : "memory");
    }
#endif
}

// Gives this warpgroup's registers back to (dec) or takes them from (inc) the block's pool:
// producers that only copy need few, consumers holding accumulators many. All 128 threads of
// the warpgroup execute it; N is a multiple of 8 in 24..256. sm_90a; nothing on the emulator.
template <int N>
APPARATE_DEVICE void setmaxnreg_dec() {
#if !defined(APPARATE_EMU) && WGMMA_AVAILABLE
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N>
APPARATE_DEVICE void setmaxnreg_inc() {
#if !defined(APPARATE_EMU) && WGMMA_AVAILABLE
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

#endif  // APPARATE_MBARRIER_CUH

// Tensor memory accelerator (TMA, sm_90): one thread asks the copy engine for a whole 2-D box of
// a matrix in global memory, which lands in shared memory in the 128-byte swizzle (the layout
// wgmma's descriptors name, kernels/common/wgmma.cuh) and completes its bytes on an mbarrier
// (kernels/common/mbarrier.cuh): no per-thread addresses, no registers, no proxy fence (the
// copy and wgmma both act through the async proxy; the barrier orders them).
//
// The box is described by a tensor map the host makes (`Device::tensor_map`: the driver's
// cuTensorMapEncodeTiled on a GPU, the twin's own fields on the emulated device), passed to the
// kernel by value as a `const __grid_constant__ TmaMap` parameter, whose address the copy names.
// Boxes are 64 16-bit elements (128 bytes) wide and up to 256 rows tall; elements outside the
// matrix arrive as zeros and still count toward the bytes the barrier expects.
//
// On the emulated device (emu/mbarrier.cpp) a copy is queued for its block and lands only while
// some thread waits on an incomplete mbarrier phase, so a stage read before its barrier completed
// shows the old contents, and a block that exits with copies in flight is reported.
#pragma once
// Guarded too: NVRTC sees this header under two names (from kernels/ and from common/).
#ifndef APPARATE_TMA_CUH
#define APPARATE_TMA_CUH

#include "apparate.cuh"
#include "mbarrier.cuh"
#include "wgmma.cuh"

// The driver's CUtensorMap: 128 opaque bytes, 64-byte aligned.
struct alignas(64) TmaMap {
    uint64_t v[16];
};

// Fetches the tensor map into the copy engine's cache ahead of the first copy (a hint).
APPARATE_DEVICE void tma_prefetch(const TmaMap* map) {
#if !defined(APPARATE_EMU) && WGMMA_AVAILABLE
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
#endif
}

// Copies the box whose first element is (row c1, column c0) of `map`'s matrix into shared
// memory at `dst` (1024-byte aligned, so the swizzle's rows line up with the box's), completing
// its bytes (64 x box rows x 2) on `bar`. One thread issues it; the barrier's phase must have
// been told to expect the bytes (mbar_arrive_expect_tx).
APPARATE_DEVICE void tma_load_2d(void* dst, const TmaMap* map, int32_t c0, int32_t c1,
                                 uint64_t* bar) {
#ifdef APPARATE_EMU
    apparate_emu_tma_load_2d(dst, map->v, c0, c1, bar);
#elif WGMMA_AVAILABLE
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(wgmma_smem_addr(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(wgmma_smem_addr(bar))
        : "memory");
#else
    __trap();  // sm_90 only: the launcher never picks a kernel built on it elsewhere
#endif
}

#endif  // APPARATE_TMA_CUH

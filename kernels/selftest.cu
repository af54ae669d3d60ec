// Kernels that check the device itself (emulated or real): block barrier, warp shuffles and
// votes, the tensor-core wrapper, and (emulated device only) deadlock reporting. The kernel
// parity suite runs them on every device it has.
#include "common/mma.cuh"
#include "common/pipe.cuh"
#include "common/wgmma.cuh"
#include "common/mbarrier.cuh"
#include "common/tma.cuh"

// Reverses x within each block through shared memory: wrong without the barrier.
extern "C" __global__ void selftest_block_reverse(const float* x, float* y, uint32_t n) {
    __shared__ float tile[1024];
    uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
    tile[threadIdx.x] = i < n ? x[i] : 0.0f;
    __syncthreads();
    uint32_t j = blockIdx.x * blockDim.x + (blockDim.x - 1 - threadIdx.x);
    if (i < n && j < n) y[i] = tile[blockDim.x - 1 - threadIdx.x];
}

// Per warp: out[warp] = sum, max through xor shuffles; lanes also exchange with shfl_down/up/idx
// and vote. One output row of 8 values per warp.
extern "C" __global__ void selftest_warp(const float* x, float* out) {
    uint32_t lane = threadIdx.x % 32, warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
    float v = x[blockIdx.x * blockDim.x + threadIdx.x];
    float s = warp_sum(v);
    float m = warp_max(v);
    float down = __shfl_down_sync(0xffffffffu, v, 1);
    float up = __shfl_up_sync(0xffffffffu, v, 1);
    float from7 = __shfl_sync(0xffffffffu, v, 7);
    unsigned ballot = __ballot_sync(0xffffffffu, v > 0.0f);
    int any = __any_sync(0xffffffffu, v > 100.0f);
    int all = __all_sync(0xffffffffu, v > -100.0f);
    if (lane == 0) {
        float* o = out + warp * 8;
        o[0] = s;
        o[1] = m;
        o[2] = down;  // lane 1's value
        o[3] = up;    // own value (no lane below 0)
        o[4] = from7;
        o[5] = (float)ballot;
        o[6] = (float)any;
        o[7] = (float)all;
    }
}

// One warp: D (16x8, f32) = A (16x16 row-major) * B (16x8, given as B^T 8x16 row-major).
template <typename T>
__device__ void mma_one(const T* a, const T* bt, float* d) {
    uint32_t lane = threadIdx.x, g = lane / 4, t = lane % 4;
    auto pack = [](T lo, T hi) { return (uint32_t)lo.bits | ((uint32_t)hi.bits << 16); };
    uint32_t af[4], bf[2];
    af[0] = pack(a[g * 16 + 2 * t], a[g * 16 + 2 * t + 1]);
    af[1] = pack(a[(g + 8) * 16 + 2 * t], a[(g + 8) * 16 + 2 * t + 1]);
    af[2] = pack(a[g * 16 + 2 * t + 8], a[g * 16 + 2 * t + 9]);
    af[3] = pack(a[(g + 8) * 16 + 2 * t + 8], a[(g + 8) * 16 + 2 * t + 9]);
    bf[0] = pack(bt[g * 16 + 2 * t], bt[g * 16 + 2 * t + 1]);
    bf[1] = pack(bt[g * 16 + 2 * t + 8], bt[g * 16 + 2 * t + 9]);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    mma_16816<T>(acc, af, bf);
    d[g * 8 + 2 * t] = acc[0];
    d[g * 8 + 2 * t + 1] = acc[1];
    d[(g + 8) * 8 + 2 * t] = acc[2];
    d[(g + 8) * 8 + 2 * t + 1] = acc[3];
}
extern "C" __global__ void selftest_mma_f16(const f16* a, const f16* bt, float* d) { mma_one(a, bt, d); }
extern "C" __global__ void selftest_mma_bf16(const bf16* a, const bf16* bt, float* d) { mma_one(a, bt, d); }

// One warp, ldmatrix.x4 from a 32-row x 8-half shared tile; lane l points at row (7 l) % 32, so
// each lane's address matters. out[4 l + i] = lane l's register i; out[128 + 4 l + i] the same
// with .trans.
extern "C" __global__ void selftest_ldmatrix(const uint32_t* src, uint32_t* out) {
    __shared__ __align__(16) uint32_t tile[32 * 4];  // 32 rows of 8 halves
    uint32_t lane = threadIdx.x;
    for (int i = 0; i < 4; i++) tile[lane * 4 + i] = src[lane * 4 + i];
    __syncthreads();
    uint32_t r[4], rt[4];
    ldmatrix_x4(r, &tile[((lane * 7) % 32) * 4]);
    ldmatrix_x4_trans(rt, &tile[((lane * 7) % 32) * 4]);
    for (int i = 0; i < 4; i++) {
        out[lane * 4 + i] = r[i];
        out[128 + lane * 4 + i] = rt[i];
    }
}

// One warp, three cp.async groups of 16 bytes per lane into shared memory first set to -1:
// group 0 and 1 copy src[0..128) and src[128..256), group 2 is zero-filled (src-size 0).
// out[0..128): each lane's own group-0 chunk after wait_group 2 (its own copies are visible to
// it without a barrier); out[128..256): its group-1 chunk before any wait (still -1 on the
// emulated device, which lands copies only at the wait; either on a GPU); out[256..640): the
// whole buffer after wait_group 0 and a barrier.
extern "C" __global__ void selftest_cp_async(const float* src, float* out) {
    __shared__ __align__(16) float buf[3 * 128];
    uint32_t lane = threadIdx.x;
    for (int i = 0; i < 12; i++) buf[lane * 12 + i] = -1.0f;
    __syncthreads();
    for (int grp = 0; grp < 3; grp++) {
        cp_async16(&buf[grp * 128 + lane * 4], grp < 2 ? src + grp * 128 + lane * 4 : src, grp < 2);
        cp_async_commit();
    }
    for (int i = 0; i < 4; i++) out[128 + lane * 4 + i] = buf[128 + lane * 4 + i];
    cp_async_wait<2>();
    for (int i = 0; i < 4; i++) out[lane * 4 + i] = buf[lane * 4 + i];
    cp_async_wait<0>();
    __syncthreads();
    for (int i = 0; i < 12; i++) out[256 + lane * 12 + i] = buf[lane * 12 + i];
}

// One warp, shared-memory accesses whose bank conflicts are known, for the emulated device's
// bank accounting (kernels/emu/emu.h; its counts are the test, the values are not): an
// ldmatrix.x4 whose eight rows per matrix are 128 bytes apart (one bank group: 8 wavefronts
// per phase), one whose eight lanes per matrix name the same row (a broadcast: 1), and 16-byte
// cp.async copies in row-major order into rows of 4 chunks padded to 5 (2 rows per phase:
// 2 wavefronts). Dynamic shared memory: 1024 bytes. out[l] = a mix of lane l's registers.
// (A C++ function under the entry: the dynamic shared array is declared in C++ functions only.)
__device__ void bank_conflicts(const float* src, uint32_t* out) {
    DYN_SHARED(unsigned char, tile);
    uint32_t lane = threadIdx.x;
    for (uint32_t i = lane; i < 256; i += 32) reinterpret_cast<uint32_t*>(tile)[i] = i;
    __syncthreads();
    uint32_t r[4], b[4];
    ldmatrix_x4(r, tile + (lane % 8) * 128 + (lane / 8) * 16);
    ldmatrix_x4(b, tile + (lane / 8) * 16);
    __syncthreads();
    cp_async16(tile + (lane / 4) * 80 + (lane % 4) * 16, src + lane * 4, true);
    cp_async_commit();
    cp_async_wait<0>();
    out[lane] = r[0] ^ r[1] ^ r[2] ^ r[3] ^ b[0] ^ b[1] ^ b[2] ^ b[3];
}
extern "C" __global__ void selftest_bank_conflicts(const float* src, uint32_t* out) {
    bank_conflicts(src, out);
}

// One warpgroup (128 threads), sm_90a or the emulated device: D (64 x 128, f32) = A (64 x 64) *
// B^T, B given as 128 x 64 (both K-major, row-major here), through four wgmma.m64n128k16 over
// the 128-byte-swizzled layout of kernels/common/wgmma.cuh: A's and B's rows stored 128 bytes
// apart with chunk c of row r at c ^ (r % 8), from a dynamic shared ring that starts off the
// 1024-byte pattern (padded to it by the kernel, as the GEMM does). The accumulators start at
// 1e6 and the first multiply has scale-d 0, so a result with 1e6 in it says scale-d was
// ignored. d[64 r + c] = D[r][c] read back through the accumulator layout the GEMM assumes.
template <typename T>
__device__ void wgmma_one(const T* a, const T* b, float* d) {
#if WGMMA_AVAILABLE
    DYN_SHARED(unsigned char, raw);
    unsigned char* base = raw + 16;  // off the pattern on purpose
    base += (1024u - wgmma_smem_addr(base) % 1024u) % 1024u;
    unsigned char* sa = base;               // 64 rows x 128 bytes
    unsigned char* sb = base + 64 * 128;    // 128 rows x 128 bytes
    uint32_t tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    for (uint32_t c = tid; c < (64 + 128) * 8; c += 128) {  // 16-byte chunks by plain stores
        uint32_t r = c / 8, ch = c % 8;
        const T* src = r < 64 ? a + r * 64 + ch * 8 : b + (r - 64) * 64 + ch * 8;
        unsigned char* dst = (r < 64 ? sa + r * 128 : sb + (r - 64) * 128) + (ch ^ (r % 8)) * 16;
        for (int e = 0; e < 8; e++) reinterpret_cast<T*>(dst)[e] = src[e];
    }
    fence_proxy_async_shared();
    __syncthreads();
    float acc[64];
    for (int i = 0; i < 64; i++) acc[i] = 1e6f;
    uint32_t a_addr = wgmma_smem_addr(sa), b_addr = wgmma_smem_addr(sb);
    for (int i = 0; i < 64; i++) wgmma_fence_operand(acc[i]);
    wgmma_fence();
    for (uint32_t ks = 0; ks < 4; ks++)
        wgmma_m64k16<T, 128>(acc, wgmma_desc_sw128(a_addr + ks * 32, 1024),
                            wgmma_desc_sw128(b_addr + ks * 32, 1024), ks > 0);
    wgmma_commit();
    wgmma_wait<0>();
    for (int i = 0; i < 64; i++) wgmma_fence_operand(acc[i]);
    for (int j = 0; j < 16; j++)
        for (int i = 0; i < 2; i++)
            for (int c = 0; c < 2; c++) {
                uint32_t r = warp * 16 + lane / 4 + 8 * i, col = 8 * j + 2 * (lane % 4) + c;
                d[r * 128 + col] = acc[4 * j + 2 * i + c];
            }
#else
    __trap();  // not built for sm_90a
#endif
}
extern "C" __global__ void selftest_wgmma_f16(const f16* a, const f16* b, float* d) {
    wgmma_one(a, b, d);
}
extern "C" __global__ void selftest_wgmma_bf16(const bf16* a, const bf16* b, float* d) {
    wgmma_one(a, b, d);
}

// Two warps hand a 32-float buffer back and forth over two mbarriers for 6 rounds (the
// producer/consumer protocol of gemm_wgmma_ws, phases and parities included): warp 0 waits until
// the buffer is empty (at once in round 0), fills it with 100 r + lane, arrives on `full`; warp
// 1 waits for `full`, copies the buffer to out[32 r + lane], arrives on `empty`. A wrong parity
// rule reads a stale round or deadlocks.
extern "C" __global__ void selftest_mbarrier(float* out) {
    __shared__ __align__(8) uint64_t bars[2];  // full, empty
    __shared__ float buf[32];
    uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (threadIdx.x == 0) {
        mbar_init(&bars[0], 32);
        mbar_init(&bars[1], 32);
    }
    __syncthreads();
    for (uint32_t r = 0; r < 6; r++) {
        if (warp == 0) {
            mbar_wait(&bars[1], (r & 1) ^ 1);
            buf[lane] = (float)(100 * r + lane);
            mbar_arrive(&bars[0]);
        } else {
            mbar_wait(&bars[0], r & 1);
            out[32 * r + lane] = buf[lane];
            mbar_arrive(&bars[1]);
        }
    }
}

// One warpgroup, sm_90a or the emulated device: two tensor copies (TMA) of 64 x 128 boxes of
// 16-bit elements through one mbarrier, at box origins (c0a, c1a) then (c0b, c1b) (column,
// row; they may lie partly outside the matrix). Each round: thread 0 announces the box's 16 KiB
// and asks for it; everyone waits for the round's phase, then reads the box back through the
// 128-byte swizzle (element (r, c) at byte r * 128 + ((2c / 16) ^ (r % 8)) * 16 + 2c % 16 of a
// 1024-byte-aligned box) into out[round][r][c]; a block barrier before the second copy
// overwrites the box.
// (A C++ function under the entry: the dynamic shared array is declared in C++ functions only.)
__device__ void tma_boxes(const TmaMap* map, int32_t c0a, int32_t c1a, int32_t c0b, int32_t c1b,
                          uint16_t* out) {
#if WGMMA_AVAILABLE
    DYN_SHARED(unsigned char, raw);
    unsigned char* box = raw + (1024u - wgmma_smem_addr(raw) % 1024u) % 1024u;
    uint64_t* bar = reinterpret_cast<uint64_t*>(box + 128 * 128);
    uint32_t tid = threadIdx.x;
    if (tid == 0) {
        mbar_init(bar, 1);
        mbar_init_fence();
    }
    __syncthreads();
    for (uint32_t round = 0; round < 2; round++) {
        if (tid == 0) {
            mbar_arrive_expect_tx(bar, 128 * 128);
            tma_load_2d(box, map, round ? c0b : c0a, round ? c1b : c1a, bar);
        }
        mbar_wait(bar, round);
        uint32_t r = tid;  // one box row per thread
        for (uint32_t c = 0; c < 64; c++) {
            uint32_t byte = r * 128 + (((2 * c) / 16) ^ (r % 8)) * 16 + (2 * c) % 16;
            out[(round * 128 + r) * 64 + c] = *reinterpret_cast<const uint16_t*>(box + byte);
        }
        __syncthreads();
    }
#else
    __trap();  // not built for sm_90a
#endif
}
extern "C" __global__ void selftest_tma(const __grid_constant__ TmaMap map, int32_t c0a,
                                        int32_t c1a, int32_t c0b, int32_t c1b, uint16_t* out) {
    tma_boxes(&map, c0a, c1a, c0b, c1b, out);
}

#ifdef APPARATE_EMU
// One thread waits for a phase that needs two arrivals after giving one: the emulated device
// must report the deadlock instead of spinning forever.
extern "C" __global__ void selftest_mbarrier_deadlock(float* out) {
    __shared__ __align__(8) uint64_t bar;
    mbar_init(&bar, 2);
    mbar_arrive(&bar);
    mbar_wait(&bar, 0);
    out[0] = 1.0f;
}

// Lanes 0-15 of the first warp wait in a shuffle while everyone else waits at __syncthreads:
// a deadlock on any device; the emulated one must report it instead of hanging.
extern "C" __global__ void selftest_deadlock(float* out) {
    float v = 1.0f;
    if (threadIdx.x < 16) {
        v = __shfl_xor_sync(0xffffffffu, v, 1);
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = v;
}

// Half of a warp exits, the other half shuffles with a full mask: undefined on a GPU; the
// emulated device must refuse it.
extern "C" __global__ void selftest_exited_lanes(float* out) {
    if (threadIdx.x < 16) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}
#endif

// The pipelined tensor-core GEMM (cp.async ring, ldmatrix, mma.sync; f16/bf16) and the
// epilogue stores that every GEMM shares: a header because two kernel families run it, the
// GEMM (gemm.cu, A = the rows of X) and the implicit-GEMM convolution (conv.cu, A = receptive
// fields gathered from the input).
#pragma once
// Guarded too: NVRTC sees this header under two names (from kernels/ and from common/).
#ifndef APPARATE_GEMM_PIPE_CUH
#define APPARATE_GEMM_PIPE_CUH

#include "mma.cuh"
#include "pipe.cuh"

// y[r][c] = act(v + bias[c] + res[r][c]), inside the M x N output only.
template <typename T>
__device__ void store_out(T* y, uint32_t M, uint32_t N, uint32_t r, uint32_t c, float v,
                          const T* bias, const T* res, int act) {
    if (r < M && c < N) {
        uint64_t at = (uint64_t)r * N + c;
        if (bias) v += to_f32(bias[c]);
        if (res) v += to_f32(res[at]);
        y[at] = from_f32<T>(activate(v, act));
    }
}

// ---- pipelined tensor cores (f16, bf16) --------------------------------------------------------
//
// The fast path, beside the simple kernel above (which stays as the parity reference and the
// fallback; the launcher picks by `GemmKernel`). A block computes a BM x BN tile of Y with
// WM x WN warps; K advances GEMM_PIPE_BK (32) at a time through a ring of GEMM_PIPE_STAGES
// shared-memory stages filled by cp.async 16-byte copies, so the copies for later k-steps are
// in flight while the tensor cores work on this one. Fragments come from shared memory with
// ldmatrix.x4 (one instruction per 16x16 A tile or per two 8-column B tiles). Shared rows are
// padded to 40 halves (80 bytes): the 8 row addresses of one ldmatrix phase then fall on 8
// different 16-byte bank groups, and so do the 8 copies of a phase, which go down 8 rows
// (copy_slot); the emulated device counts both (tests/op_parity.rs, no_bank_conflicts).
// Needs K % 8 == 0 and 16-byte aligned X and W (every 16-byte chunk of a row is then either
// wholly inside K or wholly outside, and is zero-filled outside); the launcher checks.
// The A operand comes from an `ASource` (below): the rows of X (`DenseRows`, the GEMM of
// gemm.cu) or the receptive fields of a convolution's output pixels, gathered from its input
// as the copies go (`ConvRows` of conv.cu, an implicit-GEMM convolution with no im2col buffer).
// Dynamic shared memory: STAGES * (BM + BN) * 40 halves.

#define PIPE_LD (GEMM_PIPE_BK + 8)

template <typename T>
APPARATE_DEVICE void store_pair(T* y, uint32_t M, uint32_t N, uint32_t r, uint32_t c, float v0,
                                float v1, const T* bias, const T* res, int act) {
    if (r >= M) return;
    if (c + 1 < N && (N % 2) == 0) {
        // Two neighbours in one 32-bit store (c is even, so the pair is 4-byte aligned).
        uint64_t at = (uint64_t)r * N + c;
        if (bias) {
            v0 += to_f32(bias[c]);
            v1 += to_f32(bias[c + 1]);
        }
        if (res) {
            v0 += to_f32(res[at]);
            v1 += to_f32(res[at + 1]);
        }
        T p[2] = {from_f32<T>(activate(v0, act)), from_f32<T>(activate(v1, act))};
        *reinterpret_cast<uint32_t*>(&y[at]) = *reinterpret_cast<const uint32_t*>(p);
    } else {
        store_out(y, M, N, r, c, v0, bias, res, act);
        store_out(y, M, N, r, c + 1, v1, bias, res, act);
    }
}

// Two neighbouring raw sums (columns c and c + 1, c even) of row r into split-K partial sums
// p [M][N]: one 8-byte store where N is even (the pair is then 8-byte aligned, as is every
// split's M x N block), so a quad's four lanes fill a whole 32-byte sector with one store
// instead of two half-filled ones; else one 4-byte store per column inside N.
struct alignas(8) PartialPair {
    float v0, v1;
};
APPARATE_DEVICE void store_partial_pair(float* p, uint32_t M, uint32_t N, uint32_t r, uint32_t c,
                                        float v0, float v1) {
    if (r >= M) return;
    uint64_t at = (uint64_t)r * N + c;
    if (c + 1 < N && N % 2 == 0) {
#ifdef APPARATE_EMU
        if (reinterpret_cast<uintptr_t>(p + at) % 8 != 0) {
            std::fprintf(stderr, "split-K partial pair not 8-byte aligned (%p)\n", (void*)(p + at));
            std::abort();  // a GPU raises a misaligned-address fault
        }
#endif
        *reinterpret_cast<PartialPair*>(p + at) = PartialPair{v0, v1};
    } else {
        if (c < N) p[at] = v0;
        if (c + 1 < N) p[at + 1] = v1;
    }
}

// The k-steps of split z of a split-K GEMM of `ktiles_all` k-steps, `per_split` to a split
// (the last one shorter): [first, first + count); all of them when not split. The launchers
// leave no split empty. Shared by every GEMM kernel that splits K.
APPARATE_DEVICE void split_k_steps(bool split, uint32_t z, uint32_t per_split,
                                   uint32_t ktiles_all, uint32_t& first, uint32_t& count) {
    first = split ? z * per_split : 0;
    uint32_t end = split && first + per_split < ktiles_all ? first + per_split : ktiles_all;
    count = end - first;
}

// Split-K (`partial` not null): block z of the grid's z dimension takes k-tiles
// [z per_split, (z + 1) per_split) and writes its raw f32 sums to partial[z][M][N]; then
// `gemm_splitk_reduce_*` adds the splits and applies the epilogue. For GEMMs whose output tiles
// do not fill the GPU (MiniLM's N = 384, any GEMM at batch 1): more blocks share a long K.
template <typename T, int BM, int BN, int WM, int WN, int STAGES, typename ASource>
__device__ void gemm_pipe(const ASource& a, const T* __restrict__ w,
                          const T* __restrict__ bias, const T* __restrict__ res,
                          T* __restrict__ y, uint32_t M, uint32_t N, uint32_t K, int act,
                          float* __restrict__ partial, uint32_t per_split) {
    constexpr int THREADS = WM * WN * 32, BK = GEMM_PIPE_BK, LD = PIPE_LD;
    constexpr int TM = BM / WM, TN = BN / WN;  // one warp's tile
    constexpr int MI = TM / 16, NI = TN / 8;   // its mma tiles
    static_assert(TM % 16 == 0 && TN % 16 == 0, "a warp tile is whole 16 x 16 blocks");
    constexpr int CHUNKS = BK / 8;  // 16-byte chunks per shared row
    DYN_SHARED(T, smem);
    T* as = smem;                          // [STAGES][BM][LD]
    T* bs = smem + STAGES * BM * LD;       // [STAGES][BN][LD]
    uint32_t tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    uint32_t wm = warp / WN, wn = warp % WN, g = lane / 4, t = lane % 4;
    uint32_t m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;  // rows on x: up to 2^31 tiles
    // This block's k-tiles: [k_first, k_first + ktiles).
    uint32_t k_first, ktiles;
    split_k_steps(partial != nullptr, blockIdx.z, per_split, (K + BK - 1) / BK, k_first, ktiles);

    // One k-tile of both operands into a stage: (BM + BN) rows x CHUNKS 16-byte copies. A
    // thread always copies the same chunk column of rows `crow` + multiples of PASS_ROWS, so
    // the A source works out its rows once, before the k loop.
    // A thread's rows and chunk come from copy_slot (its copies land free of bank conflicts).
    constexpr int PASS_ROWS = THREADS / CHUNKS;
    static_assert(THREADS % 32 == 0 && BM % PASS_ROWS == 0 && BN % PASS_ROWS == 0,
                  "every thread copies whole passes of rows");
    uint32_t crow, cchunk;
    copy_slot<CHUNKS>(tid, crow, cchunk);
    typename ASource::Row arow[BM / PASS_ROWS];
    #pragma unroll
    for (int i = 0; i < BM / PASS_ROWS; i++) arow[i] = a.row(m0 + crow + i * PASS_ROWS);
    auto load = [&](uint32_t stage, uint32_t kt) {
        T* sa = as + stage * BM * LD + cchunk * 8;
        T* sb = bs + stage * BN * LD + cchunk * 8;
        uint32_t k = kt * BK + cchunk * 8;
        typename ASource::Column col = a.column(k);
        #pragma unroll
        for (int i = 0; i < BM / PASS_ROWS; i++) {
            bool in;
            const T* src = a.at(arow[i], col, in);
            cp_async16(sa + (crow + i * PASS_ROWS) * LD, src, in);
        }
        #pragma unroll
        for (int i = 0; i < BN / PASS_ROWS; i++) {
            uint32_t r = crow + i * PASS_ROWS;
            bool in = n0 + r < N && k < K;
            cp_async16(sb + r * LD, in ? w + (uint64_t)(n0 + r) * K + k : w, in);
        }
    };

    float acc[MI][NI][4];
    #pragma unroll
    for (int i = 0; i < MI; i++)
        #pragma unroll
        for (int j = 0; j < NI; j++)
            #pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;

    // Prologue: STAGES - 1 k-tiles in flight (a group is committed even when empty, so the
    // wait count below stays the same at the end of K).
    #pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if ((uint32_t)s < ktiles) load(s, k_first + s);
        cp_async_commit();
    }
    for (uint32_t kt = 0; kt < ktiles; kt++) {
        // k-tile kt has landed (for this thread), then for every thread; the barrier also
        // says every warp is done with the stage the next load overwrites (read at kt - 1).
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        uint32_t next = kt + STAGES - 1;
        if (next < ktiles) load(next % STAGES, k_first + next);
        cp_async_commit();

        const T* sa = as + (kt % STAGES) * BM * LD;
        const T* sb = bs + (kt % STAGES) * BN * LD;
        #pragma unroll
        for (int ks = 0; ks < BK; ks += 16) {
            uint32_t af[MI][4], bf[NI][2];
            #pragma unroll
            for (int i = 0; i < MI; i++) {
                // Lanes 0-15 address rows 0-15 at k 0-7, lanes 16-31 the same rows at k 8-15.
                uint32_t r = wm * TM + i * 16 + lane % 16;
                ldmatrix_x4(af[i], sa + r * LD + ks + (lane / 16) * 8);
            }
            #pragma unroll
            for (int j = 0; j < NI; j += 2) {
                // Matrices: (cols j, k 0-7), (cols j, k 8-15), (cols j+1, k 0-7), (j+1, k 8-15).
                uint32_t n = wn * TN + j * 8 + (lane / 16) * 8 + lane % 8;
                uint32_t r4[4];
                ldmatrix_x4(r4, sb + n * LD + ks + ((lane / 8) % 2) * 8);
                bf[j][0] = r4[0];
                bf[j][1] = r4[1];
                bf[j + 1][0] = r4[2];
                bf[j + 1][1] = r4[3];
            }
            #pragma unroll
            for (int i = 0; i < MI; i++)
                #pragma unroll
                for (int j = 0; j < NI; j++) mma_16816<T>(acc[i][j], af[i], bf[j]);
        }
    }
    cp_async_wait<0>();  // only empty groups remain; leave nothing in flight at exit

    if (partial) {
        float* p = partial + (uint64_t)blockIdx.z * M * N;
        #pragma unroll
        for (int i = 0; i < MI; i++)
            #pragma unroll
            for (int j = 0; j < NI; j++)
                #pragma unroll
                for (int h = 0; h < 2; h++)  // rows g and g + 8
                    store_partial_pair(p, M, N, m0 + wm * TM + i * 16 + g + 8 * h,
                                       n0 + wn * TN + j * 8 + 2 * t, acc[i][j][2 * h],
                                       acc[i][j][2 * h + 1]);
        return;
    }
    #pragma unroll
    for (int i = 0; i < MI; i++)
        #pragma unroll
        for (int j = 0; j < NI; j++) {
            uint32_t r = m0 + wm * TM + i * 16 + g, c = n0 + wn * TN + j * 8 + 2 * t;
            store_pair(y, M, N, r, c, acc[i][j][0], acc[i][j][1], bias, res, act);
            store_pair(y, M, N, r + 8, c, acc[i][j][2], acc[i][j][3], bias, res, act);
        }
}

// Its three shapes, each launched with its THREADS (the launcher reads the same constants):
// - PipeBig: 128 x 128 tiles of 8 warps (2 x 4, each 64 x 32) for GEMMs with enough tiles to
//   fill the GPU;
// - PipeBig4: the same tile with 4 warps of 64 x 64 (PipeTile::Warp64x64): per k-step each
//   warp reads 8 ldmatrix.x4 for 32 multiplies where a 64 x 32 warp reads 6 for 16, so shared
//   memory serves 1.5 wavefronts per mma instead of 2.0 (copies included; the emulator's
//   count), at the cost of 128 accumulators per thread and half the warps per block;
// - PipeSmall: 64 x 64 tiles of 4 warps (2 x 2, each 32 x 32) for the narrow or short GEMMs
//   (MiniLM's N = 384 at a few hundred tokens).
struct PipeBig {
    static constexpr int BM = GEMM_PIPE_BIG_BM, BN = GEMM_PIPE_BIG_BN, WM = 2, WN = 4,
                         THREADS = GEMM_PIPE_BIG_THREADS;
};
struct PipeBig4 {
    static constexpr int BM = GEMM_PIPE_BIG_BM, BN = GEMM_PIPE_BIG_BN, WM = 2, WN = 2,
                         THREADS = GEMM_PIPE_BIG4_THREADS;
};
struct PipeSmall {
    static constexpr int BM = GEMM_PIPE_SMALL_BM, BN = GEMM_PIPE_SMALL_BN, WM = 2, WN = 2,
                         THREADS = GEMM_PIPE_SMALL_THREADS;
};
template <typename Shape, typename T, typename ASource>
__device__ void gemm_pipe_as(const ASource& a, const T* w, const T* bias, const T* res, T* y,
                             uint32_t M, uint32_t N, uint32_t K, int act, float* partial,
                             uint32_t per_split) {
    static_assert(Shape::WM * Shape::WN * 32 == Shape::THREADS, "one warp per warp tile");
    gemm_pipe<T, Shape::BM, Shape::BN, Shape::WM, Shape::WN, GEMM_PIPE_STAGES>(
        a, w, bias, res, y, M, N, K, act, partial, per_split);
}

// ---- A sources --------------------------------------------------------------------------------
//
// What gemm_pipe asks of its A operand: `Row row(m)`, the state of output row m (computed once
// per block for each row a thread copies; m may be >= M); `Column column(k)`, the state of the
// chunk at columns [k, k + 8) (once per k-step); `at(row, column, in)`, the address of those 8
// values (16 bytes, 16-byte aligned), with `in` false where they are all zero (outside the
// matrix or, for a convolution, in the padding: the copy then writes zeros and reads nothing).

// A = X [M, K] row-major.
template <typename T>
struct DenseRows {
    const T* x;
    uint32_t M, K;
    // Just the row index: a pointer per row would keep two more registers per row live
    // across the whole k loop (ptxas: 126 against 121 in the big tile on sm_80).
    struct Row {
        uint32_t m;
    };
    struct Column {
        uint32_t k;
    };
    APPARATE_DEVICE Row row(uint32_t m) const { return Row{m}; }
    APPARATE_DEVICE Column column(uint32_t k) const { return Column{k}; }
    APPARATE_DEVICE const T* at(const Row& r, const Column& c, bool& in) const {
        in = r.m < M && c.k < K;
        return in ? x + (uint64_t)r.m * K + c.k : x;
    }
};

#endif  // APPARATE_GEMM_PIPE_CUH

// Self-attention core, fused: QK^T, scale, key-length mask, softmax and PV in one kernel.
// Grid: (batch * heads, ceil(seq / ATTN_WARPS)); each warp owns one query row of one (input, head):
// its lanes split the keys for the scores (kept in shared memory), reduce max and sum with
// shuffles, then split the head dimension for the weighted sum of values. Padding keys are
// never read; padding query rows are written as zeros (as the CPU backend does).
#include "common/mma.cuh"
#include "common/pipe.cuh"

template <typename T>
__device__ void attention(const T* __restrict__ qkv, const int32_t* __restrict__ lengths,
                          T* __restrict__ out, uint32_t seq, uint32_t width, uint32_t heads,
                          float scale) {
    DYN_SHARED(float, smem);  // ATTN_WARPS * seq scores
    uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    uint32_t b = blockIdx.x / heads, h = blockIdx.x % heads, d = width / heads;
    uint32_t i = blockIdx.y * ATTN_WARPS + warp;
    if (i >= seq) return;  // no block barriers below, so an idle warp may leave
    uint32_t len = (uint32_t)lengths[b];
    uint64_t ld = 3ull * width, base = (uint64_t)b * seq;
    T* o = out + (base + i) * width + (uint64_t)h * d;
    if (i >= len) {
        for (uint32_t c = lane; c < d; c += 32) o[c] = from_f32<T>(0.0f);
        return;
    }
    const T* q = qkv + (base + i) * ld + (uint64_t)h * d;
    float* scores = smem + warp * seq;
    float mx = -3.402823466e38f;
    for (uint32_t j = lane; j < len; j += 32) {
        const T* k = qkv + (base + j) * ld + width + (uint64_t)h * d;
        float s = 0.0f;
        for (uint32_t c = 0; c < d; c++) s += to_f32(q[c]) * to_f32(k[c]);
        s *= scale;
        scores[j] = s;
        mx = fmaxf(mx, s);
    }
    mx = warp_max(mx);
    float sum = 0.0f;
    for (uint32_t j = lane; j < len; j += 32) {
        float e = expf(scores[j] - mx);
        scores[j] = e;
        sum += e;
    }
    float inv = 1.0f / warp_sum(sum);
    __syncwarp();  // every lane reads all scores below
    for (uint32_t c = lane; c < d; c += 32) {
        float acc = 0.0f;
        for (uint32_t j = 0; j < len; j++)
            acc += scores[j] * to_f32(qkv[(base + j) * ld + 2ull * width + (uint64_t)h * d + c]);
        o[c] = from_f32<T>(acc * inv);
    }
}

extern "C" __global__ void attention_f32(const float* qkv, const int32_t* lengths, float* out,
                                         uint32_t seq, uint32_t width, uint32_t heads, float scale) {
    attention(qkv, lengths, out, seq, width, heads, scale);
}
extern "C" __global__ void attention_f16(const f16* qkv, const int32_t* lengths, f16* out,
                                         uint32_t seq, uint32_t width, uint32_t heads, float scale) {
    attention(qkv, lengths, out, seq, width, heads, scale);
}
extern "C" __global__ void attention_bf16(const bf16* qkv, const int32_t* lengths, bf16* out,
                                          uint32_t seq, uint32_t width, uint32_t heads, float scale) {
    attention(qkv, lengths, out, seq, width, heads, scale);
}

// ---- flash attention (f16, bf16): tensor cores, online softmax ----------------------------------
//
// The fast path beside the kernel above (which stays as its parity reference and fallback; the
// launcher picks by `AttentionKernel`). A block takes ATTN_FLASH_BQ (64) query rows of one
// (input, head), a warp 16 of them; K and V stream through shared memory in tiles of
// ATTN_FLASH_BKV (64) keys, double-buffered with cp.async so the next tile loads while this one
// is used. Per tile a warp computes its 16 x 64 scores with mma.m16n8k16 (K's rows are the
// column-major B operand as they are), masks keys past the input's length, and folds the tile
// into a running max and sum (online softmax, in base 2: scores are pre-scaled by log2 e). The
// probabilities go from the score accumulators straight into A fragments (the accumulator
// layout of two neighbouring 8-column tiles is the A layout of one 16-wide k-step), and V's
// fragments come from ldmatrix.trans. Only tiles below the length are visited. Query rows past
// the length are written as zeros, as the simple kernel and the CPU backend do.
// Needs head_dim D in {32, 64, 128} (so width is a multiple of 32) and a 16-byte aligned qkv
// (the launcher checks). Dynamic shared memory: (BQ + 4 BKV) rows of D + 8 halves.
//
// The wide form (`attention_flash_wide_*`, RB = 2 row blocks per warp, 128 query rows per
// block; head sizes 32 and 64) reads each K and V fragment once for two 16-row blocks of
// queries: per multiply it reads half the shared memory of the narrow form, whose ldmatrix
// traffic about matches the tensor cores' rate (a 512-byte ldmatrix.x4 feeds two m16n8k16,
// about 4 clocks of a multiprocessor's 128 bytes per clock either way), so at long sequences
// the wide form can be bound by the multiplies instead. It costs registers (about 245 at head
// size 64 against 127: half the warps per multiprocessor) and has half as many blocks; which
// wins is for a GPU run to say (`FlashTile`, ATTN_FLASH_WIDE_MIN_BLOCKS).

template <typename T>
APPARATE_DEVICE uint32_t pack_pair(float lo, float hi) {
    return (uint32_t)from_f32<T>(lo).bits | ((uint32_t)from_f32<T>(hi).bits << 16);
}

template <typename T, int D, int RB>
__device__ void attention_flash(const T* __restrict__ qkv, const int32_t* __restrict__ lengths,
                                T* __restrict__ out, uint32_t seq, uint32_t width,
                                uint32_t heads, float scale) {
    constexpr int BQ = ATTN_FLASH_BQ * RB, BKV = ATTN_FLASH_BKV, THREADS = ATTN_FLASH_THREADS;
    constexpr int LD = D + 8, CH = D / 8;  // padded shared row; 16-byte chunks per row
    constexpr int NT = BKV / 8, DT = D / 8;  // 8-wide tiles of scores and of the output
    // Two row blocks hold twice the scores and outputs: at D = 128 that is 192 registers
    // before anything else, and ptxas spills (even with key tiles of 32 and Q read again
    // from shared memory per tile), so the wide form stops at D = 64.
    static_assert(RB == 1 || D <= 64, "the wide form's registers");
    static_assert(D % 16 == 0 && BKV % 16 == 0, "whole 16-wide k-steps");
    static_assert(THREADS == (ATTN_FLASH_BQ / 16) * 32, "a warp per 16 rows of the narrow block");
    DYN_SHARED(T, smem);
    T* qs = smem;               // [BQ][LD]
    T* ks = qs + BQ * LD;       // [2][BKV][LD]
    T* vs = ks + 2 * BKV * LD;  // [2][BKV][LD]
    uint32_t tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t = lane % 4;
    uint32_t b = blockIdx.x / heads, h = blockIdx.x % heads, q0 = blockIdx.y * BQ;
    uint32_t len = (uint32_t)lengths[b];
    uint64_t ld = 3ull * width, base = (uint64_t)b * seq;
    const T* qg = qkv + (uint64_t)h * D;
    const T* kg = qg + width;
    const T* vg = qg + 2ull * width;
    if (q0 >= len) {  // only padding rows here (uniform over the block: no barrier is skipped)
        uint32_t rows = seq - q0 < (uint32_t)BQ ? seq - q0 : (uint32_t)BQ;
        for (uint32_t c = tid; c < rows * (D / 2); c += THREADS) {
            T* orow = out + (base + q0 + c / (D / 2)) * width + (uint64_t)h * D;
            *reinterpret_cast<uint32_t*>(orow + 2 * (c % (D / 2))) = 0u;
        }
        return;
    }

    // `rows` rows from row0 of one operand; rows at or past `limit` are zero-filled.
    auto load_rows = [&](T* dst, const T* src, uint32_t row0, uint32_t limit, uint32_t rows) {
        for (uint32_t c = tid; c < rows * CH; c += THREADS) {
            uint32_t r, ch;
            copy_slot<CH>(c, r, ch);  // free of bank conflicts at every head size
            bool in = row0 + r < limit;
            cp_async16(dst + r * LD + ch * 8, in ? src + (base + row0 + r) * ld + ch * 8 : src, in);
        }
    };
    uint32_t tiles = (len + BKV - 1) / BKV;
    load_rows(qs, qg, q0, len, BQ);  // padding query rows are zero-filled, never read
    load_rows(ks, kg, 0, len, BKV);
    load_rows(vs, vg, 0, len, BKV);
    cp_async_commit();

    const float neg_inf = __int_as_float(0xff800000);
    const float sl = scale * 1.4426950408889634f;  // log2 e: exp(x) = exp2(x log2 e)
    // Row block rb of this warp: query rows q0 + 16 (RB warp + rb) .. + 15. Each K and V
    // fragment read from shared memory feeds RB row blocks' multiplies: two halve the
    // shared-memory reads per multiply, which otherwise bound the kernel at long sequences.
    float o[RB][DT][4], m[RB][2], l[RB][2];
    #pragma unroll
    for (int rb = 0; rb < RB; rb++) {
        #pragma unroll
        for (int d = 0; d < DT; d++)
            #pragma unroll
            for (int e = 0; e < 4; e++) o[rb][d][e] = 0.0f;
        #pragma unroll
        for (int r = 0; r < 2; r++) {
            m[rb][r] = neg_inf;
            l[rb][r] = 0.0f;
        }
    }
    uint32_t qf[RB][D / 16][4];
    auto q_rows = [&](int rb) { return qs + ((warp * RB + rb) * 16 + lane % 16) * LD + (lane / 16) * 8; };

    for (uint32_t kt = 0; kt < tiles; kt++) {
        uint32_t buf = kt % 2;
        if (kt + 1 < tiles) {
            // The other buffer was last read in tile kt - 1, before that tile's closing barrier.
            load_rows(ks + (1 - buf) * BKV * LD, kg, (kt + 1) * BKV, len, BKV);
            load_rows(vs + (1 - buf) * BKV * LD, vg, (kt + 1) * BKV, len, BKV);
        }
        cp_async_commit();
        cp_async_wait<1>();  // this tile (and, at kt = 0, Q) has landed for this thread
        __syncthreads();     // ... and for every thread
        if (kt == 0)
            #pragma unroll
            for (int rb = 0; rb < RB; rb++)
                #pragma unroll
                for (int kk = 0; kk < D / 16; kk++)
                    ldmatrix_x4(qf[rb][kk], q_rows(rb) + kk * 16);
        const T* kb = ks + buf * BKV * LD;
        const T* vb = vs + buf * BKV * LD;

        // Scores: RB x 16 query rows x BKV keys.
        float s[RB][NT][4];
        #pragma unroll
        for (int rb = 0; rb < RB; rb++)
            #pragma unroll
            for (int j = 0; j < NT; j++)
                #pragma unroll
                for (int e = 0; e < 4; e++) s[rb][j][e] = 0.0f;
        #pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            #pragma unroll
            for (int j = 0; j < NT; j += 2) {
                uint32_t r4[4];
                uint32_t n = j * 8 + (lane / 16) * 8 + lane % 8;
                ldmatrix_x4(r4, kb + n * LD + kk * 16 + ((lane / 8) % 2) * 8);
                uint32_t b0[2] = {r4[0], r4[1]}, b1[2] = {r4[2], r4[3]};
                #pragma unroll
                for (int rb = 0; rb < RB; rb++) {
                    mma_16816<T>(s[rb][j], qf[rb][kk], b0);
                    mma_16816<T>(s[rb][j + 1], qf[rb][kk], b1);
                }
            }
        }
        // Element e of s[rb][j]: query row g + 8 (e / 2) of the row block, key
        // kt BKV + 8 j + 2 t + e % 2. Every visited tile has a key below the length, so each
        // row's max is finite.
        #pragma unroll
        for (int rb = 0; rb < RB; rb++) {
            float mx[2] = {m[rb][0], m[rb][1]};
            #pragma unroll
            for (int j = 0; j < NT; j++)
                #pragma unroll
                for (int e = 0; e < 4; e++) {
                    uint32_t key = kt * BKV + j * 8 + 2 * t + (e & 1);
                    float v = key < len ? s[rb][j][e] * sl : neg_inf;
                    s[rb][j][e] = v;
                    mx[e / 2] = fmaxf(mx[e / 2], v);
                }
            float alpha[2], rs[2] = {0.0f, 0.0f};
            #pragma unroll
            for (int r = 0; r < 2; r++) {
                // A row's 64 scores are spread over the 4 lanes of a quad.
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
                alpha[r] = exp2f(m[rb][r] - mx[r]);  // 0 at the first tile (m = -inf)
                m[rb][r] = mx[r];
            }
            #pragma unroll
            for (int j = 0; j < NT; j++)
                #pragma unroll
                for (int e = 0; e < 4; e++) {
                    float p = exp2f(s[rb][j][e] - m[rb][e / 2]);
                    s[rb][j][e] = p;
                    rs[e / 2] += p;
                }
            #pragma unroll
            for (int r = 0; r < 2; r++) {
                rs[r] += __shfl_xor_sync(0xffffffffu, rs[r], 1);
                rs[r] += __shfl_xor_sync(0xffffffffu, rs[r], 2);
                l[rb][r] = l[rb][r] * alpha[r] + rs[r];
            }
            #pragma unroll
            for (int d = 0; d < DT; d++) {
                o[rb][d][0] *= alpha[0];
                o[rb][d][1] *= alpha[0];
                o[rb][d][2] *= alpha[1];
                o[rb][d][3] *= alpha[1];
            }
        }
        // O += P V, 16 keys per step: score tiles 2c and 2c + 1 are the A fragment.
        #pragma unroll
        for (int c = 0; c < BKV / 16; c++) {
            uint32_t pa[RB][4];
            #pragma unroll
            for (int rb = 0; rb < RB; rb++) {
                pa[rb][0] = pack_pair<T>(s[rb][2 * c][0], s[rb][2 * c][1]);
                pa[rb][1] = pack_pair<T>(s[rb][2 * c][2], s[rb][2 * c][3]);
                pa[rb][2] = pack_pair<T>(s[rb][2 * c + 1][0], s[rb][2 * c + 1][1]);
                pa[rb][3] = pack_pair<T>(s[rb][2 * c + 1][2], s[rb][2 * c + 1][3]);
            }
            #pragma unroll
            for (int d = 0; d < DT; d += 2) {
                // Matrices: (keys 0-7, dims 8d..), (keys 8-15, dims 8d..), then dims 8(d+1)..
                uint32_t key = c * 16 + ((lane / 8) % 2) * 8 + lane % 8;
                uint32_t r4[4];
                ldmatrix_x4_trans(r4, vb + key * LD + d * 8 + (lane / 16) * 8);
                uint32_t b0[2] = {r4[0], r4[1]}, b1[2] = {r4[2], r4[3]};
                #pragma unroll
                for (int rb = 0; rb < RB; rb++) {
                    mma_16816<T>(o[rb][d], pa[rb], b0);
                    mma_16816<T>(o[rb][d + 1], pa[rb], b1);
                }
            }
        }
        __syncthreads();  // every warp is done with this buffer before it is loaded again
    }
    cp_async_wait<0>();

    #pragma unroll
    for (int rb = 0; rb < RB; rb++)
        #pragma unroll
        for (int r = 0; r < 2; r++) {
            uint32_t row = q0 + (warp * RB + rb) * 16 + g + 8 * r;
            if (row >= seq) continue;
            T* orow = out + (base + row) * width + (uint64_t)h * D;
            float inv = 1.0f / l[rb][r];
            #pragma unroll
            for (int d = 0; d < DT; d++)  // padding query rows: zeros, whatever was computed
                *reinterpret_cast<uint32_t*>(orow + d * 8 + 2 * t) =
                    row < len ? pack_pair<T>(o[rb][d][2 * r] * inv, o[rb][d][2 * r + 1] * inv)
                              : 0u;
        }
}
extern "C" __global__ void __launch_bounds__(ATTN_FLASH_THREADS)
attention_flash_d32_f16(const f16* qkv, const int32_t* lengths, f16* out, uint32_t seq,
        uint32_t width, uint32_t heads, float scale) {
    attention_flash<f16, 32, 1>(qkv, lengths, out, seq, width, heads, scale);
}
extern "C" __global__ void __launch_bounds__(ATTN_FLASH_THREADS)
attention_flash_d64_f16(const f16* qkv, const int32_t* lengths, f16* out, uint32_t seq,
        uint32_t width, uint32_t heads, float scale) {
    attention_flash<f16, 64, 1>(qkv, lengths, out, seq, width, heads, scale);
}
extern "C" __global__ void __launch_bounds__(ATTN_FLASH_THREADS)
attention_flash_d128_f16(const f16* qkv, const int32_t* lengths, f16* out, uint32_t seq,
        uint32_t width, uint32_t heads, float scale) {
    attention_flash<f16, 128, 1>(qkv, lengths, out, seq, width, heads, scale);
}
extern "C" __global__ void __launch_bounds__(ATTN_FLASH_THREADS)
attention_flash_d32_bf16(const bf16* qkv, const int32_t* lengths, bf16* out, uint32_t seq,
        uint32_t width, uint32_t heads, float scale) {
    attention_flash<bf16, 32, 1>(qkv, lengths, out, seq, width, heads, scale);
}
extern "C" __global__ void __launch_bounds__(ATTN_FLASH_THREADS)
attention_flash_d64_bf16(const bf16* qkv, const int32_t* lengths, bf16* out, uint32_t seq,
        uint32_t width, uint32_t heads, float scale) {
    attention_flash<bf16, 64, 1>(qkv, lengths, out, seq, width, heads, scale);
}
extern "C" __global__ void __launch_bounds__(ATTN_FLASH_THREADS)
attention_flash_d128_bf16(const bf16* qkv, const int32_t* lengths, bf16* out, uint32_t seq,
        uint32_t width, uint32_t heads, float scale) {
    attention_flash<bf16, 128, 1>(qkv, lengths, out, seq, width, heads, scale);
}
extern "C" __global__ void __launch_bounds__(ATTN_FLASH_THREADS)
attention_flash_wide_d32_f16(const f16* qkv, const int32_t* lengths, f16* out, uint32_t seq,
        uint32_t width, uint32_t heads, float scale) {
    attention_flash<f16, 32, 2>(qkv, lengths, out, seq, width, heads, scale);
}
extern "C" __global__ void __launch_bounds__(ATTN_FLASH_THREADS)
attention_flash_wide_d64_f16(const f16* qkv, const int32_t* lengths, f16* out, uint32_t seq,
        uint32_t width, uint32_t heads, float scale) {
    attention_flash<f16, 64, 2>(qkv, lengths, out, seq, width, heads, scale);
}
extern "C" __global__ void __launch_bounds__(ATTN_FLASH_THREADS)
attention_flash_wide_d32_bf16(const bf16* qkv, const int32_t* lengths, bf16* out, uint32_t seq,
        uint32_t width, uint32_t heads, float scale) {
    attention_flash<bf16, 32, 2>(qkv, lengths, out, seq, width, heads, scale);
}
extern "C" __global__ void __launch_bounds__(ATTN_FLASH_THREADS)
attention_flash_wide_d64_bf16(const bf16* qkv, const int32_t* lengths, bf16* out, uint32_t seq,
        uint32_t width, uint32_t heads, float scale) {
    attention_flash<bf16, 64, 2>(qkv, lengths, out, seq, width, heads, scale);
}

// Constants a kernel and its Rust launcher (src/backend/gpu/<op>.rs) must agree on: block and
// tile sizes, warps per block, mode codes. This file is their one definition: build.rs turns
// every `#define NAME value` line below into `pub const NAME: u32 = value;` in the generated
// module `backend::gpu::params`, so the launchers cannot drift from the kernels. Keep to plain
// integer defines (one per line) here; anything else is not read by build.rs.
#pragma once

// Threads per block of the row kernels (LayerNorm, embedding, token pooling, L2 normalisation,
// softmax): one block per row, a multiple of 32 (block_sum/block_max reduce warp by warp).
#define ROW_THREADS 128
// Floats of reduction scratch after a row kept in dynamic shared memory (one per warp, <= 32).
#define ROW_SCRATCH 32

// The warp-per-row LayerNorm (RowKernel::Warp): rows (one per warp) per block, and the widest
// row it takes (the row lives in registers: 2048 / 32 = 64 values per lane).
#define LN_WARP_ROWS 4
#define LN_WARP_MAX_COLS 2048
// The vectorised token pooling: warps per block, each taking every POOL_WARPS-th row of an
// input (MiniLM's 128 tokens: 8 rows per warp).
#define POOL_WARPS 16

// Grid-stride kernels (im2col, grouped convolution, 2-D pooling, casts, copies).
#define ELEMENTWISE_THREADS 256
// Their grid is capped at this many blocks; the kernels loop over the rest.
#define ELEMENTWISE_MAX_BLOCKS 1048576

// GEMM output tile (rows x columns of Y per block) and block sizes: the tensor-core kernel
// (f16/bf16) runs 4 warps as 2 x 2 sub-tiles of 32 x 32, the SIMT one (f32) 16 x 16 threads of
// 4 x 4 outputs.
#define GEMM_BM 64
#define GEMM_BN 64
#define GEMM_TC_THREADS 128
#define GEMM_SIMT_THREADS 256
// The pipelined tensor-core GEMM (f16/bf16): k-step, shared-memory stages, and its two tile
// shapes (big: 8 warps as 2 x 4; small: 4 warps as 2 x 2). A big tile is used when the GEMM
// has at least one per multiprocessor (the device's count; GEMM_PIPE_BIG_MIN_TILES, an
// H100/H200's 132, where the device does not say), below which big tiles leave some idle.
#define GEMM_PIPE_BK 32
#define GEMM_PIPE_STAGES 4
#define GEMM_PIPE_BIG_BM 128
#define GEMM_PIPE_BIG_BN 128
#define GEMM_PIPE_BIG_THREADS 256
#define GEMM_PIPE_SMALL_BM 64
#define GEMM_PIPE_SMALL_BN 64
#define GEMM_PIPE_SMALL_THREADS 128
// The big tile's other warp layout (PipeTile::Warp64x64): 4 warps as 2 x 2 sub-tiles of 64 x 64,
// which read each fragment from shared memory for twice as many multiplies.
#define GEMM_PIPE_BIG4_THREADS 128
#define GEMM_PIPE_BIG_MIN_TILES 132
// Split-K (GemmKernel::PipelinedSplitK): when the small tiles number fewer than
// GEMM_PIPE_BIG_MIN_TILES, K is split so that about twice that many blocks run, into at most
// GEMM_SPLITK_MAX splits of at least GEMM_SPLITK_MIN_KTILES k-steps each.
#define GEMM_SPLITK_MAX 8
#define GEMM_SPLITK_MIN_KTILES 4
// The Hopper GEMM (GemmKernel::Wgmma, sm_90a): 128 x 128 tiles of two warpgroups (each 64 rows
// x 128 columns through wgmma.m64n128k16), k-steps of 64 (one 128-byte swizzled row per operand
// row), a ring of stages in dynamic shared memory (STAGES x 32 KiB, plus 1 KiB to align it).
#define GEMM_WGMMA_BM 128
#define GEMM_WGMMA_BN 128
#define GEMM_WGMMA_BK 64
#define GEMM_WGMMA_STAGES 5
#define GEMM_WGMMA_THREADS 256
// Its wide tile (128 x 256 through m64n256k16; 4 stages of 48 KiB), used when a GEMM has at
// least GEMM_PIPE_BIG_MIN_TILES of them.
#define GEMM_WGMMA_WIDE_BN 256
#define GEMM_WGMMA_WIDE_STAGES 4
// Its warp-specialised form (GemmKernel::WgmmaWs, the wide tile only): a producer warpgroup
// copying stages and two consumer warpgroups multiplying, handing stages over with mbarriers;
// registers per thread after setmaxnreg (producer, consumers: 128 x 40 + 256 x 232 <= 64 K).
#define GEMM_WGMMA_WS_THREADS 384
#define GEMM_WGMMA_WS_PRODUCER_REGS 40
#define GEMM_WGMMA_WS_CONSUMER_REGS 232
// Its TMA form (GemmKernel::WgmmaTma): the warp-specialised roles with one producer thread
// issuing tensor copies, both tile widths, persistent blocks; stages of the 128 x 128 tile
// (6 x 32 KiB; the wide tile keeps GEMM_WGMMA_WIDE_STAGES of 48 KiB).
#define GEMM_WGMMA_TMA_STAGES 6

// Query rows (one per warp) per block of the attention kernel.
#define ATTN_WARPS 4
// The flash-attention kernel (f16/bf16): query rows per block (16 per warp), keys per shared
// tile, threads per block (BQ / 16 warps).
#define ATTN_FLASH_BQ 64
#define ATTN_FLASH_BKV 64
#define ATTN_FLASH_THREADS 128
// Its wide form (two 16-row blocks of queries per warp, 2 x ATTN_FLASH_BQ rows per block; head
// sizes 32 and 64) runs where it makes at least this many blocks per multiprocessor of the device (the launcher
// multiplies by the count): fewer, and the narrow form's twice as many blocks finish sooner.
#define ATTN_FLASH_WIDE_MIN_BLOCKS 2

// Threads per block of the fused ramp kernel (one block per input).
#define RAMP_THREADS 256

// Activations fused into epilogues (Rust: `Activation::code`).
#define ACT_NONE 0
#define ACT_GELU_ERF 1
#define ACT_TANH 2
#define ACT_RELU 3
#define ACT_RELU6 4

// How token states become one vector per input (token pooling and the ramp kernel).
#define POOL_MEAN 0
#define POOL_CLS 1

// Decoder kernels. Quantized products: warps per block (one weight row each) and activation
// rows per warp (grid.y tiles the rows of x).
#define QMM_WARPS 4
#define QMM_TILE 8
// Paged-KV attention: warps per block (one (row, query head) pair each), and the largest head
// dimension (each lane keeps head_dim / 32 accumulators in registers).
#define KV_WARPS 4
#define KV_MAX_HEAD_DIM 256
// Split-KV ("flash-decoding") attention (AttentionKernel::Flash): warps per block, all on one
// (row, query head, split); keys each lane group loads before it computes (memory-level
// parallelism: 2 x 2 16-byte loads in flight per lane).
#define KV_FLASH_WARPS 4
#define KV_FLASH_UNROLL 2

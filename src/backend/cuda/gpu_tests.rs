//! Tests that need a CUDA GPU, `#[ignore]`d so that a machine without one reports them as
//! ignored rather than passing; `tools/gpu-check.sh` runs them with `--ignored` on the lent GPU
//! machine. Until a run is recorded in docs/gpu-runs.md they are compiled, not run on a GPU.
//! The self-test kernels' checks are `backend::gpu::selftest`'s, the code the emulated device's
//! tests run.

use std::sync::Arc;

use super::*;
use crate::backend::gpu::selftest;
use crate::backend::kernel_sources::SOURCES;
use crate::tensor::DType;

const NEEDS_GPU: &str = "needs a CUDA GPU: run by tools/gpu-check.sh";

fn device() -> CudaDevice {
    CudaDevice::new(CudaConfig::default()).unwrap_or_else(|e| panic!("{NEEDS_GPU}: {e}"))
}

/// `selftest_block_reverse` with full 1024-thread blocks: wrong without a real barrier.
#[test]
#[ignore = "needs a CUDA GPU: run by tools/gpu-check.sh"]
fn gpu_selftest_block_barrier() {
    selftest::block_reverse(&device(), 8, 1024).unwrap();
}

/// `selftest_warp`: xor-shuffle sum and max, shfl down/up/idx, ballot, any, all.
#[test]
#[ignore = "needs a CUDA GPU: run by tools/gpu-check.sh"]
fn gpu_selftest_warp_shuffles_and_votes() {
    selftest::warp(&device()).unwrap();
}

/// `selftest_mma_*`: one `mma.sync.m16n8k16` through the fragment layout the GEMM uses,
/// against a plain product, in f16 and bf16.
#[test]
#[ignore = "needs a CUDA GPU: run by tools/gpu-check.sh"]
fn gpu_selftest_tensor_core_fragments() {
    let dev = device();
    for dt in [DType::F16, DType::BF16] {
        selftest::mma(&dev, dt).unwrap_or_else(|e| panic!("{dt}: {e}"));
    }
}

/// `selftest_wgmma_*`: Hopper's warpgroup multiply through the swizzled shared layout and the
/// accumulator layout the `gemm_wgmma_*` kernels assume (the emulated twin's, checked here
/// against the hardware); skipped with a message on a GPU other than compute capability 9.0.
#[test]
#[ignore = "needs a CUDA GPU: run by tools/gpu-check.sh"]
fn gpu_selftest_wgmma_layouts() {
    let dev = device();
    if !dev.has_wgmma() {
        eprintln!("skipped: {} has no wgmma (sm_90a only)", dev.describe());
        return;
    }
    for dt in [DType::F16, DType::BF16] {
        selftest::wgmma(&dev, dt).unwrap_or_else(|e| panic!("{dt}: {e}"));
    }
}

/// Tensor copies (TMA): the driver's tensor map, the copy's 128-byte swizzle and zero fill, and
/// the transaction bytes that complete an mbarrier phase, as the emulated twin has them;
/// skipped with a message on a GPU other than compute capability 9.0.
#[test]
#[ignore = "needs a CUDA GPU: run by tools/gpu-check.sh"]
fn gpu_selftest_tma_boxes() {
    let dev = device();
    if !dev.has_wgmma() {
        eprintln!("skipped: {} has no TMA (sm_90a only)", dev.describe());
        return;
    }
    selftest::tma(&dev).unwrap();
}

/// mbarrier phases and parities (the warp-specialised Hopper GEMM's hand-over), as the emulated
/// twin has them.
#[test]
#[ignore = "needs a CUDA GPU: run by tools/gpu-check.sh"]
fn gpu_selftest_mbarrier_hand_over() {
    selftest::mbarrier(&device()).unwrap();
}

/// `ldmatrix.x4` against the PTX ISA's layout, and `cp.async` groups: land by their wait,
/// zero-fill (the pipelined GEMM's two instructions).
#[test]
#[ignore = "needs a CUDA GPU: run by tools/gpu-check.sh"]
fn gpu_selftest_ldmatrix_and_cp_async() {
    let dev = device();
    selftest::ldmatrix(&dev).unwrap();
    selftest::cp_async(&dev, false).unwrap();
}

/// The f32 <-> f16/bf16 casts (`cvt` inline PTX on a GPU).
#[test]
#[ignore = "needs a CUDA GPU: run by tools/gpu-check.sh"]
fn gpu_selftest_casts() {
    selftest::cast_roundtrip(&device()).unwrap();
}

/// Events bracket work on the stream and time it.
#[test]
#[ignore = "needs a CUDA GPU: run by tools/gpu-check.sh"]
fn gpu_events_time_launches() {
    let dev = device();
    let n = 1 << 22;
    let x = dev.alloc(n * 4).unwrap();
    let h = dev.alloc(n * 2).unwrap();
    let start = dev.record_event().unwrap();
    for _ in 0..10 {
        // SAFETY: a cast over n elements of buffers that hold them.
        unsafe {
            dev.launch(
                "cast_f32_f16",
                LaunchConfig::linear((n / 256) as u32, 256, 0),
                &[
                    KernelArg::Ptr(dev.address(&x)),
                    KernelArg::Ptr(dev.address(&h)),
                    KernelArg::U32(n as u32),
                ],
            )
        }
        .unwrap();
    }
    let end = dev.record_event().unwrap();
    dev.wait_event(&end).unwrap();
    let ms = dev.elapsed_ms(&start, &end).unwrap();
    assert!(ms > 0.0 && ms < 10_000.0, "{ms} ms");
}

#[test]
#[ignore = "needs a CUDA GPU: run by tools/gpu-check.sh"]
fn gpu_kernels_run_and_errors_are_errors() {
    // The default cache: a fresh one would compile every source again (tens of seconds for
    // sm_90a), which tools/gpu-check.sh's step `compile` has just done and reported.
    let dev = device();
    println!("{dev:?}");
    let builds = dev.source_builds();
    let skipped = CudaConfig::default().skip_sources;
    let built: Vec<&str> = SOURCES
        .iter()
        .map(|(f, _)| *f)
        .filter(|f| !skipped.iter().any(|s| s == f))
        .collect();
    assert_eq!(builds.len(), built.len());
    for (b, file) in builds.iter().zip(&built) {
        assert_eq!(b.file, *file);
        println!(
            "{file}: {:.2} s, {}",
            b.seconds,
            if b.cached { "cached" } else { "compiled" }
        );
    }
    let x: Vec<f32> = (0..1000).map(|i| i as f32 * 0.37 - 100.0).collect();
    let xb = dev.upload(bytemuck::cast_slice(&x)).unwrap();
    let h = dev.alloc(x.len() * 2).unwrap();
    let y = dev.alloc(x.len() * 4).unwrap();
    dev.fill(&y, 0xff).unwrap();
    let n = KernelArg::U32(x.len() as u32);
    let cfg = LaunchConfig::linear(4, 128, 0);
    let (xa, ha, ya) = (dev.address(&xb), dev.address(&h), dev.address(&y));
    // SAFETY (every launch below): cast kernels (src, dst, n) on buffers of n elements;
    // the failing launches are refused before reaching the GPU.
    let launch = |k: &str, cfg: LaunchConfig, a: &[KernelArg]| unsafe { dev.launch(k, cfg, a) };
    launch(
        "cast_f32_f16",
        cfg,
        &[KernelArg::Ptr(xa), KernelArg::Ptr(ha), n],
    )
    .unwrap();
    launch(
        "cast_f16_f32",
        cfg,
        &[KernelArg::Ptr(ha), KernelArg::Ptr(ya), n],
    )
    .unwrap();
    dev.synchronize().unwrap();
    let mut out = vec![0u8; x.len() * 4];
    dev.download(&y, &mut out).unwrap();
    let out: &[f32] = bytemuck::cast_slice(&out);
    for (a, b) in x.iter().zip(out) {
        assert_eq!(half::f16::from_f32(*a).to_f32(), *b);
    }
    // Errors, not panics.
    assert!(launch("no_such_kernel", cfg, &[]).is_err());
    let huge = LaunchConfig::linear(1, 32, dev.max_shared_optin + 1);
    assert!(launch("cast_f32_f16", huge, &[]).is_err());
    assert!(dev.download(&y, &mut [0u8; 3]).is_err());
    assert!(dev.alloc(1 << 50).is_err());
    assert_eq!(dev.len(&dev.alloc(0).unwrap()), 0);
    drop(dev);
    // A second device finds every module in the cache (the first put there what it lacked).
    if crate::backend::cuda::default_cache_dir().is_some() {
        let dev = device();
        assert_eq!(dev.cached_sources(), built.len());
        assert!(dev.source_builds().iter().all(|b| b.cached));
    }
}

/// Defect 1 on the hardware: the bytes read back are the ones the copy brought, even when
/// the copy is queued behind a long kernel, and the ring's blocks are reused.
#[test]
#[ignore = "needs a CUDA GPU: run by tools/gpu-check.sh"]
fn gpu_async_download_waits_for_its_own_copy() {
    let dev = Arc::new(device());
    let n = 1 << 24; // 64 MiB of f32: the cast kernels below take a while
    let x: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
    let xb = dev.upload(bytemuck::cast_slice(&x)).unwrap();
    let h = dev.alloc(n * 2).unwrap();
    let small = dev.alloc(4096).unwrap();
    let (before, total) = dev.ring.counts();
    for round in 0..4u8 {
        dev.fill(&small, 0).unwrap();
        let nn = KernelArg::U32(n as u32);
        // A few milliseconds of queued work ahead of the copy, so a read that does not wait
        // for its own event sees the previous round's bytes.
        for _ in 0..100 {
            // SAFETY: cast kernels over n elements of buffers that hold them.
            unsafe {
                dev.launch(
                    "cast_f32_f16",
                    LaunchConfig::linear((n / 256) as u32, 256, 0),
                    &[
                        KernelArg::Ptr(dev.address(&xb)),
                        KernelArg::Ptr(dev.address(&h)),
                        nn,
                    ],
                )
            }
            .unwrap();
        }
        dev.fill(&small, round + 1).unwrap();
        let mut p = dev.alloc_pinned(4096).unwrap();
        dev.download_async(&small, &mut p).unwrap();
        // Read on another thread, as the releaser does.
        let d2 = dev.clone();
        let bytes = std::thread::spawn(move || d2.read_pinned(&p).unwrap())
            .join()
            .unwrap();
        assert!(bytes.iter().all(|&b| b == round + 1), "round {round}");
    }
    assert_eq!(
        dev.ring.counts(),
        (before, total),
        "blocks went back, none added"
    );
    dev.synchronize().unwrap();
}

/// Graphs (`GraphDevice` over `cuda`: stream capture, a page-locked staging block, one graph
/// launch per replay) compute what the plain device computes, call after call with new
/// inputs; a random BERT's forward graphed per (batch, sequence), and stage by stage; the
/// MNIST ResNet stage by stage.
#[test]
#[ignore = "needs a CUDA GPU: run by tools/gpu-check.sh"]
fn gpu_graph_replays_match_the_plain_device() {
    let dev = Arc::new(device());
    crate::backend::capture::tests::check_replays(dev.clone());
    crate::backend::capture::tests::check_bert(dev.clone());
    crate::backend::capture::tests::check_cnn(dev);
}

/// The memory pool keeps freed memory (`keep_freed_memory`): its release threshold reads back
/// as "never", and 256 MiB allocated and freed stay reserved by the pool after a
/// synchronisation, where the driver's default threshold (0) would hand them back to it.
#[test]
#[ignore = "needs a CUDA GPU: run by tools/gpu-check.sh"]
fn gpu_memory_pool_keeps_freed_memory() {
    let dev = device();
    if !dev.owner.async_alloc {
        eprintln!(
            "skipped: {} has no stream-ordered allocation",
            dev.describe()
        );
        return;
    }
    // SAFETY: the context's own device.
    let pool =
        unsafe { cudarc::driver::result::device::get_mem_pool(dev.owner.ctx.cu_device()) }.unwrap();
    let read = |attr: dsys::CUmemPool_attribute| {
        let mut v: u64 = 0;
        // SAFETY: both attributes read here are cuuint64_t.
        unsafe {
            cudarc::driver::result::mem_pool::get_attribute(pool, attr, (&mut v as *mut u64).cast())
        }
        .unwrap();
        v
    };
    use dsys::CUmemPool_attribute::{
        CU_MEMPOOL_ATTR_RELEASE_THRESHOLD as THRESHOLD,
        CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT as RESERVED,
    };
    assert_eq!(read(THRESHOLD), u64::MAX);
    let bytes = 256 << 20;
    let b = dev.alloc(bytes).unwrap();
    dev.fill(&b, 1).unwrap();
    drop(b);
    dev.synchronize().unwrap();
    let reserved = read(RESERVED);
    assert!(
        reserved >= bytes as u64,
        "the pool reserves {reserved} bytes after a free of {bytes} and a synchronisation"
    );
}

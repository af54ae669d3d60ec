//! The emulated device itself: launches, barriers, warp exchange, deadlock reporting.

use apparate::backend::device::{Device, KernelArg, LaunchConfig, TensorMapSpec};
use apparate::backend::emu::{EmuConfig, EmuDevice, Wavefronts};
use apparate::backend::gpu::selftest;

/// Every launch in this file passes buffers it allocated with sizes that fit them, in the
/// order and types of the kernel's parameters (the contract of `Device::launch`).
fn launch(
    d: &EmuDevice,
    kernel: &str,
    cfg: LaunchConfig,
    args: &[KernelArg],
) -> apparate::Result<()> {
    // SAFETY: see above.
    unsafe { d.launch(kernel, cfg, args) }
}

fn dev() -> EmuDevice {
    EmuDevice::new(EmuConfig::default()).unwrap()
}

#[test]
fn cast_roundtrip_f32_bf16_f16() {
    selftest::cast_roundtrip(&dev()).unwrap();
}

#[test]
fn bad_launches_are_errors() {
    let d = dev();
    let e = launch(&d, "no_such_kernel", LaunchConfig::linear(1, 32, 0), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("no_such_kernel"), "{e}");
    let e = launch(&d, "cast_f32_f16", LaunchConfig::linear(1, 2048, 0), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("2048 threads"), "{e}");
    let e = launch(
        &d,
        "cast_f32_f16",
        LaunchConfig::linear(1, 32, 1 << 20),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("shared memory"), "{e}");
}

/// The device self-tests of `backend::gpu::selftest`, the same code a real GPU's check runs.
#[test]
fn block_barrier_is_real_in_every_schedule() {
    for seed in [0u64, 1, 7, 12345] {
        let d = EmuDevice::new(EmuConfig {
            threads: None,
            shuffle_seed: seed,
            ..EmuConfig::default()
        })
        .unwrap();
        selftest::block_reverse(&d, 3, 256).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
}

#[test]
fn warp_shuffles_and_votes() {
    selftest::warp(&dev()).unwrap();
}

#[test]
fn tensor_core_wrapper_matches_a_plain_product() {
    use apparate::tensor::DType;
    let d = dev();
    for dt in [DType::F16, DType::BF16] {
        selftest::mma(&d, dt).unwrap();
    }
}

#[test]
fn wgmma_twin_decodes_swizzled_descriptors_and_scale_d() {
    use apparate::tensor::DType;
    let d = dev();
    for dt in [DType::F16, DType::BF16] {
        selftest::wgmma(&d, dt).unwrap();
    }
}

#[test]
fn tma_twin_copies_swizzled_boxes_with_zero_fill() {
    // Under shuffled orders too (copies then land in any order while a thread waits).
    for seed in [0u64, 5] {
        let d = EmuDevice::new(EmuConfig {
            threads: None,
            shuffle_seed: seed,
            ..EmuConfig::default()
        })
        .unwrap();
        selftest::tma(&d).unwrap();
    }
}

#[test]
fn tensor_maps_refuse_what_the_driver_would_by_name() {
    let d = dev();
    let good = TensorMapSpec {
        address: 4096,
        rows: 100,
        cols: 72,
        row_stride_bytes: 144,
        box_rows: 128,
    };
    assert!(d.tensor_map(&good).is_ok());
    for (bad, why) in [
        (
            TensorMapSpec {
                address: 4100,
                ..good
            },
            "not 16-byte aligned",
        ),
        (
            TensorMapSpec {
                row_stride_bytes: 152,
                ..good
            },
            "multiple of 16 bytes",
        ),
        (
            TensorMapSpec {
                row_stride_bytes: 128,
                ..good
            },
            "shorter than a row",
        ),
        (TensorMapSpec { rows: 0, ..good }, "1 ..= 2^32"),
        (
            TensorMapSpec {
                box_rows: 257,
                ..good
            },
            "1 ..= 256 rows",
        ),
    ] {
        let e = d.tensor_map(&bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad:?}: {e}");
    }
}

#[test]
fn ldmatrix_twin_follows_the_ptx_layout() {
    selftest::ldmatrix(&dev()).unwrap();
}

/// The bank accounting counts what the hardware would: 8 wavefronts for a phase of eight rows
/// on one bank group, 1 for eight lanes naming one row, 2 for copies of two rows whose chunks
/// meet (`selftest_bank_conflicts`); the fast kernels' checks rely on it
/// (tests/op_parity.rs, `no_bank_conflicts`).
#[test]
fn bank_accounting_counts_wavefronts_by_phase() {
    let d = dev();
    let src = d.upload(&[0u8; 32 * 16]).unwrap();
    let out = d.alloc(32 * 4).unwrap();
    let args = [
        KernelArg::Ptr(d.address(&src)),
        KernelArg::Ptr(d.address(&out)),
    ];
    let cfg = LaunchConfig::linear(1, 32, 1024);
    launch(&d, "selftest_bank_conflicts", cfg, &args).unwrap();
    let t = d.bank_traffic()["selftest_bank_conflicts"];
    // Two ldmatrix.x4 of 4 phases each: 4 x 8 + 4 x 1 wavefronts.
    let want = |ideal, actual| Wavefronts { ideal, actual };
    assert_eq!(t.ldmatrix, want(8, 36));
    // One cp.async of 4 phases, each 2 wavefronts.
    assert_eq!(t.cp_async, want(4, 8));
    assert_eq!(t.cp_async.excess(), 1.0);
    assert_eq!(t.mma, 0);
    // Counted per launch: a second launch doubles them.
    launch(&d, "selftest_bank_conflicts", cfg, &args).unwrap();
    let t = d.bank_traffic()["selftest_bank_conflicts"];
    assert_eq!((t.ldmatrix, t.cp_async), (want(16, 72), want(8, 16)));
}

#[test]
fn cp_async_copies_land_at_their_wait_and_zero_fill() {
    // Under shuffled thread orders too: a lane's copies are its own, whenever they land.
    for seed in [0u64, 3, 11] {
        let d = EmuDevice::new(EmuConfig {
            threads: None,
            shuffle_seed: seed,
            ..EmuConfig::default()
        })
        .unwrap();
        // No shuffle seed (0 here, and none from APPARATE_EMU_SEED) holds every copy until its
        // wait; a shuffle seed lands some early.
        let env_seed = std::env::var("APPARATE_EMU_SEED").map_or(0, |v| v.parse().unwrap_or(1));
        let held = seed == 0 && env_seed == 0;
        selftest::cp_async(&d, held).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
}

#[test]
fn deadlock_is_reported_with_the_kernel_name() {
    let d = dev();
    let out = d.alloc(64 * 4).unwrap();
    let e = launch(
        &d,
        "selftest_deadlock",
        LaunchConfig::linear(2, 64, 0),
        &[KernelArg::Ptr(d.address(&out))],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("selftest_deadlock") && e.contains("deadlocked"),
        "{e}"
    );
}

#[test]
fn mbarrier_phases_hand_over_and_a_lost_arrival_is_a_deadlock() {
    for seed in [0u64, 3, 11] {
        let d = EmuDevice::new(EmuConfig {
            threads: None,
            shuffle_seed: seed,
            ..EmuConfig::default()
        })
        .unwrap();
        selftest::mbarrier(&d).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
    let d = dev();
    let out = d.alloc(4).unwrap();
    let e = launch(
        &d,
        "selftest_mbarrier_deadlock",
        LaunchConfig::linear(1, 1, 0),
        &[KernelArg::Ptr(d.address(&out))],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("deadlocked") && e.contains("mbarrier"), "{e}");
}

#[test]
fn events_time_launches() {
    let d = dev();
    let a = d.record_event().unwrap();
    let out = d.alloc(64 * 4).unwrap();
    launch(
        &d,
        "selftest_block_reverse",
        LaunchConfig::linear(1, 64, 0),
        &[
            KernelArg::Ptr(d.address(&out)),
            KernelArg::Ptr(d.address(&out)),
            KernelArg::U32(0),
        ],
    )
    .unwrap();
    let b = d.record_event().unwrap();
    d.wait_event(&b).unwrap();
    assert!(d.elapsed_ms(&a, &b).unwrap() >= 0.0);
}

#[test]
fn warp_operation_after_lanes_exited_is_refused() {
    let d = dev();
    let out = d.alloc(32 * 4).unwrap();
    let e = launch(
        &d,
        "selftest_exited_lanes",
        LaunchConfig::linear(1, 32, 0),
        &[KernelArg::Ptr(d.address(&out))],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("selftest_exited_lanes") && e.contains("16 of its lanes exited"),
        "{e}"
    );
}

#[test]
fn tensors_of_another_dtype_are_refused() {
    use apparate::backend::Backend;
    use apparate::backend::gpu::GpuBackend;
    use apparate::tensor::DType;
    let dev = std::sync::Arc::new(dev());
    let half = GpuBackend::shared(dev.clone(), DType::F16);
    let full = GpuBackend::shared(dev, DType::F32);
    let x = half.upload(&[1.0; 8], &[2, 4]).unwrap();
    let e = full.softmax(&x).err().expect("accepted").to_string();
    assert!(e.contains("f16 tensor handed to the f32 backend"), "{e}");
}

/// The GEMMs size their big tiles and persistent grids to the device's multiprocessors, also
/// through the graph-capturing wrapper; a device that does not say gets an H100/H200's 132.
#[test]
fn gemm_grids_follow_the_device_multiprocessors() {
    use apparate::backend::capture::GraphDevice;
    use apparate::backend::gpu::GpuBackend;
    use apparate::tensor::DType;
    use std::sync::Arc;

    let plain = GpuBackend::new(dev(), DType::F16);
    assert_eq!(plain.gemm_fill_tiles(), 132);
    let a100 = EmuDevice::new(EmuConfig {
        multiprocessors: Some(108),
        ..EmuConfig::default()
    })
    .unwrap();
    assert_eq!(a100.multiprocessors(), Some(108));
    let graphs = GraphDevice::new(Arc::new(a100));
    assert_eq!(graphs.multiprocessors(), Some(108));
    let backend = GpuBackend::new(graphs, DType::F16);
    assert_eq!(backend.gemm_fill_tiles(), 108);
    assert_eq!(backend.with_gemm_fill_tiles(0).gemm_fill_tiles(), 1);
}

//! The emulated device itself: launches, barriers, warp exchange, deadlock reporting.

use apparate::backend::device::{Device, KernelArg, LaunchConfig};
use apparate::backend::emu::{EmuConfig, EmuDevice};

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
    let d = dev();
    let n = 1000u32;
    let x: Vec<f32> = (0..n).map(|i| (i as f32 - 500.0) * 0.37).collect();
    let xb = d.upload(bytemuck::cast_slice(&x)).unwrap();
    for (to, back, tol) in [
        ("cast_f32_f16", "cast_f16_f32", 1e-3f32),
        ("cast_f32_bf16", "cast_bf16_f32", 8e-3),
    ] {
        let h = d.alloc(n as usize * 2).unwrap();
        let y = d.alloc(n as usize * 4).unwrap();
        d.fill(&y, 0xff).unwrap();
        let cfg = LaunchConfig::linear(3, 128, 0);
        launch(
            &d,
            to,
            cfg,
            &[
                KernelArg::Ptr(d.address(&xb)),
                KernelArg::Ptr(d.address(&h)),
                KernelArg::U32(n),
            ],
        )
        .unwrap();
        launch(
            &d,
            back,
            cfg,
            &[
                KernelArg::Ptr(d.address(&h)),
                KernelArg::Ptr(d.address(&y)),
                KernelArg::U32(n),
            ],
        )
        .unwrap();
        let mut out = vec![0u8; n as usize * 4];
        d.download(&y, &mut out).unwrap();
        let out: &[f32] = bytemuck::cast_slice(&out);
        for (a, b) in x.iter().zip(out) {
            assert!((a - b).abs() <= tol * a.abs().max(1.0), "{to}: {a} -> {b}");
        }
    }
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

fn run_f32(
    d: &EmuDevice,
    kernel: &str,
    cfg: LaunchConfig,
    inputs: &[&[f32]],
    out_len: usize,
) -> Vec<f32> {
    let bufs: Vec<_> = inputs
        .iter()
        .map(|x| d.upload(bytemuck::cast_slice(x)).unwrap())
        .collect();
    let out = d.alloc(out_len * 4).unwrap();
    d.fill(&out, 0xff).unwrap();
    let mut args: Vec<KernelArg> = bufs.iter().map(|b| KernelArg::Ptr(d.address(b))).collect();
    args.push(KernelArg::Ptr(d.address(&out)));
    launch(d, kernel, cfg, &args).unwrap();
    let mut bytes = vec![0u8; out_len * 4];
    d.download(&out, &mut bytes).unwrap();
    bytemuck::cast_slice(&bytes).to_vec()
}

#[test]
fn block_barrier_is_real_in_every_schedule() {
    let n = 3 * 256;
    let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
    for seed in [0u64, 1, 7, 12345] {
        let d = EmuDevice::new(EmuConfig {
            threads: None,
            shuffle_seed: seed,
        })
        .unwrap();
        let bufs = [
            d.upload(bytemuck::cast_slice(&x)).unwrap(),
            d.alloc(n * 4).unwrap(),
        ];
        launch(
            &d,
            "selftest_block_reverse",
            LaunchConfig::linear(3, 256, 0),
            &[
                KernelArg::Ptr(d.address(&bufs[0])),
                KernelArg::Ptr(d.address(&bufs[1])),
                KernelArg::U32(n as u32),
            ],
        )
        .unwrap();
        let mut bytes = vec![0u8; n * 4];
        d.download(&bufs[1], &mut bytes).unwrap();
        let y: &[f32] = bytemuck::cast_slice(&bytes);
        for b in 0..3 {
            for t in 0..256 {
                assert_eq!(y[b * 256 + t], (b * 256 + 255 - t) as f32, "seed {seed}");
            }
        }
    }
}

#[test]
fn warp_shuffles_and_votes() {
    let d = dev();
    let x: Vec<f32> = (0..128).map(|i| ((i * 37) % 29) as f32 - 10.0).collect();
    let out = run_f32(
        &d,
        "selftest_warp",
        LaunchConfig::linear(2, 64, 0),
        &[&x],
        4 * 8,
    );
    for w in 0..4 {
        let v = &x[w * 32..(w + 1) * 32];
        let o = &out[w * 8..(w + 1) * 8];
        assert_eq!(o[0], v.iter().sum::<f32>());
        assert_eq!(o[1], v.iter().cloned().fold(f32::MIN, f32::max));
        assert_eq!(o[2], v[1]);
        assert_eq!(o[3], v[0]);
        assert_eq!(o[4], v[7]);
        let ballot: u32 = (0..32).filter(|&i| v[i] > 0.0).map(|i| 1u32 << i).sum();
        assert_eq!(o[5], ballot as f32);
        assert_eq!((o[6], o[7]), (0.0, 1.0));
    }
}

#[test]
fn tensor_core_wrapper_matches_a_plain_product() {
    use apparate::tensor::DType;
    let d = dev();
    let a: Vec<f32> = (0..256)
        .map(|i| ((i * 13) % 17) as f32 / 8.0 - 1.0)
        .collect();
    let bt: Vec<f32> = (0..128)
        .map(|i| ((i * 7) % 11) as f32 / 4.0 - 1.25)
        .collect();
    for (dt, kernel) in [
        (DType::F16, "selftest_mma_f16"),
        (DType::BF16, "selftest_mma_bf16"),
    ] {
        // Values are exact in both half formats, so the product is exact in f32.
        let ab = d.upload(&dt.encode(&a)).unwrap();
        let bb = d.upload(&dt.encode(&bt)).unwrap();
        let out = d.alloc(128 * 4).unwrap();
        d.fill(&out, 0xff).unwrap();
        launch(
            &d,
            kernel,
            LaunchConfig::linear(1, 32, 0),
            &[
                KernelArg::Ptr(d.address(&ab)),
                KernelArg::Ptr(d.address(&bb)),
                KernelArg::Ptr(d.address(&out)),
            ],
        )
        .unwrap();
        let mut bytes = vec![0u8; 128 * 4];
        d.download(&out, &mut bytes).unwrap();
        let got: &[f32] = bytemuck::cast_slice(&bytes);
        for m in 0..16 {
            for n in 0..8 {
                let want: f32 = (0..16).map(|k| a[m * 16 + k] * bt[n * 16 + k]).sum();
                assert_eq!(got[m * 8 + n], want, "{kernel} D[{m}][{n}]");
            }
        }
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

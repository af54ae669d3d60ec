//! The emulated device itself: launches, barriers, warp exchange, deadlock reporting.

use apparate::backend::device::{Device, KernelArg, LaunchConfig};
use apparate::backend::emu::{EmuConfig, EmuDevice};

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
        d.launch(
            to,
            cfg,
            &[
                KernelArg::Ptr(d.address(&xb)),
                KernelArg::Ptr(d.address(&h)),
                KernelArg::U32(n),
            ],
        )
        .unwrap();
        d.launch(
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
    let e = d
        .launch("no_such_kernel", LaunchConfig::linear(1, 32, 0), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("no_such_kernel"), "{e}");
    let e = d
        .launch("cast_f32_f16", LaunchConfig::linear(1, 2048, 0), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("2048 threads"), "{e}");
    let e = d
        .launch("cast_f32_f16", LaunchConfig::linear(1, 32, 1 << 20), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("shared memory"), "{e}");
}

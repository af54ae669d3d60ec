//! Launchers of `kernels/selftest.cu` and their checks: the device itself (emulated or real)
//! against what CUDA promises. A block barrier, warp shuffles and votes, the tensor-core
//! fragment layout, and the casts of `kernels/elementwise.cu`. Each returns `Ok` or an
//! [`Error::Kernel`] naming the first value that is wrong, so the emulated device's tests and a
//! real GPU's check run the same code.

use super::elementwise;
use crate::backend::device::{Device, KernelArg, LaunchConfig, TensorMapSpec};
use crate::error::{Error, Result};
use crate::tensor::DType;

fn wrong<D: Device>(dev: &D, kernel: &str, what: String) -> Error {
    Error::kernel(dev.name(), kernel, format!("wrong result: {what}"))
}

fn download_f32<D: Device>(dev: &D, buf: &D::Buf) -> Result<Vec<f32>> {
    dev.synchronize()?;
    let mut bytes = vec![0u8; dev.len(buf)];
    dev.download(buf, &mut bytes)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn upload_f32<D: Device>(dev: &D, v: &[f32]) -> Result<D::Buf> {
    dev.upload(bytemuck::cast_slice(v))
}

/// `selftest_block_reverse` over `blocks` blocks of `threads` (<= 1024): each block reverses
/// its slice through shared memory, which is wrong without a real barrier.
pub fn block_reverse<D: Device>(dev: &D, blocks: u32, threads: u32) -> Result<()> {
    const K: &str = "selftest_block_reverse";
    let n = (blocks * threads) as usize;
    let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let xb = upload_f32(dev, &x)?;
    let y = dev.alloc(n * 4)?;
    dev.fill(&y, 0xff)?;
    let args = [
        KernelArg::Ptr(dev.address(&xb)),
        KernelArg::Ptr(dev.address(&y)),
        KernelArg::U32(n as u32),
    ];
    // SAFETY: (const float* x, float* y, uint32_t n) with two buffers of n floats; the kernel's
    // shared tile holds 1024 values, the most threads a block may have.
    unsafe { dev.launch(K, LaunchConfig::linear(blocks, threads, 0), &args) }?;
    let got = download_f32(dev, &y)?;
    let t = threads as usize;
    for (i, &g) in got.iter().enumerate() {
        let want = (i / t * t + t - 1 - i % t) as f32;
        if g != want {
            return Err(wrong(dev, K, format!("y[{i}] = {g}, expected {want}")));
        }
    }
    Ok(())
}

/// `selftest_warp` on 2 blocks of 64 threads: per warp the xor-shuffle sum and max, shfl_down,
/// shfl_up, shfl from lane 7, ballot, any and all.
pub fn warp<D: Device>(dev: &D) -> Result<()> {
    const K: &str = "selftest_warp";
    let x: Vec<f32> = (0..128).map(|i| ((i * 37) % 29) as f32 - 10.0).collect();
    let xb = upload_f32(dev, &x)?;
    let out = dev.alloc(4 * 8 * 4)?;
    dev.fill(&out, 0xff)?;
    let args = [
        KernelArg::Ptr(dev.address(&xb)),
        KernelArg::Ptr(dev.address(&out)),
    ];
    // SAFETY: (const float* x, float* out): 128 inputs for 128 threads, 8 outputs per warp.
    unsafe { dev.launch(K, LaunchConfig::linear(2, 64, 0), &args) }?;
    let got = download_f32(dev, &out)?;
    for w in 0..4 {
        let v = &x[w * 32..(w + 1) * 32];
        let ballot: u32 = (0..32).filter(|&i| v[i] > 0.0).map(|i| 1u32 << i).sum();
        let want = [
            v.iter().sum::<f32>(),
            v.iter().cloned().fold(f32::MIN, f32::max),
            v[1],
            v[0],
            v[7],
            ballot as f32,
            0.0,
            1.0,
        ];
        let names = ["sum", "max", "down", "up", "from 7", "ballot", "any", "all"];
        for (k, name) in names.iter().enumerate() {
            if got[w * 8 + k] != want[k] {
                return Err(wrong(
                    dev,
                    K,
                    format!("warp {w} {name} = {}, expected {}", got[w * 8 + k], want[k]),
                ));
            }
        }
    }
    Ok(())
}

/// `selftest_mma_f16` / `_bf16`: one m16n8k16 tensor-core product through the fragment layout
/// the GEMM uses, on values exact in both half formats (so the f32 result is exact).
pub fn mma<D: Device>(dev: &D, dtype: DType) -> Result<()> {
    let kernel = format!("selftest_mma_{}", dtype.name());
    if dtype == DType::F32 {
        return Err(Error::kernel(dev.name(), kernel, "no f32 tensor-core path"));
    }
    let a: Vec<f32> = (0..256)
        .map(|i| ((i * 13) % 17) as f32 / 8.0 - 1.0)
        .collect();
    let bt: Vec<f32> = (0..128)
        .map(|i| ((i * 7) % 11) as f32 / 4.0 - 1.25)
        .collect();
    let ab = dev.upload(&dtype.encode(&a))?;
    let bb = dev.upload(&dtype.encode(&bt))?;
    let out = dev.alloc(128 * 4)?;
    dev.fill(&out, 0xff)?;
    let args = [
        KernelArg::Ptr(dev.address(&ab)),
        KernelArg::Ptr(dev.address(&bb)),
        KernelArg::Ptr(dev.address(&out)),
    ];
    // SAFETY: (const T* a, const T* bt, float* d): 16x16 and 8x16 halves, 16x8 floats out, one
    // warp.
    unsafe { dev.launch(&kernel, LaunchConfig::linear(1, 32, 0), &args) }?;
    let got = download_f32(dev, &out)?;
    for m in 0..16 {
        for n in 0..8 {
            let want: f32 = (0..16).map(|k| a[m * 16 + k] * bt[n * 16 + k]).sum();
            if got[m * 8 + n] != want {
                return Err(wrong(
                    dev,
                    &kernel,
                    format!("D[{m}][{n}] = {}, expected {want}", got[m * 8 + n]),
                ));
            }
        }
    }
    Ok(())
}

/// `selftest_wgmma_f16` / `_bf16`: a 64 x 128 x 64 product of one warpgroup through four
/// `wgmma.m64n128k16` over the 128-byte-swizzled shared layout and the accumulator layout the
/// Hopper GEMM assumes (kernels/common/wgmma.cuh), the first with scale-d 0 over accumulators
/// set to 1e6; values exact in both half formats, so the f32 sums are exact. Needs a device
/// with wgmma ([`Device::has_wgmma`]).
pub fn wgmma<D: Device>(dev: &D, dtype: DType) -> Result<()> {
    let kernel = format!("selftest_wgmma_{}", dtype.name());
    if dtype == DType::F32 || !dev.has_wgmma() {
        return Err(Error::kernel(
            dev.name(),
            kernel,
            "needs f16 or bf16 on a device with wgmma (compute capability 9.0 or emulated)",
        ));
    }
    let a: Vec<f32> = (0..64 * 64)
        .map(|i| ((i * 13) % 17) as f32 / 8.0 - 1.0)
        .collect();
    let b: Vec<f32> = (0..128 * 64)
        .map(|i| ((i * 7) % 11) as f32 / 4.0 - 1.25)
        .collect();
    let ab = dev.upload(&dtype.encode(&a))?;
    let bb = dev.upload(&dtype.encode(&b))?;
    let out = dev.alloc(64 * 128 * 4)?;
    dev.fill(&out, 0xff)?;
    let args = [
        KernelArg::Ptr(dev.address(&ab)),
        KernelArg::Ptr(dev.address(&bb)),
        KernelArg::Ptr(dev.address(&out)),
    ];
    // SAFETY: (const T* a, const T* b, float* d): 64x64 and 128x64 halves, 64x128 floats out,
    // one warpgroup; shared: 16 bytes of offset, up to 1008 of padding, 24 KiB of operands.
    unsafe {
        dev.launch(
            &kernel,
            LaunchConfig::linear(1, 128, 16 + 1024 + 192 * 128),
            &args,
        )
    }?;
    let got = download_f32(dev, &out)?;
    for m in 0..64 {
        for n in 0..128 {
            let want: f32 = (0..64).map(|k| a[m * 64 + k] * b[n * 64 + k]).sum();
            if got[m * 128 + n] != want {
                return Err(wrong(
                    dev,
                    &kernel,
                    format!("D[{m}][{n}] = {}, expected {want}", got[m * 128 + n]),
                ));
            }
        }
    }
    Ok(())
}

/// `selftest_tma`: two tensor copies (TMA) of 64 x 128 boxes of a 100 x 72 matrix of 16-bit
/// values through one mbarrier (phases 0 and 1), read back through the 128-byte swizzle: the
/// first box straddles the last columns and rows (zeros beyond them), the second starts 8 rows
/// above the first row. Checks the tensor map the device makes ([`Device::tensor_map`]), the
/// copy's swizzle and zero fill, and the transaction count that completes each phase. Needs a
/// device with wgmma (and so TMA).
pub fn tma<D: Device>(dev: &D) -> Result<()> {
    const K: &str = "selftest_tma";
    const ROWS: usize = 100;
    const COLS: usize = 72;
    let value = |r: usize, c: usize| ((r * 131 + c * 7) % 32749 + 1) as u16;
    let m: Vec<u16> = (0..ROWS * COLS)
        .map(|i| value(i / COLS, i % COLS))
        .collect();
    let mb = dev.upload(bytemuck::cast_slice(&m))?;
    let map = dev.tensor_map(&TensorMapSpec {
        address: dev.address(&mb),
        rows: ROWS as u64,
        cols: COLS as u64,
        row_stride_bytes: 2 * COLS as u64,
        box_rows: 128,
    })?;
    let out = dev.alloc(2 * 128 * 64 * 2)?;
    dev.fill(&out, 0xff)?;
    let origins = [(64i32, 40i32), (0, -8)];
    let args = [
        KernelArg::TensorMap(map),
        KernelArg::I32(origins[0].0),
        KernelArg::I32(origins[0].1),
        KernelArg::I32(origins[1].0),
        KernelArg::I32(origins[1].1),
        KernelArg::Ptr(dev.address(&out)),
    ];
    // SAFETY: (TmaMap, 4 x int32, uint16_t* out): 2 x 128 x 64 values out, one warpgroup;
    // shared: up to 1024 bytes of alignment, a 16 KiB box, one mbarrier.
    unsafe { dev.launch(K, LaunchConfig::linear(1, 128, 1024 + 128 * 128 + 8), &args) }?;
    dev.synchronize()?;
    let mut bytes = vec![0u8; dev.len(&out)];
    dev.download(&out, &mut bytes)?;
    let got: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    for (round, &(c0, c1)) in origins.iter().enumerate() {
        for r in 0..128 {
            for c in 0..64 {
                let (gr, gc) = (c1 as i64 + r as i64, c0 as i64 + c as i64);
                let inside = (0..ROWS as i64).contains(&gr) && (0..COLS as i64).contains(&gc);
                let want = if inside {
                    value(gr as usize, gc as usize)
                } else {
                    0
                };
                let at = (round * 128 + r) * 64 + c;
                if got[at] != want {
                    return Err(wrong(
                        dev,
                        K,
                        format!(
                            "box {round} at (column {c0}, row {c1}), element ({r}, {c}): {}, \
                             expected {want}",
                            got[at]
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// f32 -> half -> f32 through the cast kernels, within each format's rounding.
pub fn cast_roundtrip<D: Device>(dev: &D) -> Result<()> {
    let n = 1000;
    let x: Vec<f32> = (0..n).map(|i| (i as f32 - 500.0) * 0.37).collect();
    let xb = upload_f32(dev, &x)?;
    for (half, tol) in [(DType::F16, 1e-3f32), (DType::BF16, 8e-3)] {
        let h = dev.alloc(n * 2)?;
        let y = dev.alloc(n * 4)?;
        dev.fill(&y, 0xff)?;
        elementwise::cast(dev, &xb, DType::F32, &h, half, n)?;
        elementwise::cast(dev, &h, half, &y, DType::F32, n)?;
        let got = download_f32(dev, &y)?;
        for (a, b) in x.iter().zip(&got) {
            if (a - b).abs() > tol * a.abs().max(1.0) {
                return Err(wrong(
                    dev,
                    &format!("cast_f32_{half}"),
                    format!("{a} came back as {b}"),
                ));
            }
        }
    }
    Ok(())
}

/// `selftest_ldmatrix`: one warp, `ldmatrix.x4` (plain and `.trans`) with each lane pointing
/// at a different row;
/// every register of every lane against the PTX ISA's layout (lane l, register i: matrix i's
/// row l / 4, halves 2 (l % 4) and 2 (l % 4) + 1; matrix i's row r comes from lane 8 i + r).
pub fn ldmatrix<D: Device>(dev: &D) -> Result<()> {
    const K: &str = "selftest_ldmatrix";
    // Row q, half h holds 1000 q + h: every value names its place.
    let halves: Vec<u16> = (0..32u16)
        .flat_map(|q| (0..8u16).map(move |h| 1000 + 16 * q + h))
        .collect();
    let src = dev.upload(bytemuck::cast_slice(&halves))?;
    let out = dev.alloc(2 * 32 * 4 * 4)?;
    dev.fill(&out, 0xff)?;
    let args = [
        KernelArg::Ptr(dev.address(&src)),
        KernelArg::Ptr(dev.address(&out)),
    ];
    // SAFETY: (const uint32_t* src, uint32_t* out): 128 and 256 words, one warp.
    unsafe { dev.launch(K, LaunchConfig::linear(1, 32, 0), &args) }?;
    dev.synchronize()?;
    let mut bytes = vec![0u8; 2 * 32 * 4 * 4];
    dev.download(&out, &mut bytes)?;
    let got: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes);
    // The shared row that lane `l` addressed, and element `c` of it.
    let at = |l: usize, c: usize| halves[((l * 7) % 32) * 8 + c] as u32;
    for lane in 0..32usize {
        for i in 0..4usize {
            let (l, t) = (i * 8 + lane / 4, lane % 4);
            let plain = at(l, 2 * t) | at(l, 2 * t + 1) << 16;
            // Transposed: rows 2t and 2t + 1 of matrix i, column lane / 4.
            let trans = at(i * 8 + 2 * t, lane / 4) | at(i * 8 + 2 * t + 1, lane / 4) << 16;
            for (what, g, want) in [
                ("", got[lane * 4 + i], plain),
                (".trans ", got[128 + lane * 4 + i], trans),
            ] {
                if g != want {
                    return Err(wrong(
                        dev,
                        K,
                        format!("{what}lane {lane} register {i}: {g:#010x}, expected {want:#010x}"),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// `selftest_mbarrier`: two warps hand a buffer back and forth over two mbarriers for 6 rounds
/// (the protocol of the warp-specialised Hopper GEMM); every round must arrive intact.
pub fn mbarrier<D: Device>(dev: &D) -> Result<()> {
    const K: &str = "selftest_mbarrier";
    let out = dev.alloc(6 * 32 * 4)?;
    dev.fill(&out, 0xff)?;
    // SAFETY: (float* out): 192 floats, two warps.
    unsafe {
        dev.launch(
            K,
            LaunchConfig::linear(1, 64, 0),
            &[KernelArg::Ptr(dev.address(&out))],
        )
    }?;
    let got = download_f32(dev, &out)?;
    for r in 0..6 {
        for lane in 0..32 {
            let want = (100 * r + lane) as f32;
            if got[32 * r + lane] != want {
                return Err(wrong(
                    dev,
                    K,
                    format!(
                        "round {r}, lane {lane}: {}, expected {want}",
                        got[32 * r + lane]
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `selftest_cp_async`: copies land by the wait that names their group, and a zero-size source
/// zero-fills. `held`: the device holds every copy until a wait lets it land (the emulated
/// device without a shuffle seed), so a copy must not be seen before its wait.
pub fn cp_async<D: Device>(dev: &D, held: bool) -> Result<()> {
    const K: &str = "selftest_cp_async";
    let src: Vec<f32> = (0..256).map(|i| 1.0 + i as f32).collect();
    let sb = upload_f32(dev, &src)?;
    let out = dev.alloc(640 * 4)?;
    dev.fill(&out, 0xff)?;
    let args = [
        KernelArg::Ptr(dev.address(&sb)),
        KernelArg::Ptr(dev.address(&out)),
    ];
    // SAFETY: (const float* src, float* out): 256 and 640 floats, one warp.
    unsafe { dev.launch(K, LaunchConfig::linear(1, 32, 0), &args) }?;
    let got = download_f32(dev, &out)?;
    let check = |at: usize, want: f32, what: &str| -> Result<()> {
        if got[at] != want {
            return Err(wrong(
                dev,
                K,
                format!("{what}: out[{at}] = {}, expected {want}", got[at]),
            ));
        }
        Ok(())
    };
    for i in 0..128 {
        check(i, src[i], "group 0 after wait_group 2")?;
        check(256 + i, src[i], "group 0 after wait_group 0")?;
        check(384 + i, src[128 + i], "group 1 after wait_group 0")?;
        check(512 + i, 0.0, "zero-filled group 2")?;
        if held {
            check(128 + i, -1.0, "group 1 before any wait (copies held)")?;
        }
    }
    Ok(())
}

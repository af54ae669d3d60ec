//! The all-backends op test: every case of the op table (`op_cases`: op x shape x dtype, with
//! its tolerance) on the emulated GPU against the `cpu` backend, by relative L2 error (f32 <=
//! 1e-5, f16/bf16 <= 1e-2), outputs poisoned (NaN) before every launch so an unwritten element
//! shows. Inputs are rounded to the storage dtype first, so both sides see the same values.
//! Cases that must be refused are checked to be refused by both, naming the problem.
//!
//! A real GPU runs the same table in `every_op_on_a_real_gpu` (ignored where there is none;
//! `tools/gpu-check.sh` runs it with `--ignored`).

mod common;
mod op_cases;

use std::sync::Arc;

use apparate::backend::cuda::{CudaConfig, CudaDevice};
use apparate::backend::device::Device;
use apparate::backend::emu::{EmuConfig, EmuDevice};
use apparate::backend::gpu::{
    AttentionKernel, ConvKernel, FlashTile, GemmKernel, GemmKernel as G, GpuBackend, PipeTile,
    RowKernel,
};
use apparate::backend::{Backend, CpuBackend, RampInput, RampWeights};
use apparate::tensor::DType;
use common::cpu;
use op_cases::{Expect, Op, OpCase, Output};

/// Runs every case that `pick` selects on `dev`, in each case's dtype, against the CPU.
fn parity_on<D: Device>(label: &str, dev: Arc<D>, pick: impl Fn(&Op) -> bool) {
    parity_with(label, dev, pick, |_| true);
}

/// [`parity_on`] with only the GEMM kernels `gemms` keeps (on a GPU, the Hopper GEMM runs in
/// its own process: a fault in a kernel new to the hardware must not hide the other results).
fn parity_with<D: Device>(
    label: &str,
    dev: Arc<D>,
    pick: impl Fn(&Op) -> bool,
    gemms: impl Fn(GemmKernel) -> bool,
) {
    let c = cpu();
    let mut ran = 0;
    for case in op_cases::cases().iter().filter(|k| pick(&k.op)) {
        // Ops that run a GEMM, in half precision: both kernels (the simple one is the
        // pipelined one's reference and fallback).
        // The same for attention.
        use {AttentionKernel as A, ConvKernel as C, GemmKernel as G, RowKernel as R};
        let half = case.dtype != DType::F32;
        let variants: &[(G, A, R, C)] = match case.op {
            Op::Linear { .. } if half => &[
                (G::Pipelined, A::Flash, R::Block, C::Implicit),
                (G::PipelinedSplitK, A::Flash, R::Block, C::Implicit),
                (G::Wgmma, A::Flash, R::Block, C::Implicit),
                (G::WgmmaTma, A::Flash, R::Block, C::Implicit),
                (G::Simple, A::Flash, R::Block, C::Implicit),
            ],
            // Convolutions: every GEMM after im2col (both im2col kernels), and the implicit
            // GEMM over the pipelined one.
            Op::Conv2d { .. } if half => &[
                (G::Pipelined, A::Flash, R::Block, C::Im2col),
                (G::PipelinedSplitK, A::Flash, R::Warp, C::Im2col),
                (G::Wgmma, A::Flash, R::Block, C::Im2col),
                (G::WgmmaTma, A::Flash, R::Block, C::Im2col),
                (G::Simple, A::Flash, R::Warp, C::Im2col),
                (G::Pipelined, A::Flash, R::Block, C::Implicit),
                (G::PipelinedSplitK, A::Flash, R::Block, C::Implicit),
            ],
            Op::Attention { .. } if half => &[
                (G::Pipelined, A::Flash, R::Block, C::Implicit),
                (G::Pipelined, A::Simple, R::Block, C::Implicit),
            ],
            // The row and memory-bound kernels: both, in every dtype (the fast im2col of a
            // dense convolution in f32 too).
            Op::AddLayerNorm { .. }
            | Op::Softmax { .. }
            | Op::L2Normalize { .. }
            | Op::Embed { .. }
            | Op::Pool { .. }
            | Op::RampExit { .. }
            | Op::Conv2d { .. } => &[
                (G::Pipelined, A::Flash, R::Block, C::Implicit),
                (G::Pipelined, A::Flash, R::Warp, C::Implicit),
            ],
            _ => &[(G::Pipelined, A::Flash, R::Block, C::Implicit)],
        };
        for &(gemm, attention, rows, conv) in variants.iter().filter(|v| gemms(v.0)) {
            let be = GpuBackend::shared(dev.clone(), case.dtype)
                .with_poisoned_outputs()
                .with_gemm(gemm)
                .with_attention(attention)
                .with_rows(rows)
                .with_conv(conv);
            let label = format!(
                "{label}/{}/{gemm:?}/{attention:?}/{rows:?}/{conv:?}",
                case.dtype
            );
            check_case(&label, &be, &c, case);
        }
        ran += 1;
    }
    assert!(ran > 0, "no case selected");
}

fn emu() -> Arc<EmuDevice> {
    Arc::new(EmuDevice::new(EmuConfig::default()).unwrap())
}

fn check_case<B: Backend>(label: &str, be: &B, c: &CpuBackend, case: &OpCase) {
    let what = format!("{label} {}", case.name);
    let mut pc = op_cases::prepare(c, op_cases::host_inputs(case)).unwrap();
    let mut pg = op_cases::prepare(be, op_cases::host_inputs(case)).unwrap();
    if let Op::RampExit { .. } = case.op {
        // A threshold between two of the CPU's uncertainties, so some inputs exit and some
        // do not.
        pc.set_threshold(c, 2.0).unwrap();
        let Output::Decisions(probe) = op_cases::run(c, case, &pc, true).unwrap() else {
            unreachable!("a ramp decides")
        };
        let t = op_cases::threshold_between(&probe, case.dtype);
        pc.set_threshold(c, t).unwrap();
        pg.set_threshold(be, t).unwrap();
    }
    match case.expect {
        Expect::Error(text) => {
            for (side, r) in [
                ("backend", op_cases::run(be, case, &pg, true)),
                ("cpu", op_cases::run(c, case, &pc, true)),
            ] {
                let e = r
                    .err()
                    .unwrap_or_else(|| panic!("{what}: the {side} accepted it"))
                    .to_string();
                assert!(e.contains(text), "{what}: {side} said `{e}`");
            }
        }
        Expect::Values => {
            let want = op_cases::run(c, case, &pc, true).unwrap();
            let got = op_cases::run(be, case, &pg, true).unwrap_or_else(|e| panic!("{what}: {e}"));
            compare(&what, case, got, want);
            if let Op::RampExit { .. } = case.op {
                check_async_matches(&what, be, case, &pg);
            }
        }
    }
}

fn compare(what: &str, case: &OpCase, got: Output, want: Output) {
    match (got, want) {
        (Output::Values(got_shape, got), Output::Values(want_shape, want)) => {
            assert_eq!(got_shape, want_shape, "{what}: output shape");
            if let Op::Conv2d {
                x, cout, geo, k, ..
            } = &case.op
                && geo.padding_extra == [1, 1]
                && *k == 3
            {
                // TensorFlow "SAME": ceil(10 / 2) = 5 rows and columns.
                assert_eq!(got_shape, [x[0], 5, 5, *cout], "{what}: SAME-padded shape");
            }
            assert_eq!(got.len(), want.len(), "{what}: output length");
            assert!(
                got.iter().all(|v| v.is_finite()),
                "{what}: non-finite output (unwritten element?)"
            );
            let e = op_cases::rel_l2(&got, &want);
            assert!(
                e <= case.tolerance,
                "{what}: relative L2 error {e:.3e} > {:.0e}",
                case.tolerance
            );
        }
        (Output::Decisions(got), Output::Decisions(want)) => {
            assert_eq!(got.len(), want.len(), "{what}");
            // The threshold sits between the two lowest uncertainties: a batch of several has
            // inputs on both sides, so the exit test is compared both ways.
            if want.len() > 1 {
                assert!(
                    want.iter().any(|d| d.exit) && want.iter().any(|d| !d.exit),
                    "{what}: the threshold did not split the batch"
                );
            }
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.class, w.class, "{what}: class");
                assert!(
                    (g.uncertainty - w.uncertainty).abs() as f64 <= 1e-4,
                    "{what}: uncertainty {} vs {}",
                    g.uncertainty,
                    w.uncertainty
                );
                assert_eq!(g.exit, w.exit, "{what}: exit (u {})", w.uncertainty);
            }
        }
        (g, w) => panic!("{what}: {g:?} against {w:?}"),
    }
}

/// The asynchronous path (pinned copy + event on cuda) brings back the same decisions.
fn check_async_matches<B: Backend>(what: &str, be: &B, case: &OpCase, p: &op_cases::Prepared<B>) {
    let Op::RampExit { pooling, dense, .. } = case.op else {
        return;
    };
    let t = &p.tensors;
    let input = RampInput {
        x: &t[0],
        positions: p.host.shape.seq,
        lengths: &p.host.shape.lengths,
        pooling,
    };
    let head = RampWeights {
        dense: dense.then_some((&t[1], &t[2])),
        out: (&t[3], &t[4]),
    };
    let threshold = p.threshold.as_ref().unwrap();
    let now = be.ramp_exit(&input, &head, threshold).unwrap();
    let later = be
        .ramp_exit_async(&input, &head, threshold)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(later, now, "{what}: async vs sync");
}

#[test]
fn linear_all_dtypes_and_shapes() {
    let dev = emu();
    parity_on("emu", dev.clone(), |op| matches!(op, Op::Linear { .. }));
    no_bank_conflicts(&dev, &["gemm_pipe_big", "gemm_pipe_small", "gemm_wgmma"]);
}

/// Every kernel that `dev` saw issue ldmatrix or cp.async did so without a shared-memory bank
/// conflict (the emulated device's accounting: kernels/emu/emu.h), and a kernel whose name
/// starts with each of `expect` was among them (so the check cannot pass on nothing).
fn no_bank_conflicts(dev: &EmuDevice, expect: &[&str]) {
    let traffic = dev.bank_traffic();
    for (name, t) in &traffic {
        let per_mma = t.wavefronts_per_mma().unwrap_or(0.0);
        eprintln!("{name}: {t:?}, {per_mma:.3} wavefronts per mma");
    }
    for prefix in expect {
        assert!(
            traffic.keys().any(|k| k.starts_with(prefix)),
            "no kernel `{prefix}*` issued ldmatrix or cp.async: {:?}",
            traffic.keys().collect::<Vec<_>>()
        );
    }
    let conflicted: Vec<String> = traffic
        .iter()
        .flat_map(|(name, t)| {
            [("ldmatrix", t.ldmatrix), ("cp.async", t.cp_async)]
                .into_iter()
                .filter(|(_, w)| w.actual > w.ideal)
                .map(move |(what, w)| {
                    format!(
                        "{name} {what}: {} wavefronts where {} would do (+{:.0}%)",
                        w.actual,
                        w.ideal,
                        100.0 * w.excess()
                    )
                })
        })
        .collect();
    assert!(
        conflicted.is_empty(),
        "bank conflicts:\n{}",
        conflicted.join("\n")
    );
}

/// The large GEMM tiles (pipelined 128 x 128 in both warp layouts, wgmma 128 x 256) at the
/// table's shapes: with "2 tiles fill the GPU", every linear and dense convolution case of two
/// or more large tiles takes them (convolutions both implicit and after im2col), and the
/// others split K among fewer blocks.
#[test]
fn gemm_large_tiles_at_a_low_fill() {
    let dev = emu();
    large_tiles_on(
        "emu",
        dev.clone(),
        &[
            G::Pipelined,
            G::PipelinedSplitK,
            G::Wgmma,
            G::WgmmaWs,
            G::WgmmaTma,
        ],
    );
    no_bank_conflicts(
        &dev,
        &[
            "gemm_pipe_big_",
            "gemm_pipe_big4_",
            "gemm_wgmma",
            "conv_pipe_big_",
            "conv_pipe_big4_",
        ],
    );
}

fn large_tiles_on<D: Device>(label: &str, dev: Arc<D>, gemms: &[GemmKernel]) {
    let c = cpu();
    let mut ran = 0;
    for case in op_cases::cases()
        .iter()
        .filter(|k| matches!(k.op, Op::Linear { .. } | Op::Conv2d { .. }) && k.dtype != DType::F32)
    {
        for &gemm in gemms {
            // The pipelined kernels' big tile in both warp layouts (the Hopper ones have one).
            let tiles: &[PipeTile] = if is_wgmma(gemm) {
                &[PipeTile::Warp64x32]
            } else {
                &[PipeTile::Warp64x32, PipeTile::Warp64x64]
            };
            for conv in [ConvKernel::Implicit, ConvKernel::Im2col] {
                if conv == ConvKernel::Im2col && !matches!(case.op, Op::Conv2d { .. }) {
                    continue;
                }
                for &tile in tiles {
                    let be = GpuBackend::shared(dev.clone(), case.dtype)
                        .with_poisoned_outputs()
                        .with_gemm(gemm)
                        .with_conv(conv)
                        .with_pipe_tile(tile)
                        .with_gemm_fill_tiles(2);
                    let what = format!("{label}/{}/{gemm:?}/{conv:?}/{tile:?}/fill 2", case.dtype);
                    check_case(&what, &be, &c, case);
                    ran += 1;
                }
            }
        }
    }
    assert!(ran > 0, "no case selected");
}

#[test]
fn layernorm_all_dtypes_and_shapes() {
    parity_on("emu", emu(), |op| matches!(op, Op::AddLayerNorm { .. }));
}

#[test]
fn attention_all_dtypes_and_shapes() {
    parity_on("emu", emu(), |op| matches!(op, Op::Attention { .. }));
}

/// The encoders' flash attention with each of its blocks forced at every shape (the default
/// is the narrow one; `auto` takes the wide one only where its blocks fill the GPU, which the
/// cases here do not; at head size 128 `Wide` runs the narrow block).
#[test]
fn flash_attention_narrow_and_wide_blocks() {
    let dev = emu();
    flash_tiles_on("emu", dev.clone());
    no_bank_conflicts(&dev, &["attention_flash_d", "attention_flash_wide"]);
}

fn flash_tiles_on<D: Device>(label: &str, dev: Arc<D>) {
    let c = cpu();
    let mut ran = 0;
    for case in op_cases::cases()
        .iter()
        .filter(|k| matches!(k.op, Op::Attention { .. }) && k.dtype != DType::F32)
    {
        // `Auto` at a fill of 2 multiprocessors: the wide block wherever it makes 4 blocks.
        for tile in [FlashTile::Narrow, FlashTile::Wide, FlashTile::Auto] {
            let be = GpuBackend::shared(dev.clone(), case.dtype)
                .with_poisoned_outputs()
                .with_attention(AttentionKernel::Flash)
                .with_flash_tile(tile)
                .with_gemm_fill_tiles(2);
            check_case(
                &format!("{label}/{}/flash {tile:?}", case.dtype),
                &be,
                &c,
                case,
            );
            ran += 1;
        }
    }
    assert!(ran > 0, "no case selected");
}

#[test]
fn embedding_all_dtypes_and_shapes() {
    parity_on("emu", emu(), |op| matches!(op, Op::Embed { .. }));
}

#[test]
fn pooling_normalize_softmax_all_dtypes_and_shapes() {
    parity_on("emu", emu(), |op| {
        matches!(
            op,
            Op::Pool { .. } | Op::L2Normalize { .. } | Op::Softmax { .. }
        )
    });
}

#[test]
fn conv_and_pooling_all_dtypes_and_shapes() {
    parity_on("emu", emu(), |op| {
        matches!(
            op,
            Op::Conv2d { .. } | Op::Pool2d { .. } | Op::GlobalAvgPool { .. }
        )
    });
}

#[test]
fn fused_ramp_exit_all_dtypes_and_shapes() {
    parity_on("emu", emu(), |op| matches!(op, Op::RampExit { .. }));
}

/// Every case has a distinct name, so a failure or a timing row says which one it is.
#[test]
fn the_table_names_each_case_once() {
    let cases = op_cases::cases();
    let mut names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    names.sort();
    let before = names.len();
    names.dedup();
    assert_eq!(names.len(), before, "duplicate case names");
}

/// Every case of the table on a real GPU, in every storage dtype, against the CPU backend; then
/// the large GEMM tiles at the table's shapes. All but the Hopper GEMM (next test).
#[test]
#[ignore = "needs a CUDA GPU: run by tools/gpu-check.sh"]
fn every_op_on_a_real_gpu() {
    let dev = CudaDevice::new(CudaConfig::default())
        .unwrap_or_else(|e| panic!("needs a CUDA GPU (tools/gpu-check.sh runs this): {e}"));
    let dev = Arc::new(dev);
    parity_with("cuda", dev.clone(), |_| true, |g| !is_wgmma(g));
    large_tiles_on("cuda", dev.clone(), &[G::Pipelined, G::PipelinedSplitK]);
    flash_tiles_on("cuda", dev);
}

/// The Hopper GEMM on a real GPU (compute capability 9.0; skipped with a message elsewhere):
/// every linear and convolution case, then its large tiles. Its own test, so the GPU check runs
/// it in its own process.
#[test]
#[ignore = "needs a CUDA GPU: run by tools/gpu-check.sh"]
fn wgmma_gemm_on_a_real_gpu() {
    hopper_gemms_on_a_real_gpu(&[G::Wgmma, G::WgmmaWs]);
}

/// The Hopper GEMM's TMA form on a real GPU, as the test above; its own test (and process in
/// the GPU check), since it is the first kernel there to use tensor maps and tensor copies.
#[test]
#[ignore = "needs a CUDA GPU: run by tools/gpu-check.sh"]
fn wgmma_tma_gemm_on_a_real_gpu() {
    hopper_gemms_on_a_real_gpu(&[G::WgmmaTma]);
}

fn hopper_gemms_on_a_real_gpu(kernels: &[GemmKernel]) {
    let dev = CudaDevice::new(CudaConfig::default())
        .unwrap_or_else(|e| panic!("needs a CUDA GPU (tools/gpu-check.sh runs this): {e}"));
    if !dev.has_wgmma() {
        eprintln!("skipped: {} has no wgmma (sm_90a only)", dev.describe());
        return;
    }
    let dev = Arc::new(dev);
    let gemms = |op: &Op| matches!(op, Op::Linear { .. } | Op::Conv2d { .. });
    parity_with("cuda", dev.clone(), gemms, |g| kernels.contains(&g));
    large_tiles_on("cuda", dev, kernels);
}

fn is_wgmma(g: GemmKernel) -> bool {
    matches!(g, G::Wgmma | G::WgmmaWs | G::WgmmaTma)
}

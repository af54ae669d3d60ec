//! An inverted residual block (1x1 expansion, depthwise convolution, 1x1 projection) fused,
//! over NHWC tensors.
//!
//! Why: unfused, the expanded activations (six times the block's input channels, at the
//! input's resolution) are written to memory by the expansion and read back by the depthwise
//! convolution, whose output is written and read again by the projection. In EfficientNet-Lite0's
//! first stages those tensors are several MB per image (112 x 112 x 96 floats is 4.8 MB), so
//! at batch 8 they run through DRAM at a fraction of the GEMMs' speed. Fused, a task walks its
//! image's output rows in bands: it expands just the input rows the band's depthwise windows
//! need (keeping the rows the next band shares), runs the depthwise convolution on them, and
//! projects the band straight into the output; the expanded and depthwise rows stay in L2.
//!
//! Each image is cut into a few segments of output rows only when there are fewer images than
//! twice the threads; a segment re-expands the input rows it shares with the one above it.

use super::buffers;
use super::conv::Conv;
use super::depthwise;
use super::linear;
use super::sgemm::{self, PackedB};
use super::team::{Exec, OutPtr};
use crate::backend::op_check::ConvDims;
use crate::backend::{Activation, Conv2d};

/// About how many bytes of expanded rows a band works on: with the band's depthwise output,
/// well inside a 1 MiB L2 (the expansion's and projection's weights and the input rows stream
/// through beside them).
const BAND_BYTES: usize = 256 << 10;

/// A 1x1 convolution of the block: the weight packed for the GEMM, bias, activation.
#[derive(Clone, Copy)]
pub(crate) struct Pointwise<'a> {
    pub w: &'a PackedB,
    pub b: Option<&'a [f32]>,
    pub act: Activation,
}

/// The block's operands; `dw` holds the depthwise step (its `x` and `residual` unused) and
/// `dims` its sizes over the (expanded) input.
pub(crate) struct Block<'a> {
    pub x: &'a [f32],
    pub expand: Option<Pointwise<'a>>,
    pub dw: Conv<'a>,
    pub project: Pointwise<'a>,
    pub residual: Option<&'a [f32]>,
}

/// The output `[n, oh, ow, cout]`.
pub(crate) fn run(b: &Block<'_>, par: Exec<'_>) -> Vec<f32> {
    let [n, _, _, _, _, _, _, oh, ow] = b.dw.dims.to_array();
    let cout = b.project.w.n();
    let taps = depthwise::taps(&b.dw);
    let (segs, seg_rows) = segments(n, oh, par.threads());
    // Every element is written by one task's projection.
    let mut out = buffers::take(n * oh * ow * cout);
    let dst = OutPtr(out.as_mut_ptr());
    par.for_each(n * segs, &|t| {
        let (img, s) = (t / segs, t % segs);
        let rows = s * seg_rows..((s + 1) * seg_rows).min(oh);
        // SAFETY: output rows `rows` of image `img` belong to task `t` alone and lie inside
        // `out` (`n * oh * ow * cout` values).
        let o = unsafe {
            std::slice::from_raw_parts_mut(
                dst.get().add((img * oh + rows.start) * ow * cout),
                rows.len() * ow * cout,
            )
        };
        segment(b, &taps, img, rows, o);
    });
    out
}

/// Output rows `rows` of image `img` into `o`, band by band.
fn segment(b: &Block<'_>, taps: &[f32], img: usize, rows: std::ops::Range<usize>, o: &mut [f32]) {
    let [_, h, w, ce, _, kh, _, oh, ow] = b.dw.dims.to_array();
    let ([sy, _], [py, px]) = (b.dw.p.stride, b.dw.p.padding);
    let cin = b.expand.map_or(ce, |e| e.w.k());
    let cout = b.project.w.n();
    // Output rows per band: its input rows (`(band - 1) * sy + kh`) about BAND_BYTES.
    let row_bytes = w * ce * std::mem::size_of::<f32>();
    let band = ((BAND_BYTES / row_bytes).saturating_sub(kh) / sy + 1).clamp(1, rows.len());
    let rows_cap = ((band - 1) * sy + kh).min(h);
    // The input rows the output rows `y0..y1` read (clamped to the image).
    let needs = |y0: usize, y1: usize| {
        let lo = (y0 * sy).saturating_sub(py).min(h);
        let hi = ((y1 - 1) * sy + kh).saturating_sub(py).clamp(lo, h);
        lo..hi
    };
    // Expanded input rows `have` of the image, held at the top of `e`.
    let mut e = match b.expand {
        Some(_) => buffers::take(rows_cap * w * ce),
        None => Vec::new(),
    };
    let mut have = 0..0;
    let mut d = buffers::take(band * ow * ce);
    let x = &b.x[img * h * w * cin..][..h * w * cin];
    for y0 in rows.clone().step_by(band) {
        let y1 = (y0 + band).min(rows.end);
        let need = needs(y0, y1);
        let src: &[f32] = match b.expand {
            Some(ex) => {
                // Keep the rows this band shares with the last one; expand the rest.
                if have.start <= need.start && need.start < have.end {
                    let keep = (need.start - have.start) * w * ce..(have.end - have.start) * w * ce;
                    e.copy_within(keep, 0);
                    have.start = need.start;
                } else {
                    have = need.start..need.start;
                }
                if need.end > have.end {
                    let m = (need.end - have.end) * w;
                    let a = sgemm::Rows {
                        data: &x[have.end * w * cin..][..m * cin],
                        ld: cin,
                    };
                    let at = (have.end - have.start) * w * ce;
                    let epi = linear::epilogue(ce, ex.b, None, ex.act);
                    sgemm::gemm_f32_a(Exec::Inline, a, m, ex.w, &mut e[at..], ce, &epi);
                    have.end = need.end;
                }
                &e[..need.len() * w * ce]
            }
            None => &x[need.start * w * ce..need.end * w * ce],
        };
        // The depthwise convolution of rows `y0..y1` as that of a `need.len()`-row image whose
        // top padding is what is left of the real one above `need.start`.
        let dims = ConvDims {
            n: 1,
            h: need.len(),
            oh: y1 - y0,
            ..b.dw.dims
        };
        let p = Conv2d {
            // (Saturating: a band whose windows lie wholly in the bottom padding has no rows,
            // and reads none.)
            padding: [(py + need.start).saturating_sub(y0 * sy), px],
            ..*b.dw.p
        };
        let dw = Conv {
            x: src,
            residual: None,
            dims,
            p: &p,
            ..b.dw
        };
        let m = (y1 - y0) * ow;
        depthwise::image_into(&dw, taps, 0, &mut d[..m * ce]);
        // The projection, with the residual, into the output rows.
        let residual = b
            .residual
            .map(|r| &r[((img * oh + y0) * ow) * cout..][..m * cout]);
        let epi = linear::epilogue(cout, b.project.b, residual, b.project.act);
        let out = &mut o[(y0 - rows.start) * ow * cout..][..m * cout];
        let a = sgemm::Rows {
            data: &d[..m * ce],
            ld: ce,
        };
        sgemm::gemm_f32_a(Exec::Inline, a, m, b.project.w, out, cout, &epi);
    }
    buffers::give(e);
    buffers::give(d);
}

/// Whether fusing pays for a block with depthwise sizes `d` on `threads` threads: when the
/// batch's expanded activations would not stay in a core's L2 anyway (smaller ones are
/// cache-resident unfused), and the rows that neighbouring segments of an image both expand
/// (`kh - stride` at each cut) add at most a quarter to the expansion.
pub(crate) fn pays(d: &ConvDims, stride: usize, threads: usize) -> bool {
    if d.n == 0 || d.oh == 0 {
        return false;
    }
    let bytes = d.n * d.h * d.w * d.cin * std::mem::size_of::<f32>();
    let (segs, _) = segments(d.n, d.oh, threads);
    let shared = (segs - 1) * d.kh.saturating_sub(stride);
    bytes > 4 * BAND_BYTES && 4 * shared <= d.h
}

/// (segments per image, output rows per segment): enough tasks for every thread, and no more
/// (each segment re-expands the rows it shares with its neighbour).
fn segments(n: usize, oh: usize, threads: usize) -> (usize, usize) {
    let segs = (2 * threads).div_ceil(n.max(1)).clamp(1, oh.max(1));
    let seg_rows = oh.div_ceil(segs).max(1);
    (oh.div_ceil(seg_rows), seg_rows)
}

#[cfg(test)]
mod tests {
    use crate::backend::{
        Activation, Backend, Conv2d, ConvStep, CpuBackend, CpuConfig, SimdLevel,
        unfused_inverted_residual,
    };

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 199) as f32 / 100.0 - 1.0)
            .collect()
    }

    /// The fused block against its convolutions one by one, on blocks large enough to be fused
    /// (and one that is not): with and without the expansion and the residual, strides 1 and
    /// 2, 3x3 and 5x5, TF-style extra padding, odd sizes, one image (cut into segments) and
    /// several, every kernel level, 1 and 2 threads.
    #[test]
    fn fused_blocks_match_the_convolutions_one_by_one() {
        // (n, h, w, cin, expanded channels, cout, k, stride, padding, extra, expand, residual)
        let cases = [
            (1, 48, 48, 24, 128, 24, 3, 1, 1, 0, true, true),
            (3, 50, 47, 20, 144, 40, 5, 2, 2, 1, true, false),
            (2, 64, 64, 64, 64, 64, 3, 1, 1, 0, false, true),
            (1, 57, 53, 16, 96, 24, 3, 2, 0, 1, true, false),
            (2, 9, 9, 8, 48, 8, 3, 1, 1, 0, true, true),
        ];
        for (ci, &(n, h, w, cin, ce, cout, k, s, p, extra, expand, res)) in cases.iter().enumerate()
        {
            // Every level in f32, and the bf16 kernels on weights stored as bf16 where the CPU
            // has them (both sides round the same values the same way).
            let mut configs: Vec<_> = SimdLevel::available().iter().map(|&l| (l, false)).collect();
            if SimdLevel::best() == SimdLevel::Avx512
                && crate::backend::cpu::sgemm::pairs_supported()
            {
                configs.push((SimdLevel::Avx512, true));
            }
            for &(level, bf16) in &configs {
                for threads in [1, 2] {
                    let be = CpuBackend::new(CpuConfig {
                        threads: Some(threads),
                        simd: Some(level),
                        bf16: Some(bf16),
                        ..Default::default()
                    })
                    .unwrap();
                    let up = |v: Vec<f32>, shape: &[usize]| be.upload(&v, shape).unwrap();
                    let x = up(values(n * h * w * cin, 1), &[n, h, w, cin]);
                    let mut we = up(values(ce * cin, 2), &[ce, 1, 1, cin]);
                    let be_ = up(values(ce, 3), &[ce]);
                    let wd = up(values(ce * k * k, 4), &[ce, k, k, 1]);
                    let bd = up(values(ce, 5), &[ce]);
                    let mut wp = up(values(cout * ce, 6), &[cout, 1, 1, ce]);
                    (we.bf16, wp.bf16) = (bf16, bf16);
                    let bp = up(values(cout, 7), &[cout]);
                    let pw = Conv2d {
                        stride: [1, 1],
                        padding: [0, 0],
                        groups: 1,
                        padding_extra: [0, 0],
                    };
                    let e = expand.then_some(ConvStep {
                        w: &we,
                        b: Some(&be_),
                        p: pw,
                        act: Activation::Relu6,
                    });
                    let d = ConvStep {
                        w: &wd,
                        b: Some(&bd),
                        p: Conv2d {
                            stride: [s, s],
                            padding: [p, p],
                            groups: ce,
                            padding_extra: [extra, extra],
                        },
                        act: Activation::Relu6,
                    };
                    let pr = ConvStep {
                        w: &wp,
                        b: Some(&bp),
                        p: pw,
                        act: if res {
                            Activation::Relu
                        } else {
                            Activation::None
                        },
                    };
                    let r = res.then_some(&x);
                    let fused = be.inverted_residual(&x, e, d, pr, r).unwrap();
                    let call =
                        crate::backend::op_check::inverted_residual(&be, &x, e, d, pr, r).unwrap();
                    // The first four are fused, the last is too small to be.
                    let fused_path = super::pays(&call.depthwise.1, s, threads);
                    assert_eq!(fused_path, ci < 4, "case {ci}, {threads} threads");
                    let plain = unfused_inverted_residual(&be, call).unwrap();
                    assert_eq!(be.shape(&fused), be.shape(&plain), "case {ci}");
                    let (f, u) = (be.download(&fused).unwrap(), be.download(&plain).unwrap());
                    for (i, (a, b)) in f.iter().zip(&u).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                            "case {ci} {level:?} bf16 {bf16} {threads} threads, element {i}: {a} vs {b}"
                        );
                    }
                    assert_eq!(wp.pairs.get().is_some(), bf16, "case {ci}");
                }
            }
        }
    }
}

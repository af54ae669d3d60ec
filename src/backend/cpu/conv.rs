//! 2-D convolution and pooling over NHWC tensors on the CPU.
//!
//! NHWC keeps a pixel's channels contiguous, so a kernel row of an output pixel's window
//! (`kw x cin` values) is one contiguous run of the input, and a dense convolution runs on the
//! GEMM micro-kernels with the input read in place ([`sgemm::conv`]: no im2col matrix, nothing
//! packed but the weight `[cout, kh * kw * cin]`, once); a 1x1 stride-1 convolution is a plain
//! product.
//! Depthwise convolutions have their own loops ([`super::depthwise`]); other grouped ones run
//! as a plain direct loop over output pixels.

use super::buffers;
use super::depthwise;
use super::team::Exec;

use super::linear;
use super::sgemm::{self, PackedB, SimdLevel};
use crate::backend::op_check::ConvDims;
use crate::backend::{Activation, Conv2d, Pool2d};

/// Calls `f(tap, pixel)` for every kernel tap (`i * kw + j`) of output pixel `[y, x]`'s window
/// that falls inside the `h x w` input, `pixel` being the input pixel's index in its image.
#[inline(always)]
fn for_each_tap(
    [y, x]: [usize; 2],
    [kh, kw]: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    [h, w]: [usize; 2],
    mut f: impl FnMut(usize, usize),
) {
    for i in 0..kh {
        let Some(iy) = (y * stride[0] + i)
            .checked_sub(padding[0])
            .filter(|&v| v < h)
        else {
            continue;
        };
        for j in 0..kw {
            let Some(ix) = (x * stride[1] + j)
                .checked_sub(padding[1])
                .filter(|&v| v < w)
            else {
                continue;
            };
            f(i * kw + j, iy * w + ix);
        }
    }
}

/// A dense convolution through [`sgemm::conv`]: the input zero-padded once (when the windows
/// need it), then read in place.
#[allow(clippy::too_many_arguments)]
fn direct(
    x: &[f32],
    dims: [usize; 9],
    p: &Conv2d,
    w: &PackedB,
    b: Option<&[f32]>,
    residual: Option<&[f32]>,
    act: Activation,
    par: Exec<'_>,
) -> Vec<f32> {
    let [n, h, wd, cin, cout, kh, kw, oh, ow] = dims;
    let (hp, wp) = ((oh - 1) * p.stride[0] + kh, (ow - 1) * p.stride[1] + kw);
    // bf16 kernels: the input rounded to pairs of channels (an even count), then padded and
    // read as `cin / 2` values a pixel (a pair's bits in each).
    let pairs;
    let (x, cin) = if w.pairs() {
        assert!(cin.is_multiple_of(2), "bf16 pairs of {cin} channels");
        pairs = sgemm::to_pairs(par, x, n * h * wd, cin, cin, cin / 2);
        (pairs.as_slice(), cin / 2)
    } else {
        (x, cin)
    };
    let padded;
    let (input, hp, wp) = if p.padding == [0, 0] && hp <= h && wp <= wd {
        (x, h, wd)
    } else {
        padded = pad(x, [n, h, wd, cin], [hp, wp], p.padding, par);
        (padded.as_slice(), hp, wp)
    };
    let windows = sgemm::Windows {
        x: input,
        n,
        hp,
        wp,
        cin,
        kh,
        kw,
        stride: p.stride,
        oh,
        ow,
    };
    // Every element is written by the first slice of k.
    let mut out = buffers::take(n * oh * ow * cout);
    let epi = linear::epilogue(cout, b, residual, act);
    sgemm::conv(par, &windows, w, &mut out, &epi);
    out
}

/// `x` `[n, h, w, c]` inside zeros: `[n, hp, wp, c]` with the image at `(top, left) = padding`.
/// Each padded row is written once: zeros where it is padding, the image's row in between
/// (not a zeroed buffer first and the image copied over it: two passes over the output).
fn pad(
    x: &[f32],
    [n, h, w, c]: [usize; 4],
    [hp, wp]: [usize; 2],
    padding: [usize; 2],
    par: Exec<'_>,
) -> Vec<f32> {
    // Every element is written below.
    let mut out = buffers::take(n * hp * wp * c);
    par.for_chunks(&mut out, wp * c, |r, row| {
        let (b, py) = (r / hp, r % hp);
        // Columns of the image inside the padded row (none when the padding alone is wider).
        let left = (padding[1] * c).min(row.len());
        let cols = w.min(wp.saturating_sub(padding[1]));
        let iy = py.checked_sub(padding[0]).filter(|&v| v < h);
        let (Some(iy), true) = (iy, cols > 0) else {
            row.fill(0.0);
            return;
        };
        let (head, rest) = row.split_at_mut(left);
        head.fill(0.0);
        let (body, tail) = rest.split_at_mut(cols * c);
        body.copy_from_slice(&x[((b * h + iy) * w) * c..][..cols * c]);
        tail.fill(0.0);
    });
    out
}

/// A convolution's operands as the loops below read them; `dims` = (n, h, w, cin, cout, kh,
/// kw, oh, ow) from `op_check::conv_dims`.
#[derive(Copy, Clone)]
pub(crate) struct Conv<'a> {
    pub x: &'a [f32],
    pub w: &'a [f32],
    pub b: Option<&'a [f32]>,
    pub residual: Option<&'a [f32]>,
    pub dims: ConvDims,
    pub p: &'a Conv2d,
    pub act: Activation,
    /// `w` packed for the GEMM path (dense convolutions), when the caller keeps one; else it
    /// is packed for this call at `level`.
    pub packed: Option<&'a PackedB>,
    /// `w` transposed for the depthwise loops (`depthwise::transpose`), when the caller keeps
    /// one; else it is transposed for this call.
    pub taps: Option<&'a [f32]>,
    pub level: SimdLevel,
}

impl Conv<'_> {
    /// The window taps of output pixel `[y, x]` inside the input (see [`for_each_tap`]).
    fn taps(&self, yx: [usize; 2], f: impl FnMut(usize, usize)) {
        let [_, h, w, _, _, kh, kw, _, _] = self.dims.to_array();
        for_each_tap(yx, [kh, kw], self.p.stride, self.p.padding, [h, w], f);
    }
}

/// `act(conv(x, w) + b + residual)`.
pub(crate) fn conv2d(c: Conv<'_>, par: Exec<'_>) -> Vec<f32> {
    let (x, w, b, residual, dims, p, act) = (c.x, c.w, c.b, c.residual, c.dims, c.p, c.act);
    let [n, _, _, cin, cout, kh, kw, oh, ow] = dims.to_array();
    let m = n * oh * ow;
    if p.groups == 1 {
        let k = kh * kw * cin;
        let own;
        let w = match c.packed {
            Some(packed) => packed,
            None => {
                own = PackedB::transposed(c.level, w, cout, k);
                &own
            }
        };
        if dims.is_pointwise(p) {
            return linear::linear(x, w, b, residual, m, act, par);
        }
        return direct(x, dims.to_array(), p, w, b, residual, act, par);
    }
    if cin == p.groups && cout == p.groups {
        return depthwise::depthwise(c, par);
    }
    grouped(c, par)
}

/// Direct grouped convolution (the reference loop; depthwise ones run in `depthwise.rs`).
fn grouped(c: Conv<'_>, par: Exec<'_>) -> Vec<f32> {
    let (x, w, b, residual, dims, p, act) = (c.x, c.w, c.b, c.residual, c.dims, c.p, c.act);
    let [n, h, wd, cin, cout, kh, kw, oh, ow] = dims.to_array();
    let (cg, og) = (cin / p.groups, cout / p.groups);
    let mut out = vec![0.0f32; n * oh * ow * cout];
    par.for_chunks(&mut out, cout, |r, o| {
        let (bn, y, xo) = (r / (oh * ow), (r / ow) % oh, r % ow);
        for (co, v) in o.iter_mut().enumerate() {
            let g = co / og;
            let mut acc = b.map_or(0.0, |b| b[co]);
            c.taps([y, xo], |tap, pixel| {
                let xs = &x[(bn * h * wd + pixel) * cin + g * cg..][..cg];
                let ws = &w[(co * kh * kw + tap) * cg..][..cg];
                acc += xs.iter().zip(ws).map(|(a, b)| a * b).sum::<f32>();
            });
            if let Some(res) = residual {
                acc += res[r * cout + co];
            }
            *v = apply(acc, act);
        }
    });
    out
}

pub(crate) fn apply(v: f32, act: Activation) -> f32 {
    match act {
        Activation::None => v,
        Activation::GeluErf => linear::gelu_erf(v),
        Activation::Tanh => v.tanh(),
        Activation::Relu => v.max(0.0),
        Activation::Relu6 => v.clamp(0.0, 6.0),
    }
}

/// Max / average pooling; `dims` = (n, h, w, c, oh, ow) from `op_check::pool2d_dims`.
pub(crate) fn pool2d(x: &[f32], dims: [usize; 6], p: &Pool2d, par: Exec<'_>) -> Vec<f32> {
    let [_, h, w, c, oh, ow] = dims;
    // Each pixel starts from its initial value below.
    let mut out = buffers::take(dims[0] * oh * ow * c);
    par.for_chunks(&mut out, c, |r, o| {
        let (bn, y, xo) = (r / (oh * ow), (r / ow) % oh, r % ow);
        let init = if p.max { f32::NEG_INFINITY } else { 0.0 };
        o.iter_mut().for_each(|v| *v = init);
        let mut count = 0usize;
        for_each_tap(
            [y, xo],
            [p.kernel[0], p.kernel[1]],
            p.stride,
            p.padding,
            [h, w],
            |_, pixel| {
                count += 1;
                let xs = &x[(bn * h * w + pixel) * c..][..c];
                for (v, a) in o.iter_mut().zip(xs) {
                    *v = if p.max { v.max(*a) } else { *v + a };
                }
            },
        );
        if !p.max {
            let inv = 1.0 / count.max(1) as f32;
            o.iter_mut().for_each(|v| *v *= inv);
        }
    });
    out
}

/// [n, h, w, c] -> [n, c].
pub(crate) fn global_avg_pool(x: &[f32], n: usize, hw: usize, c: usize, par: Exec<'_>) -> Vec<f32> {
    let mut out = vec![0.0f32; n * c];
    par.for_chunks(&mut out, c, |b, o| {
        for px in 0..hw {
            for (v, a) in o.iter_mut().zip(&x[(b * hw + px) * c..][..c]) {
                *v += a;
            }
        }
        let inv = 1.0 / hw.max(1) as f32;
        o.iter_mut().for_each(|v| *v *= inv);
    });
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::op_check::conv_dims;

    /// Deterministic values in [-1, 1) for the convolution tests.
    pub(crate) fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 97) as f32 / 48.0 - 1.0)
            .collect()
    }

    #[test]
    fn gemm_paths_match_the_direct_loop() {
        // The GEMM path of a dense convolution (input read in place), called directly and through
        // `conv2d`, at every kernel level, inline and on a team, against the plain loop of
        // `grouped`.
        let team = Exec::Team(crate::backend::cpu::team::test_team());
        for (h, w, cin, cout, k, s, p, extra) in [
            (7, 5, 3, 8, 3, 1, 1, 0),
            (9, 9, 4, 6, 5, 2, 2, 0),
            (4, 4, 2, 3, 1, 1, 0, 0),
            (9, 11, 16, 40, 3, 1, 1, 0),
            (10, 9, 24, 33, 3, 2, 1, 1),
            (7, 7, 16, 20, 1, 2, 0, 0),
            // Padding wider than the padded row needs (the window never reaches the image).
            (1, 1, 1, 2, 1, 5, 2, 0),
            (23, 21, 3, 16, 7, 2, 3, 0),
            (13, 6, 12, 70, 7, 2, 3, 0),
            // Deeper than one slice of k (256): cut inside a tap's channels, or within one tap.
            (6, 6, 37, 5, 3, 1, 1, 0),
            (8, 7, 30, 4, 3, 2, 1, 0),
            (4, 5, 300, 9, 3, 1, 1, 0),
        ] {
            let geo = Conv2d {
                stride: [s, s],
                padding: [p, p],
                groups: 1,
                padding_extra: [extra, extra],
            };
            let x = data(2 * h * w * cin, 1);
            let wt = data(cout * k * k * cin, 2);
            let b = data(cout, 3);
            let (xs, ws) = ([2, h, w, cin], [cout, k, k, cin]);
            let d = conv_dims(&xs, &ws, None, &geo, None).unwrap();
            let out_shape = [2, d.oh, d.ow, cout];
            let r = data(out_shape.iter().product(), 4);
            let dims = conv_dims(&xs, &ws, Some(&[cout]), &geo, Some(&out_shape)).unwrap();
            let c = Conv {
                x: &x,
                w: &wt,
                b: Some(&b),
                residual: Some(&r),
                dims,
                p: &geo,
                act: Activation::Relu,
                packed: None,
                taps: None,
                level: SimdLevel::best(),
            };
            let want = grouped(c, Exec::Inline);
            assert_eq!(grouped(c, team), want);
            let a = dims.to_array();
            for level in SimdLevel::available() {
                let packed = PackedB::transposed(level, &wt, cout, k * k * cin);
                for exec in [Exec::Inline, team] {
                    let act = Activation::Relu;
                    let got = [
                        direct(&x, a, &geo, &packed, Some(&b), Some(&r), act, exec),
                        conv2d(Conv { level, ..c }, exec),
                    ];
                    for (path, got) in got.iter().enumerate() {
                        for (g, w) in got.iter().zip(&want) {
                            let tol = 1e-4 * w.abs().max(1.0);
                            assert!((g - w).abs() < tol, "{level:?} path {path}: {g} vs {w}");
                        }
                    }
                }
            }
            // The bf16 kernels (an even channel count): the loop on the rounded operands.
            if cin % 2 == 1 || !sgemm::pairs_supported() {
                continue;
            }
            let round = |v: &[f32]| -> Vec<f32> {
                v.iter()
                    .map(|&v| half::bf16::from_f32(v).to_f32())
                    .collect()
            };
            let (xr, wr) = (round(&x), round(&wt));
            let want = grouped(
                Conv {
                    x: &xr,
                    w: &wr,
                    ..c
                },
                Exec::Inline,
            );
            let packed = PackedB::transposed_pairs(&wt, cout, k * k * cin);
            for exec in [Exec::Inline, team] {
                let act = Activation::Relu;
                let got = [
                    direct(&x, a, &geo, &packed, Some(&b), Some(&r), act, exec),
                    conv2d(
                        Conv {
                            packed: Some(&packed),
                            ..c
                        },
                        exec,
                    ),
                ];
                for (path, got) in got.iter().enumerate() {
                    for (g, w) in got.iter().zip(&want) {
                        let tol = 1e-4 * w.abs().max(1.0);
                        assert!((g - w).abs() < tol, "bf16 path {path}: {g} vs {w}");
                    }
                }
            }
        }
    }

    #[test]
    fn depthwise_by_hand_and_pooling() {
        // One 3x3 image, 2 channels, 3x3 depthwise kernel of ones for channel 0, center only for 1.
        let x: Vec<f32> = (0..18).map(|i| i as f32).collect(); // pixel p: channels (2p, 2p+1)
        let mut wt = vec![1.0f32; 9];
        wt.extend((0..9).map(|i| if i == 4 { 1.0 } else { 0.0 }));
        let geo = Conv2d {
            stride: [1, 1],
            padding: [0, 0],
            groups: 2,
            padding_extra: [0, 0],
        };
        let dims = conv_dims(&[1, 3, 3, 2], &[2, 3, 3, 1], None, &geo, None).unwrap();
        let c = Conv {
            x: &x,
            w: &wt,
            b: None,
            residual: None,
            dims,
            p: &geo,
            act: Activation::None,
            packed: None,
            taps: None,
            level: SimdLevel::best(),
        };
        let out = conv2d(c, Exec::Inline);
        let ch0: f32 = (0..9).map(|p| (2 * p) as f32).sum();
        assert_eq!(out, vec![ch0, 9.0]);
        let mx = pool2d(
            &x,
            [1, 3, 3, 2, 2, 2],
            &Pool2d {
                max: true,
                kernel: [2, 2],
                stride: [1, 1],
                padding: [0, 0],
            },
            Exec::Inline,
        );
        assert_eq!(&mx[..2], &[8.0, 9.0]); // window of pixels 0,1,3,4
        for par in [
            Exec::Inline,
            Exec::Team(crate::backend::cpu::team::test_team()),
        ] {
            assert_eq!(global_avg_pool(&x, 1, 9, 2, par), vec![8.0, 9.0]);
        }
    }
}

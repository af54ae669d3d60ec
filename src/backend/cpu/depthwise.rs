//! Depthwise convolution (one input and one output channel per group) over NHWC tensors.
//!
//! One task per output row. The weight is transposed once per call to `[kh * kw, channels]`,
//! so that a tap's weights for a block of channels are one vector load.
//!
//! The vector path takes a block of channels (one register: 16 lanes at AVX-512, 8 at AVX2)
//! and [`PIXELS`] adjacent output pixels at a time, each pixel with its own accumulator. Why:
//! with one pixel at a time every tap's multiply-add waits for the previous one (a chain of
//! `kh * kw` dependent FMAs, each 4 cycles), which held the old loop to a quarter of the
//! machine; eight independent chains keep the FMA units busy, and a kernel row's weights stay
//! in registers across the eight. Taps outside the image are skipped, so the same loop runs at
//! the borders (the checks are resolved per group: groups wholly inside run without them).
//! Bias, residual and ReLU/ReLU6 are applied in registers before the one store per pixel.
//!
//! Kernel shapes other than 3x3 and 5x5 wide at stride 1 or 2 (any height), and the channels
//! after the last whole register, run the plain per-pixel loop ([`plain_row`]).

use super::buffers;
use super::conv::{Conv, apply};
use super::sgemm::SimdLevel;
use super::team::Exec;
use crate::backend::Activation;

/// Output pixels per group of the vector path: 8 accumulators, plus a kernel row's weights
/// (up to 5) and the input, fit AVX2's 16 registers as well as AVX-512's 32.
const PIXELS: usize = 8;
// The unrolled walk over a group's input pixels covers at most 19 of them.
const _: () = assert!((PIXELS - 1) * 2 + 5 <= 19);

/// `act(depthwise(x, w) + b + residual)`, NHWC.
pub(crate) fn depthwise(conv: Conv<'_>, par: Exec<'_>) -> Vec<f32> {
    let [n, _, _, c, _, _, _, oh, ow] = conv.dims.to_array();
    let taps = taps(&conv);
    // Every element of a row is written by one of the paths below.
    let mut out = buffers::take(n * oh * ow * c);
    par.for_chunks(&mut out, ow * c, |r, o| {
        output_row(&conv, &taps, r / oh, r % oh, o);
    });
    out
}

/// Every output row of image `img` into `out` (`[oh, ow, c]`), on the caller's thread.
pub(crate) fn image_into(conv: &Conv<'_>, taps: &[f32], img: usize, out: &mut [f32]) {
    let [_, _, _, c, _, _, _, oh, ow] = conv.dims.to_array();
    for (y, o) in out[..oh * ow * c].chunks_exact_mut(ow * c).enumerate() {
        output_row(conv, taps, img, y, o);
    }
}

/// The weight as the loops read it: the caller's kept copy ([`Conv::taps`]) or, without one,
/// transposed for this call ([`transpose`]).
pub(crate) fn taps<'a>(conv: &Conv<'a>) -> std::borrow::Cow<'a, [f32]> {
    let [_, _, _, c, _, kh, kw, _, _] = conv.dims.to_array();
    assert!(kh * kw > 0, "a depthwise kernel needs taps");
    // Every path goes through here first: the vector path trusts these.
    assert!(
        conv.level.supported(),
        "{:?} loops on a CPU without them",
        conv.level
    );
    assert!(
        conv.b.is_none_or(|b| b.len() >= c),
        "bias shorter than the channels"
    );
    match conv.taps {
        Some(t) => {
            assert_eq!(t.len(), kh * kw * c, "kept taps of another shape");
            std::borrow::Cow::Borrowed(t)
        }
        None => std::borrow::Cow::Owned(transpose(conv.w, c, kh * kw)),
    }
}

/// A depthwise weight `[c, kh, kw, 1]` (`taps = kh * kw`) as `[taps, c]`: a tap's weights for a
/// block of channels are then one vector load.
pub(crate) fn transpose(w: &[f32], c: usize, taps: usize) -> Vec<f32> {
    assert_eq!(w.len(), c * taps, "a depthwise weight of {c} x {taps}");
    let mut out = vec![0.0f32; taps * c];
    for ch in 0..c {
        for t in 0..taps {
            out[t * c + ch] = w[ch * taps + t];
        }
    }
    out
}

/// Output row `y` of image `img` into `o` (`[ow, c]`).
fn output_row(conv: &Conv<'_>, taps: &[f32], img: usize, y: usize, o: &mut [f32]) {
    let c = conv.dims.cout;
    let done = vector_row(conv, taps, img, y, o);
    if done < c {
        plain_row(conv, taps, img, y, done, o);
    }
}

/// The vector path over the row's whole registers of channels; returns how many channels it
/// did (0 when the kernel shape or the level has no vector path).
fn vector_row(conv: &Conv<'_>, taps: &[f32], img: usize, y: usize, o: &mut [f32]) -> usize {
    let g = Geometry::new(conv, img, y);
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `level` is one this CPU runs (the backend checked it); `g` was made from
        // `conv`'s checked dimensions and `o` is output row `y` of image `img`.
        match conv.level {
            SimdLevel::Avx512 => unsafe { return x86::row_avx512(&g, taps, o) },
            SimdLevel::Avx2 => unsafe { return x86::row_avx2(&g, taps, o) },
            SimdLevel::Generic => {}
        }
    }
    let _ = (g, taps, o);
    0
}

/// One output row's operands and sizes, as the vector path reads them.
#[derive(Clone, Copy)]
struct Geometry<'a> {
    /// The image's input, `[h, w, c]`.
    x: &'a [f32],
    bias: Option<&'a [f32]>,
    /// The residual's values for this output row, `[ow, c]`.
    residual: Option<&'a [f32]>,
    act: Activation,
    y: usize,
    h: usize,
    w: usize,
    c: usize,
    kh: usize,
    kw: usize,
    ow: usize,
    stride: [usize; 2],
    padding: [usize; 2],
}

impl<'a> Geometry<'a> {
    fn new(conv: &Conv<'a>, img: usize, y: usize) -> Geometry<'a> {
        let [_, h, w, c, _, kh, kw, oh, ow] = conv.dims.to_array();
        Geometry {
            x: &conv.x[img * h * w * c..][..h * w * c],
            bias: conv.b,
            residual: conv
                .residual
                .map(|r| &r[((img * oh + y) * ow) * c..][..ow * c]),
            act: conv.act,
            y,
            h,
            w,
            c,
            kh,
            kw,
            ow,
            stride: conv.p.stride,
            padding: conv.p.padding,
        }
    }

    /// Input row of kernel row `i`, when it is inside the image.
    #[inline(always)]
    fn input_row(&self, i: usize) -> Option<usize> {
        (self.y * self.stride[0] + i)
            .checked_sub(self.padding[0])
            .filter(|&v| v < self.h)
    }
}

/// Runs `body` once per listed value of `u`, each a constant the compiler folds.
#[cfg(target_arch = "x86_64")]
macro_rules! unroll {
    ($u:ident in [$($n:literal)*] $body:block) => {
        $({
            let $u: usize = $n;
            $body
        })*
    };
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Geometry, PIXELS};
    use crate::backend::Activation;
    use crate::backend::cpu::vector::Vector;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU has AVX-512F; `g` describes valid slices and `o` is its output row.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row_avx512(g: &Geometry<'_>, taps: &[f32], o: &mut [f32]) -> usize {
        unsafe { row::<__m512>(g, taps, o) }
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; as [`row_avx512`] otherwise.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row_avx2(g: &Geometry<'_>, taps: &[f32], o: &mut [f32]) -> usize {
        unsafe { row::<__m256>(g, taps, o) }
    }

    /// Every whole register of channels of one output row; returns the channels done.
    #[inline(always)]
    unsafe fn row<V: Vector>(g: &Geometry<'_>, taps: &[f32], o: &mut [f32]) -> usize {
        let blocks = g.c / V::LANES;
        if blocks == 0 {
            return 0;
        }
        // SAFETY (each arm): forwarded from the caller.
        unsafe {
            match (g.kw, g.stride[1]) {
                (3, 1) => blocks_of::<V, 3, 1>(g, taps, o, blocks),
                (3, 2) => blocks_of::<V, 3, 2>(g, taps, o, blocks),
                (5, 1) => blocks_of::<V, 5, 1>(g, taps, o, blocks),
                (5, 2) => blocks_of::<V, 5, 2>(g, taps, o, blocks),
                _ => return 0,
            }
        }
        blocks * V::LANES
    }

    #[inline(always)]
    unsafe fn blocks_of<V: Vector, const KW: usize, const S: usize>(
        g: &Geometry<'_>,
        taps: &[f32],
        o: &mut [f32],
        blocks: usize,
    ) {
        assert!(taps.len() == g.kh * KW * g.c && o.len() == g.ow * g.c);
        let px = g.padding[1];
        // Pixels outer, channels inner: a group's input pixels are then read through all
        // their channels in address order (a stream the prefetchers follow), where the other
        // order walked the row once per block of channels at a stride of a whole pixel (4x
        // slower at batch 8, once the activations no longer fit the caches).
        for x0 in (0..g.ow).step_by(PIXELS) {
            // Whether every window of the group lies inside the row (no checks needed).
            let inside = x0 * S >= px && (x0 + PIXELS - 1) * S + KW <= g.w + px;
            for b in 0..blocks {
                let ch = b * V::LANES;
                // SAFETY: loads are of input pixels inside the image (checked, or inside by
                // `inside`) and of taps inside `taps`; stores of pixels < ow in `o`.
                unsafe {
                    if inside {
                        group::<V, KW, S, false>(g, taps, o, x0, ch)
                    } else {
                        group::<V, KW, S, true>(g, taps, o, x0, ch)
                    }
                }
            }
        }
    }

    /// Output pixels `x0 .. x0 + PIXELS` (those < ow stored), channels `ch .. ch + LANES`.
    #[inline(always)]
    unsafe fn group<V: Vector, const KW: usize, const S: usize, const CHECK: bool>(
        g: &Geometry<'_>,
        taps: &[f32],
        o: &mut [f32],
        x0: usize,
        ch: usize,
    ) {
        let (c, px) = (g.c, g.padding[1] as isize);
        // SAFETY: see `blocks_of`; with CHECK false every column read is inside the row.
        unsafe {
            let init = match g.bias {
                Some(b) => V::load(b.as_ptr().add(ch)),
                None => V::splat(0.0),
            };
            let mut acc = [init; PIXELS];
            // Input column of the group's first window's first tap (left of the image when
            // the group starts in the padding).
            let first = (x0 * S) as isize - px;
            for i in 0..g.kh {
                let Some(iy) = g.input_row(i) else {
                    continue;
                };
                let trow = taps.as_ptr().add(i * KW * c + ch);
                let wv: [V; KW] = std::array::from_fn(|j| V::load(trow.add(j * c)));
                // Walks the row's input pixels left to right (a pointer outside the row is
                // never read: CHECK skips it).
                let mut xp =
                    g.x.as_ptr()
                        .add(iy * g.w * c + ch)
                        .wrapping_offset(first * c as isize);
                // Input pixel `u` of the group feeds output `p` through tap `j` when
                // `u = p * S + j`; unrolled so that the pairing is fixed at compile time.
                unroll!(u in [0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18] {
                    if u < (PIXELS - 1) * S + KW {
                        let col = first + u as isize;
                        if !CHECK || (col >= 0 && col < g.w as isize) {
                            let xv = V::load(xp);
                            for (j, &w) in wv.iter().enumerate() {
                                if u >= j && (u - j).is_multiple_of(S) && (u - j) / S < PIXELS {
                                    let a = &mut acc[(u - j) / S];
                                    *a = xv.fma(w, *a);
                                }
                            }
                        }
                        xp = xp.wrapping_add(c);
                    }
                });
            }
            let (zero, six) = (V::splat(0.0), V::splat(6.0));
            for (p, &a) in acc.iter().enumerate().take(g.ow - x0) {
                let at = (x0 + p) * c + ch;
                let mut v = a;
                if let Some(r) = g.residual {
                    v = v.add(V::load(r.as_ptr().add(at)));
                }
                v = match g.act {
                    Activation::Relu => v.max(zero),
                    Activation::Relu6 => v.max(zero).min(six),
                    _ => v,
                };
                v.store(o.as_mut_ptr().add(at));
                if matches!(g.act, Activation::GeluErf | Activation::Tanh) {
                    for e in &mut o[at..at + V::LANES] {
                        *e = super::apply(*e, g.act);
                    }
                }
            }
        }
    }
}

/// The plain loop over channels `from..` of output row `y` of image `img`: per pixel, the taps
/// inside the image found once, then accumulated over the channels in place.
fn plain_row(conv: &Conv<'_>, taps: &[f32], img: usize, y: usize, from: usize, o: &mut [f32]) {
    let g = Geometry::new(conv, img, y);
    let (c, [sx, px]) = (g.c, [g.stride[1], g.padding[1]]);
    let mut inside: Vec<(usize, usize)> = Vec::with_capacity(g.kh * g.kw);
    for xo in 0..g.ow {
        inside.clear();
        for i in 0..g.kh {
            let Some(iy) = g.input_row(i) else {
                continue;
            };
            for j in 0..g.kw {
                let Some(ix) = (xo * sx + j).checked_sub(px).filter(|&v| v < g.w) else {
                    continue;
                };
                inside.push(((iy * g.w + ix) * c, (i * g.kw + j) * c));
            }
        }
        let out = &mut o[xo * c + from..][..c - from];
        match g.bias {
            Some(b) => out.copy_from_slice(&b[from..]),
            None => out.fill(0.0),
        }
        for &(xi, wi) in &inside {
            let (xs, ws) = (&g.x[xi + from..xi + c], &taps[wi + from..wi + c]);
            for ((v, xv), wv) in out.iter_mut().zip(xs).zip(ws) {
                *v += xv * wv;
            }
        }
        if let Some(res) = g.residual {
            let r = &res[xo * c + from..][..c - from];
            out.iter_mut().zip(r).for_each(|(v, r)| *v += r);
        }
        if g.act != Activation::None {
            out.iter_mut().for_each(|v| *v = apply(*v, g.act));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Conv2d;
    use crate::backend::cpu::conv::tests::data;
    use crate::backend::op_check::conv_dims;

    /// Plain f64 depthwise convolution with bias, residual and activation.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f32],
        wt: &[f32],
        b: &[f32],
        r: &[f32],
        [n, h, w, c]: [usize; 4],
        [k, kw]: [usize; 2],
        geo: &Conv2d,
        [oh, ow]: [usize; 2],
        act: Activation,
    ) -> Vec<f32> {
        let mut out = vec![0.0f32; n * oh * ow * c];
        for img in 0..n {
            for y in 0..oh {
                for xo in 0..ow {
                    for ch in 0..c {
                        let mut acc = b[ch] as f64;
                        for i in 0..k {
                            for j in 0..kw {
                                let iy = (y * geo.stride[0] + i) as isize - geo.padding[0] as isize;
                                let ix =
                                    (xo * geo.stride[1] + j) as isize - geo.padding[1] as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let xv = x[((img * h + iy as usize) * w + ix as usize) * c + ch];
                                acc += xv as f64 * wt[(ch * k + i) * kw + j] as f64;
                            }
                        }
                        let at = ((img * oh + y) * ow + xo) * c + ch;
                        out[at] = apply(acc as f32 + r[at], act);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn every_level_matches_the_reference() {
        // The four shapes with a vector path (3x3 and 5x5 at strides 1 and 2) and two without
        // (7 wide; 3x1), channel counts with and without a ragged last register, images
        // narrower than one group of pixels and wide enough for groups with no border checks,
        // TF-style extra padding;
        // bias, residual and each activation fused; inline and on a team.
        let team = Exec::Team(crate::backend::cpu::team::test_team());
        let acts = [
            Activation::Relu6,
            Activation::Relu,
            Activation::None,
            Activation::GeluErf,
        ];
        let cases = [
            (7, 9, 37, [3, 3], 1, 1, 0),
            (8, 8, 16, [5, 5], 2, 2, 1),
            (5, 6, 3, [3, 3], 2, 0, 1),
            (14, 14, 48, [3, 3], 1, 1, 0),
            (5, 30, 48, [3, 3], 1, 1, 0),
            (19, 21, 32, [5, 5], 1, 2, 0),
            (4, 40, 32, [5, 5], 1, 2, 0),
            (23, 41, 24, [3, 3], 2, 1, 1),
            (11, 25, 40, [5, 5], 2, 2, 0),
            (6, 40, 16, [5, 5], 2, 2, 0),
            (7, 7, 64, [5, 5], 1, 2, 0),
            (3, 2, 16, [3, 3], 1, 1, 0),
            (9, 12, 16, [7, 7], 2, 3, 0),
            (6, 10, 24, [3, 1], 1, 1, 0),
        ];
        for (ci, &(h, w, ch, [k, kw], s, p, extra)) in cases.iter().enumerate() {
            let geo = Conv2d {
                stride: [s, s],
                padding: [p, p.min(kw / 2)],
                groups: ch,
                padding_extra: [extra, extra],
            };
            let (xs, ws) = ([2, h, w, ch], [ch, k, kw, 1]);
            let d = conv_dims(&xs, &ws, None, &geo, None).unwrap();
            let out_shape = [2, d.oh, d.ow, ch];
            let (x, wt, b) = (data(2 * h * w * ch, 5), data(ch * k * kw, 6), data(ch, 7));
            let r = data(out_shape.iter().product(), 8);
            let act = acts[ci % acts.len()];
            let want = reference(&x, &wt, &b, &r, xs, [k, kw], &geo, [d.oh, d.ow], act);
            let dims = conv_dims(&xs, &ws, Some(&[ch]), &geo, Some(&out_shape)).unwrap();
            for level in SimdLevel::available() {
                let c = Conv {
                    x: &x,
                    w: &wt,
                    b: Some(&b),
                    residual: Some(&r),
                    dims,
                    p: &geo,
                    act,
                    packed: None,
                    taps: None,
                    level,
                };
                // Taps transposed per call, and a kept copy (as the backend passes them).
                let kept = transpose(&wt, ch, k * kw);
                let with_kept = Conv {
                    taps: Some(&kept),
                    ..c
                };
                for (exec, conv) in [(Exec::Inline, c), (team, c), (team, with_kept)] {
                    for (i, (g, w)) in depthwise(conv, exec).iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() < 1e-5 * w.abs().max(1.0),
                            "case {ci} {level:?} element {i}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}

//! Self-attention core on the CPU: for each (input, head) pair in parallel, the scores
//! `Q K^T` against the input's real keys only, a softmax per row, then `P V`, the two products on
//! the GEMM micro-kernels ([`super::sgemm`]). Padding keys are never read, so padding cannot
//! change any real token's result.

use super::buffers;
use super::sgemm::{self, PackedB, SimdLevel};
use super::simd::multiversion;
use super::softmax::softmax_in_place;
use super::team::{Exec, OutPtr};
use crate::backend::BatchShape;

#[inline(always)]
fn softmax_each_body(scores: &mut [f32], len: usize) {
    for row in scores.chunks_exact_mut(len) {
        softmax_in_place(row);
    }
}

multiversion!(fn softmax_each(scores: &mut [f32], len: usize) => softmax_each_body);

/// One (input, head) pair's context rows (`len` rows of `d`) into `out`.
#[allow(clippy::too_many_arguments)]
fn head(
    level: SimdLevel,
    qkv: &[f32],
    base: usize,
    len: usize,
    h: usize,
    d: usize,
    width: usize,
    out: &mut [f32],
) {
    let ld = 3 * width;
    let at = |part: usize| base * ld + part * width + h * d;
    let scale = 1.0 / (d as f32).sqrt();
    let q = sgemm::Rows {
        data: &qkv[at(0)..],
        ld,
    };
    let mut keys = PackedB::new(level);
    keys.pack_transposed(&qkv[at(1)..], ld, len, d);
    let mut scores = vec![0.0f32; len * len];
    let scaled = sgemm::Epilogue {
        scale,
        ..Default::default()
    };
    sgemm::gemm(Exec::Inline, q, len, &keys, &mut scores, len, &scaled);
    softmax_each(&mut scores, len);
    let mut values = PackedB::new(level);
    values.pack(&qkv[at(2)..], ld, len, d);
    let p = sgemm::Rows {
        data: &scores,
        ld: len,
    };
    sgemm::gemm(Exec::Inline, p, len, &values, out, d, &Default::default());
}

pub(crate) fn attention(
    qkv: &[f32],
    shape: &BatchShape,
    width: usize,
    heads: usize,
    level: SimdLevel,
    par: Exec<'_>,
) -> Vec<f32> {
    let d = width / heads;
    // Rows of padding positions stay zero.
    let mut ctx = buffers::zeroed(shape.rows() * width);
    let out = OutPtr(ctx.as_mut_ptr());
    par.for_each(shape.batch() * heads, &|task| {
        let (b, h) = (task / heads, task % heads);
        let len = shape.lengths[b];
        let base = b * shape.seq;
        let mut block = vec![0.0f32; len * d];
        head(level, qkv, base, len, h, d, width, &mut block);
        for (i, r) in block.chunks(d).enumerate() {
            // SAFETY: row base+i, columns h*d..(h+1)*d of `ctx` belong to this task only.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    r.as_ptr(),
                    out.get().add((base + i) * width + h * d),
                    d,
                );
            }
        }
    });
    ctx
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward f64 attention for one input with explicit masking.
    fn naive(qkv: &[f32], seq: usize, len: usize, width: usize, heads: usize) -> Vec<f32> {
        let d = width / heads;
        let mut out = vec![0.0f32; seq * width];
        for h in 0..heads {
            for i in 0..len {
                let q = |t: usize| qkv[i * 3 * width + h * d + t] as f64;
                let mut s: Vec<f64> = (0..len)
                    .map(|j| {
                        (0..d)
                            .map(|t| q(t) * qkv[j * 3 * width + width + h * d + t] as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                s.iter_mut().for_each(|x| *x = (*x - m).exp());
                let z: f64 = s.iter().sum();
                for t in 0..d {
                    let acc: f64 = (0..len)
                        .map(|j| s[j] / z * qkv[j * 3 * width + 2 * width + h * d + t] as f64)
                        .sum();
                    out[i * width + h * d + t] = acc as f32;
                }
            }
        }
        out
    }

    #[test]
    fn matches_naive_and_ignores_padding() {
        // Narrow heads and short inputs; then MiniLM's head width with inputs longer than a
        // micro-tile, so that ragged row and column panels are hit.
        for (seq, width, heads, lengths) in [(7, 12, 3, vec![7, 3, 1]), (45, 64, 2, vec![45, 20])] {
            let shape = BatchShape { seq, lengths };
            let n = shape.rows() * 3 * width;
            let qkv: Vec<f32> = (0..n).map(|i| ((i * 31 % 17) as f32 - 8.0) / 6.0).collect();
            for level in SimdLevel::available() {
                check(level, &mut qkv.clone(), &shape, width, heads);
            }
        }
    }

    fn check(level: SimdLevel, qkv: &mut [f32], shape: &BatchShape, width: usize, heads: usize) {
        let (seq, lengths) = (shape.seq, &shape.lengths);
        let got = attention(qkv, shape, width, heads, level, Exec::Inline);
        // Inline and on a team: the same loops, so the same values.
        let team = Exec::Team(crate::backend::cpu::team::test_team());
        assert_eq!(attention(qkv, shape, width, heads, level, team), got);
        for (b, &len) in lengths.iter().enumerate() {
            let part = &qkv[b * seq * 3 * width..(b + 1) * seq * 3 * width];
            let want = naive(part, seq, len, width, heads);
            let have = &got[b * seq * width..(b + 1) * seq * width];
            for (g, w) in have.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "{level:?} input {b}: {g} vs {w}");
            }
        }
        // Garbage in the padding positions must not change anything.
        for b in 0..lengths.len() {
            for p in lengths[b]..seq {
                for c in 0..3 * width {
                    qkv[(b * seq + p) * 3 * width + c] = 1e6;
                }
            }
        }
        assert_eq!(
            attention(qkv, shape, width, heads, level, Exec::Inline),
            got
        );
    }
}

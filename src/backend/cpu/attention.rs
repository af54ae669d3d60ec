//! Self-attention core on the CPU: for each (input, head) pair in parallel, `S = Q K^T / sqrt(d)`
//! over the input's real tokens only, a row softmax, then `S V` written straight into the
//! context rows. Padding keys are never read, so padding cannot change any real token's result.

use rayon::prelude::*;

use super::pool::softmax_in_place;
use crate::backend::BatchShape;

/// Lets parallel tasks write disjoint parts of one output buffer.
#[derive(Copy, Clone)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a distinct (input, head) block of rows x columns; no overlap.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

pub(crate) fn attention(qkv: &[f32], shape: &BatchShape, width: usize, heads: usize) -> Vec<f32> {
    let d = width / heads;
    let ld_qkv = 3 * width;
    let mut ctx = vec![0.0f32; shape.rows() * width];
    let out = OutPtr(ctx.as_mut_ptr());
    let scale = 1.0 / (d as f32).sqrt();
    (0..shape.batch() * heads).into_par_iter().for_each(|task| {
        let out = out;
        let (b, h) = (task / heads, task % heads);
        let len = shape.lengths[b];
        let base = b * shape.seq;
        let q = qkv[base * ld_qkv + h * d..].as_ptr();
        let k = qkv[base * ld_qkv + width + h * d..].as_ptr();
        let v = qkv[base * ld_qkv + 2 * width + h * d..].as_ptr();
        let mut scores = vec![0.0f32; len * len];
        // SAFETY: q, k, v address `len` rows of stride `ld_qkv` inside `qkv` (len <= seq), each
        // `d` wide; `scores` is len x len; the destination block is rows base..base+len,
        // columns h*d..(h+1)*d of `ctx`, written by this task only.
        unsafe {
            gemm::gemm(
                len,
                len,
                d,
                scores.as_mut_ptr(),
                1,
                len as isize,
                false,
                q,
                1,
                ld_qkv as isize,
                k,
                ld_qkv as isize,
                1,
                0.0,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for row in scores.chunks_mut(len) {
            softmax_in_place(row);
        }
        unsafe {
            gemm::gemm(
                len,
                d,
                len,
                out.0.add(base * width + h * d),
                1,
                width as isize,
                false,
                scores.as_ptr(),
                1,
                len as isize,
                v,
                1,
                ld_qkv as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
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
        let (seq, width, heads) = (7, 12, 3);
        let lengths = vec![7, 3, 1];
        let shape = BatchShape {
            seq,
            lengths: lengths.clone(),
        };
        let n = shape.rows() * 3 * width;
        let mut qkv: Vec<f32> = (0..n).map(|i| ((i * 31 % 17) as f32 - 8.0) / 6.0).collect();
        let got = attention(&qkv, &shape, width, heads);
        for (b, &len) in lengths.iter().enumerate() {
            let part = &qkv[b * seq * 3 * width..(b + 1) * seq * 3 * width];
            let want = naive(part, seq, len, width, heads);
            let have = &got[b * seq * width..(b + 1) * seq * width];
            for (g, w) in have.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "input {b}: {g} vs {w}");
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
        assert_eq!(attention(&qkv, &shape, width, heads), got);
    }
}

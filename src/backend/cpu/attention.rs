//! Self-attention core on the CPU: for each (input, head) pair in parallel and each query row,
//! scores against the input's real keys only, a softmax, then the weighted sum of values written
//! straight into the context row. Padding keys are never read, so padding cannot change any real token's result.

use gemm::Parallelism;

use super::par::for_indices;
use super::simd::multiversion;
use super::softmax::softmax_in_place;
use crate::backend::BatchShape;

/// Lets parallel tasks write disjoint parts of one output buffer.
#[derive(Copy, Clone)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a distinct (input, head) block of rows x columns; no overlap.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method (not the field) so closures capture the whole `Send` wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// One (input, head) pair: for each of the `len` query rows, scores against the `len` real keys,
/// softmax, weighted sum of values into `out` (`len` rows of `d`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn head_body(
    qkv: &[f32],
    base: usize,
    len: usize,
    h: usize,
    d: usize,
    width: usize,
    scale: f32,
    out: &mut [f32],
) {
    let ld = 3 * width;
    let row = |p: usize, part: usize| {
        let at = (base + p) * ld + part * width + h * d;
        &qkv[at..at + d]
    };
    // K^T for this head, so that scores of one query against all keys is a sum of `d` axpys
    // over contiguous memory (vectorised over keys, no horizontal sums).
    let mut kt = vec![0.0f32; d * len];
    for j in 0..len {
        for (t, &k) in row(j, 1).iter().enumerate() {
            kt[t * len + j] = k;
        }
    }
    let mut scores = vec![0.0f32; len];
    for (i, acc) in out.chunks_mut(d).enumerate() {
        scores.iter_mut().for_each(|s| *s = 0.0);
        for (&qt, kt_row) in row(i, 0).iter().zip(kt.chunks_exact(len)) {
            let qt = qt * scale;
            for (s, k) in scores.iter_mut().zip(kt_row) {
                *s += qt * k;
            }
        }
        softmax_in_place(&mut scores);
        acc.iter_mut().for_each(|a| *a = 0.0);
        for (j, &p) in scores.iter().enumerate() {
            for (a, v) in acc.iter_mut().zip(row(j, 2)) {
                *a += p * v;
            }
        }
    }
}

multiversion!(
    #[allow(clippy::too_many_arguments)]
    fn head(qkv: &[f32], base: usize, len: usize, h: usize, d: usize, width: usize, scale: f32, out: &mut [f32]) => head_body
);

pub(crate) fn attention(
    qkv: &[f32],
    shape: &BatchShape,
    width: usize,
    heads: usize,
    par: Parallelism,
) -> Vec<f32> {
    let d = width / heads;
    let mut ctx = vec![0.0f32; shape.rows() * width];
    let out = OutPtr(ctx.as_mut_ptr());
    let scale = 1.0 / (d as f32).sqrt();
    for_indices(shape.batch() * heads, par, |task| {
        let (b, h) = (task / heads, task % heads);
        let len = shape.lengths[b];
        let base = b * shape.seq;
        // Heads are narrow (d = 32 for MiniLM) and inputs short: plain loops vectorised over `d`
        // beat a general GEMM, whose packing dominates at these sizes.
        let mut block = vec![0.0f32; len * d];
        head(qkv, base, len, h, d, width, scale, &mut block);
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
        let (seq, width, heads) = (7, 12, 3);
        let lengths = vec![7, 3, 1];
        let shape = BatchShape {
            seq,
            lengths: lengths.clone(),
        };
        let n = shape.rows() * 3 * width;
        let mut qkv: Vec<f32> = (0..n).map(|i| ((i * 31 % 17) as f32 - 8.0) / 6.0).collect();
        let got = attention(&qkv, &shape, width, heads, Parallelism::None);
        // Inline and on a pool: the same loops, so the same values.
        assert_eq!(
            attention(&qkv, &shape, width, heads, Parallelism::Rayon(2)),
            got
        );
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
        assert_eq!(
            attention(&qkv, &shape, width, heads, Parallelism::None),
            got
        );
    }
}

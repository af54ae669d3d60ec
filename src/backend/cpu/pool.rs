//! Pooling, L2 normalisation and softmax: small row-wise ops.

use super::simd;
use crate::backend::{BatchShape, Pooling};

/// Numerically stable softmax of one row, in place.
#[inline(always)]
pub(crate) fn softmax_in_place(row: &mut [f32]) {
    let mut m = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .cloned()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for k in 0..8 {
            m[k] = if c[k] > m[k] { c[k] } else { m[k] };
        }
    }
    let max = m.iter().cloned().fold(tail, f32::max);
    row.iter_mut().for_each(|v| *v = simd::exp(*v - max));
    let inv = 1.0 / simd::sum(row);
    row.iter_mut().for_each(|v| *v *= inv);
}

pub(crate) fn pool(x: &[f32], shape: &BatchShape, cols: usize, kind: Pooling) -> Vec<f32> {
    let mut out = vec![0.0f32; shape.batch() * cols];
    for (b, o) in out.chunks_mut(cols).enumerate() {
        let first = b * shape.seq;
        match kind {
            Pooling::Cls => o.copy_from_slice(&x[first * cols..(first + 1) * cols]),
            Pooling::Mean => {
                let len = shape.lengths[b];
                for r in first..first + len {
                    for (o, v) in o.iter_mut().zip(&x[r * cols..(r + 1) * cols]) {
                        *o += v;
                    }
                }
                let inv = 1.0 / len.max(1) as f32;
                o.iter_mut().for_each(|v| *v *= inv);
            }
        }
    }
    out
}

/// `x / max(||x||_2, 1e-12)` per row, like `torch.nn.functional.normalize`.
pub(crate) fn l2_normalize(x: &[f32], cols: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    for row in out.chunks_mut(cols.max(1)) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= norm);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pool_skips_padding() {
        let shape = BatchShape {
            seq: 3,
            lengths: vec![2, 1],
        };
        let x = [
            1.0, 2.0, 3.0, 4.0, 100.0, 100.0, 5.0, 6.0, 9.0, 9.0, 9.0, 9.0,
        ];
        assert_eq!(pool(&x, &shape, 2, Pooling::Mean), vec![2.0, 3.0, 5.0, 6.0]);
        assert_eq!(pool(&x, &shape, 2, Pooling::Cls), vec![1.0, 2.0, 5.0, 6.0]);
    }

    #[test]
    fn softmax_is_stable_and_sums_to_one() {
        let mut r = [1000.0, 1001.0, 999.0];
        softmax_in_place(&mut r);
        assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(r[1] > r[0] && r[0] > r[2]);
        let n = l2_normalize(&[3.0, 4.0, 0.0, 0.0], 2);
        assert_eq!(n, vec![0.6, 0.8, 0.0, 0.0]);
    }
}

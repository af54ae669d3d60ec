//! Softmax: of a tensor's rows (the `softmax` op), and of one row in place (attention scores,
//! ramp heads).

use super::simd;

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

/// Row-wise softmax of `x`, rows of `cols` values.
pub(crate) fn softmax_rows(x: &[f32], cols: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    for row in out.chunks_mut(cols.max(1)) {
        softmax_in_place(row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_is_stable_and_sums_to_one() {
        let mut r = [1000.0, 1001.0, 999.0];
        softmax_in_place(&mut r);
        assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(r[1] > r[0] && r[0] > r[2]);
        assert_eq!(softmax_rows(&[0.0, 0.0, 5.0, 5.0], 2), vec![0.5; 4]);
    }
}

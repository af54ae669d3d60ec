//! Row normalisations: residual add + LayerNorm, fused (one read of each input row, one write
//! of the output), and L2 normalisation.

use super::buffers;
use super::team::Exec;

use super::simd::{self, multiversion};

/// Normalises `row` in place: `(row - mean) / sqrt(var + eps) * gamma + beta`.
#[inline(always)]
pub(crate) fn layernorm_row(row: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let n = row.len() as f32;
    let mean = simd::sum(row) / n;
    // Two passes (mean, then centred squares) avoid the cancellation of E[x^2] - E[x]^2.
    let mut acc = [0.0f32; 8];
    let chunks = row.chunks_exact(8);
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|v| (v - mean) * (v - mean))
        .sum();
    for c in chunks {
        for k in 0..8 {
            acc[k] += (c[k] - mean) * (c[k] - mean);
        }
    }
    let var = (acc.iter().sum::<f32>() + tail) / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
        *v = (*v - mean) * inv * g + b;
    }
}

#[inline(always)]
fn add_layernorm_row_body(
    o: &mut [f32],
    a: &[f32],
    r: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    for ((o, a), r) in o.iter_mut().zip(a).zip(r) {
        *o = a + r;
    }
    layernorm_row(o, gamma, beta, eps);
}

multiversion!(fn add_layernorm_row(o: &mut [f32], a: &[f32], r: &[f32], gamma: &[f32], beta: &[f32], eps: f32) => add_layernorm_row_body);

pub(crate) fn add_layernorm(
    x: &[f32],
    residual: &[f32],
    gamma: &[f32],
    beta: &[f32],
    cols: usize,
    eps: f32,
    par: Exec<'_>,
) -> Vec<f32> {
    // Every row is written whole.
    let mut out = buffers::take(x.len());
    par.for_chunks(&mut out, cols, |i, o| {
        let (a, r) = (&x[i * cols..][..cols], &residual[i * cols..][..cols]);
        add_layernorm_row(o, a, r, gamma, beta, eps)
    });
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
    fn normalises_each_row() {
        let x = [1.0, 2.0, 3.0, 4.0, -1.0, 0.0, 1.0, 2.0];
        let r = [0.0; 8];
        let g = [1.0, 1.0, 2.0, 1.0];
        let b = [0.0, 0.0, 0.0, 0.5];
        let out = add_layernorm(&x, &r, &g, &b, 4, 1e-12, Exec::Inline);
        assert_eq!(
            add_layernorm(
                &x,
                &r,
                &g,
                &b,
                4,
                1e-12,
                Exec::Team(crate::backend::cpu::team::test_team())
            ),
            out
        );
        // Row [1,2,3,4]: mean 2.5, var 1.25.
        let s = 1.25f32.sqrt();
        let want = [-1.5 / s, -0.5 / s, 2.0 * 0.5 / s, 1.5 / s + 0.5];
        for (o, w) in out[..4].iter().zip(want) {
            assert!((o - w).abs() < 1e-5);
        }
        // The second row is the first shifted by a constant: same result.
        assert!(
            out[4..]
                .iter()
                .zip(&out[..4])
                .all(|(a, b)| (a - b).abs() < 1e-5)
        );
    }

    #[test]
    fn l2_normalize_gives_unit_rows() {
        let n = super::l2_normalize(&[3.0, 4.0, 0.0, 0.0], 2);
        assert_eq!(n, vec![0.6, 0.8, 0.0, 0.0]);
    }
}

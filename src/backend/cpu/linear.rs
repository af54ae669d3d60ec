//! `act(x W^T + b)` on the CPU: one GEMM from the `gemm` crate, then bias and activation fused
//! into a single pass over the output while it is still hot in cache.

use super::par::for_chunks;
use super::simd::{self, multiversion};
use crate::backend::Activation;

/// GELU in its erf form, as BERT defines it (erf within 4e-7, see [`simd::erf`]).
#[inline(always)]
pub(crate) fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + simd::erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
fn bias_act_body(
    rows: &mut [f32],
    n: usize,
    b: Option<&[f32]>,
    res: Option<&[f32]>,
    act: Activation,
) {
    for (i, row) in rows.chunks_mut(n).enumerate() {
        if let Some(b) = b {
            for (v, bias) in row.iter_mut().zip(b) {
                *v += bias;
            }
        }
        if let Some(r) = res {
            for (v, r) in row.iter_mut().zip(&r[i * n..(i + 1) * n]) {
                *v += r;
            }
        }
        match act {
            Activation::None => {}
            Activation::GeluErf => row.iter_mut().for_each(|v| *v = gelu_erf(*v)),
            Activation::Tanh => row.iter_mut().for_each(|v| *v = v.tanh()),
            Activation::Relu => row.iter_mut().for_each(|v| *v = v.max(0.0)),
            Activation::Relu6 => row.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0)),
        }
    }
}

multiversion!(fn bias_act(rows: &mut [f32], n: usize, b: Option<&[f32]>, res: Option<&[f32]>, act: Activation) => bias_act_body);

/// Rows of output handled per parallel epilogue task; big enough to amortise scheduling.
const EPILOGUE_ROWS: usize = 16;

/// `act(x W^T + b + residual)`: `x` [m, k] row-major, `w` [n, k] row-major, `residual` [m, n]
/// -> [m, n].
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    residual: Option<&[f32]>,
    m: usize,
    n: usize,
    k: usize,
    act: Activation,
    par: gemm::Parallelism,
) -> Vec<f32> {
    let mut out = vec![0.0f32; m * n];
    if m == 0 || n == 0 {
        return out;
    }
    // SAFETY: all pointers cover their matrices with the strides given: dst [m, n] row-major,
    // lhs = x [m, k] row-major, rhs = W^T viewed as [k, n] with row stride 1 and column stride k.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
    if b.is_some() || residual.is_some() || act != Activation::None {
        for_chunks(&mut out, n * EPILOGUE_ROWS, par, |i, rows| {
            let res = residual.map(|r| &r[i * n * EPILOGUE_ROWS..][..rows.len()]);
            bias_act(rows, n, b, res, act)
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = b[j] as f64;
                for kk in 0..k {
                    acc += x[i * k + kk] as f64 * w[j * k + kk] as f64;
                }
                out[i * n + j] = acc as f32;
            }
        }
        out
    }

    #[test]
    fn matches_naive_on_odd_shapes() {
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (17, 33, 65), (64, 96, 128)] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 7.0)
                .collect();
            let b: Vec<f32> = (0..n).map(|i| i as f32 / 10.0).collect();
            for par in [gemm::Parallelism::None, gemm::Parallelism::Rayon(2)] {
                let got = linear(&x, &w, Some(&b), None, m, n, k, Activation::None, par);
                let want = naive(&x, &w, &b, m, n, k);
                for (g, e) in got.iter().zip(&want) {
                    assert!(
                        (g - e).abs() <= 1e-4 * e.abs().max(1.0),
                        "{m}x{n}x{k}: {g} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn gelu_matches_reference_values() {
        // torch.nn.functional.gelu(torch.tensor([-3., -1., 0., 0.5, 2.]))
        let want = [-0.0040496, -0.1586553, 0.0, 0.3457312, 1.9544997];
        for (x, w) in [-3.0f32, -1.0, 0.0, 0.5, 2.0].iter().zip(want) {
            assert!((gelu_erf(*x) - w).abs() < 1e-6, "gelu({x})");
        }
    }
}

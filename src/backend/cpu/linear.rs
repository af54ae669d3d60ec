//! `act(x W^T + b)` on the CPU: one GEMM ([`super::sgemm`], the weight packed once), with bias,
//! residual and activation fused into its epilogue (applied in registers by the micro-kernels).

use super::buffers;
use super::sgemm::{self, PackedB};
use super::simd::{self, multiversion};
use super::team::Exec;
use crate::backend::Activation;

/// GELU in its erf form, as BERT defines it (erf within 4e-7, see [`simd::erf`]).
#[inline(always)]
pub(crate) fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + simd::erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// One row of output: `+ b`, `+ res`, then the activation.
#[inline(always)]
fn bias_act_body(row: &mut [f32], b: Option<&[f32]>, res: Option<&[f32]>, act: Activation) {
    if let Some(b) = b {
        for (v, bias) in row.iter_mut().zip(b) {
            *v += bias;
        }
    }
    if let Some(r) = res {
        for (v, r) in row.iter_mut().zip(r) {
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

multiversion!(pub(crate) fn bias_act(row: &mut [f32], b: Option<&[f32]>, res: Option<&[f32]>, act: Activation) => bias_act_body);

/// `act(x W^T + b + residual)`: `x` [m, k] row-major, `w` the packed `[n, k]` weight,
/// `residual` [m, n] -> [m, n].
pub(crate) fn linear(
    x: &[f32],
    w: &PackedB,
    b: Option<&[f32]>,
    residual: Option<&[f32]>,
    m: usize,
    act: Activation,
    exec: Exec<'_>,
) -> Vec<f32> {
    let a = sgemm::Rows { data: x, ld: w.k() };
    let n = w.n();
    // Every element is written by the product (zeros when k = 0).
    let mut out = buffers::take(m * n);
    let epi = epilogue(n, b, residual, act);
    // A weight in bf16 pairs takes `x` rounded to pairs (the bf16 kernels).
    sgemm::gemm_f32_a(exec, a, m, w, &mut out, n, &epi);
    out
}

/// The fused epilogue of a product with `n` columns: `+ b`, `+ residual` (`[m, n]`), then the
/// activation, applied by the micro-kernels before they store C.
pub(crate) fn epilogue<'a>(
    n: usize,
    b: Option<&'a [f32]>,
    residual: Option<&'a [f32]>,
    act: Activation,
) -> sgemm::Epilogue<'a> {
    sgemm::Epilogue {
        bias: b,
        residual: residual.map(|r| (r, n)),
        act,
        ..Default::default()
    }
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
            for level in crate::backend::cpu::SimdLevel::available() {
                let packed = PackedB::transposed(level, &w, n, k);
                for exec in [
                    Exec::Inline,
                    Exec::Team(crate::backend::cpu::team::test_team()),
                ] {
                    let got = linear(&x, &packed, Some(&b), None, m, Activation::None, exec);
                    let want = naive(&x, &w, &b, m, n, k);
                    for (g, e) in got.iter().zip(&want) {
                        assert!(
                            (g - e).abs() <= 1e-4 * e.abs().max(1.0),
                            "{level:?} {m}x{n}x{k}: {g} vs {e}"
                        );
                    }
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

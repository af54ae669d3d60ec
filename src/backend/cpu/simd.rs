//! Fast paths for the hand-written CPU loops.
//!
//! The crate is compiled for the baseline x86-64 target so that it runs on any x86-64 CPU; the
//! GEMM micro-kernels dispatch on CPU features by themselves (`sgemm`), and [`multiversion!`]
//! does the same for our own row loops: it compiles a loop three times (baseline, AVX2+FMA,
//! AVX-512) and picks at run time.
//! The loops are written so that they vectorise without `-ffast-math` (several independent
//! accumulators, no calls into libm): [`exp`] and [`erf`] are our own polynomial versions.

/// True when the CPU has AVX2 and FMA (checked once).
#[inline]
pub(crate) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// True when the row loops may use AVX-512: the CPU has AVX-512F/BW/DQ/VL and `APPARATE_SIMD`
/// does not ask for a narrower level (so that `APPARATE_SIMD=avx2` tests the AVX2 loops on an
/// AVX-512 machine too). Checked once.
#[inline]
pub(crate) fn avx512_rows() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            let capped = std::env::var("APPARATE_SIMD")
                .is_ok_and(|v| matches!(v.trim(), "avx2" | "generic"));
            !capped
                && avx2_fma()
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512dq")
                && std::arch::is_x86_feature_detected!("avx512vl")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// True when the row loops may use AVX2+FMA: the CPU has them and `APPARATE_SIMD` is not
/// `generic`. Checked once.
#[inline]
pub(crate) fn avx2_rows() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        avx2_fma() && !std::env::var("APPARATE_SIMD").is_ok_and(|v| v.trim() == "generic")
    })
}

/// `fn NAME(args) -> R => BODY` defines `NAME`, which runs `BODY` (an `#[inline(always)]`
/// function with the same signature) compiled for AVX-512 or AVX2+FMA when the CPU has them
/// ([`avx512_rows`], [`avx2_rows`]), else for the baseline target.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:ident) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if $crate::backend::cpu::simd::avx512_rows() {
                    // SAFETY: the CPU supports these AVX-512 subsets (checked at run time).
                    return unsafe { wide($($arg),*) };
                }
                if $crate::backend::cpu::simd::avx2_rows() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                    return unsafe { fast($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Sum with 8 independent accumulators (vectorises; a plain `iter().sum()` cannot be reordered).
#[inline(always)]
pub(crate) fn sum(a: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = a.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for k in 0..8 {
            acc[k] += c[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Dot product with 8 independent accumulators (vectorises, like [`sum`]).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `e^x` to within a few ulp for `x` in [-87, 88]; inputs outside are clamped to that range.
/// Range reduction `x = n ln2 + r`, `|r| <= ln2 / 2`, then a degree-7 Taylor polynomial
/// (truncation error `r^8 / 8! < 6e-9`) scaled by `2^n` built from the exponent bits.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n * LN2_HI is exact for |n| < 2^9.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E).round();
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

/// `erf(x)` within 4e-7 absolute: `x P(x^2) / Q(x^2)` on `|x| <= 3.9` (a rational fit made for
/// this crate by weighted least squares; beyond 3.9, `erf` is 1 to f32 precision).
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    const P: [f32; 7] = [
        std::f32::consts::FRAC_2_SQRT_PI,
        0.184_703_14,
        0.054_274_563,
        0.003_832_060_1,
        3.802_043_8e-4,
        4.712_507e-6,
        -1.330_514_5e-8,
    ];
    const Q: [f32; 6] = [
        1.0,
        0.497_022_42,
        0.113_772_85,
        0.015_429_527,
        0.001_304_765,
        6.337_224e-5,
    ];
    let xc = x.clamp(-3.9, 3.9);
    let z = xc * xc;
    let mut p = P[6];
    for &c in P[..6].iter().rev() {
        p = p * z + c;
    }
    let mut q = Q[5];
    for &c in Q[..5].iter().rev() {
        q = q * z + c;
    }
    (xc * p / q).clamp(-1.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_the_range() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp(-1000.0), exp(-87.0));
        assert!(exp(0.0) == 1.0);
    }

    #[test]
    fn erf_is_accurate_over_the_range() {
        let mut worst = 0.0f32;
        let mut x = -6.0f32;
        while x < 6.0 {
            worst = worst.max((erf(x) - libm::erff(x)).abs());
            x += 0.000_97;
        }
        assert!(worst < 5e-7, "worst absolute error {worst}");
    }

    #[test]
    fn sum_handles_tails() {
        let a: Vec<f32> = (0..19).map(|i| i as f32).collect();
        assert_eq!(sum(&a), 171.0);
    }
}

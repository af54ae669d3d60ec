//! Matrix-vector and matrix-matrix products on block-quantized weights, without expanding them:
//! each activation vector is quantized once to 8-bit blocks ([`Q8Activations`]), and each weight
//! row is a sum of per-block integer dot products scaled by the two blocks' scales. This is how
//! a decode step reads the whole model once per token at a fifth of the bytes of f32; with a
//! batch ([`matmul`]) each weight row is read once for all the batch's vectors.
//!
//! Q4_1 weights (`w = d q + m`, `q` in 0..15) against Q8 activations (`x = dx qx`):
//! `sum w x = d dx sum(q qx) + m dx sum(qx)`, and `dx sum(qx)` is kept per activation block so
//! the minimum costs one multiply per block. Q8_0 weights: `sum w x = d dx sum(q qx)`.
//! Each type has a plain Rust loop (any CPU) and an AVX2 one (picked at run time when the CPU
//! has AVX2, FMA and F16C): the compiler did not vectorise the nibble unpacking with 32-bit sums
//! by itself, and the `half` crate's scale conversion per block cost more than the block's
//! products, so the AVX2 loops convert the scales with F16C. The integer sums are exact, so the
//! results differ from the f32 product of the decoded weights only by the activations' 8-bit
//! rounding (tests bound it). `cargo bench --bench qmatvec` times them (docs/results.md).

use crate::gguf::GgmlType;
use crate::quant::{Q4_1_BYTES, Q8_0_BYTES, QK};

/// An activation vector quantized to blocks of [`QK`] values: per block a scale `d`, the codes,
/// and `d * sum(codes)`.
#[derive(Clone, Debug, Default)]
pub struct Q8Activations {
    d: Vec<f32>,
    sum: Vec<f32>,
    q: Vec<i8>,
}

impl Q8Activations {
    /// Quantizes `x` (a whole number of blocks): scale `max |x| / 127`, codes rounded. Panics
    /// when `x` is not whole blocks: callers size activations by the weight rows, which the
    /// GGUF reader has checked are whole blocks.
    pub fn quantize(x: &[f32]) -> Q8Activations {
        assert!(
            x.len().is_multiple_of(QK),
            "activations must be whole blocks of {QK}, got {}",
            x.len()
        );
        let blocks = x.len() / QK;
        let mut a = Q8Activations {
            d: Vec::with_capacity(blocks),
            sum: Vec::with_capacity(blocks),
            q: Vec::with_capacity(x.len()),
        };
        for b in x.chunks_exact(QK) {
            let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut s = 0i32;
            for v in b {
                let q = (v * inv).round().clamp(-127.0, 127.0) as i8;
                s += i32::from(q);
                a.q.push(q);
            }
            a.d.push(d);
            a.sum.push(d * s as f32);
        }
        a
    }

    pub fn len(&self) -> usize {
        self.q.len()
    }

    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }
}

fn half(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

#[inline(always)]
fn dot_q4_1_body(row: &[u8], x: &Q8Activations) -> f32 {
    let mut acc = 0f32;
    for (bi, blk) in row.chunks_exact(Q4_1_BYTES).enumerate() {
        let (d, m) = (half(&blk[0..2]), half(&blk[2..4]));
        let codes = &blk[4..];
        let q = &x.q[bi * QK..(bi + 1) * QK];
        let mut isum = 0i32;
        for j in 0..QK / 2 {
            let c = codes[j];
            isum += i32::from(c & 0x0f) * i32::from(q[j])
                + i32::from(c >> 4) * i32::from(q[j + QK / 2]);
        }
        acc += d * x.d[bi] * isum as f32 + m * x.sum[bi];
    }
    acc
}

#[inline(always)]
fn dot_q8_0_body(row: &[u8], x: &Q8Activations) -> f32 {
    let mut acc = 0f32;
    for (bi, blk) in row.chunks_exact(Q8_0_BYTES).enumerate() {
        let d = half(&blk[0..2]);
        let q = &x.q[bi * QK..(bi + 1) * QK];
        let mut isum = 0i32;
        for (&w, &a) in blk[2..].iter().zip(q) {
            isum += i32::from(w as i8) * i32::from(a);
        }
        acc += d * x.d[bi] * isum as f32;
    }
    acc
}

/// Every row against every activation vector; the output is activation-major (`out[i * rows +
/// r]`, a `[xs.len(), rows]` matrix). Rows outermost: a weight row is read once from memory and
/// stays in the L1 cache for the whole batch, which is what batching buys a decode step.
macro_rules! rows_loop {
    ($weights:expr, $xs:expr, $out:expr, $row_bytes:expr, $dot:expr) => {{
        let rows = $out.len() / $xs.len();
        for (r, row) in $weights.chunks_exact($row_bytes).enumerate() {
            for (i, x) in $xs.iter().enumerate() {
                $out[i * rows + r] = $dot(row, x);
            }
        }
    }};
}

fn rows_q4_1(weights: &[u8], xs: &[Q8Activations], out: &mut [f32]) {
    rows_loop!(
        weights,
        xs,
        out,
        xs[0].len() / QK * Q4_1_BYTES,
        dot_q4_1_body
    )
}

fn rows_q8_0(weights: &[u8], xs: &[Q8Activations], out: &mut [f32]) {
    rows_loop!(
        weights,
        xs,
        out,
        xs[0].len() / QK * Q8_0_BYTES,
        dot_q8_0_body
    )
}

/// AVX2, FMA and F16C (the AVX2 loops' scale conversion), checked once.
#[cfg(target_arch = "x86_64")]
fn avx2_f16c() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::simd::avx2_fma() && *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("f16c"))
}

/// Q8_0 rows: AVX2 when the CPU has it (as [`q4_1_rows`]; `maddubs` wants one unsigned
/// operand, so the weights' signs move onto the activations first).
fn q8_0_rows(weights: &[u8], xs: &[Q8Activations], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2_f16c() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked at run time).
        return unsafe { q8_0_rows_avx2(weights, xs, out) };
    }
    rows_q8_0(weights, xs, out)
}

/// Q4_1 rows: AVX2 when the CPU has it. The compiler does not vectorise the nibble unpacking
/// with 32-bit sums on its own (the plain loop ran at a fifth of the f32 product's speed), so
/// this one is written with the instructions: the 16 code bytes become 32 unsigned bytes (low
/// nibbles, then high), `maddubs` multiplies them with the 32 signed activation codes into 16-bit
/// pair sums (at most 2 x 15 x 127, no overflow), `madd` with ones widens to 32 bits.
fn q4_1_rows(weights: &[u8], xs: &[Q8Activations], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2_f16c() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked at run time).
        return unsafe { q4_1_rows_avx2(weights, xs, out) };
    }
    rows_q4_1(weights, xs, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn q8_0_rows_avx2(weights: &[u8], xs: &[Q8Activations], out: &mut [f32]) {
    rows_loop!(
        weights,
        xs,
        out,
        xs[0].len() / QK * Q8_0_BYTES,
        dot_q8_0_avx2
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_1_rows_avx2(weights: &[u8], xs: &[Q8Activations], out: &mut [f32]) {
    rows_loop!(
        weights,
        xs,
        out,
        xs[0].len() / QK * Q4_1_BYTES,
        dot_q4_1_avx2
    )
}

/// The sum of a vector's 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn hsum(acc: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn dot_q8_0_avx2(row: &[u8], x: &Q8Activations) -> f32 {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    for (bi, blk) in row.chunks_exact(Q8_0_BYTES).enumerate() {
        let bits = i32::from(u16::from_le_bytes([blk[0], blk[1]]));
        let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)));
        // SAFETY: `blk[2..]` holds 32 bytes and `x.q` 32 from `bi * QK` (whole blocks,
        // checked by `matmul`); unaligned loads.
        let (w, q) = unsafe {
            (
                _mm256_loadu_si256(blk[2..].as_ptr() as *const __m256i),
                _mm256_loadu_si256(x.q[bi * QK..].as_ptr() as *const __m256i),
            )
        };
        // |w| * (q with w's sign): the same products; -128 does not occur in our codes and
        // llama.cpp's quantizer does not write it either.
        let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(q, w));
        let sums = _mm256_madd_epi16(pairs, ones);
        let scale = _mm256_set1_ps(d * x.d[bi]);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc);
    }
    hsum(acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn dot_q4_1_avx2(row: &[u8], x: &Q8Activations) -> f32 {
    use std::arch::x86_64::*;
    let low = _mm_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut mins = 0f32;
    for (bi, blk) in row.chunks_exact(Q4_1_BYTES).enumerate() {
        // Scale and minimum (two f16) with the CPU's own conversion (F16C).
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([
            blk[0], blk[1], blk[2], blk[3],
        ])));
        let (d, m) = (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1)));
        // SAFETY: `blk[4..]` holds 16 bytes and `x.q` 32 from `bi * QK` (whole blocks,
        // checked by `matmul`); unaligned loads.
        let (codes, q) = unsafe {
            (
                _mm_loadu_si128(blk[4..].as_ptr() as *const __m128i),
                _mm256_loadu_si256(x.q[bi * QK..].as_ptr() as *const __m256i),
            )
        };
        let lo = _mm_and_si128(codes, low);
        let hi = _mm_and_si128(_mm_srli_epi16(codes, 4), low);
        let w = _mm256_set_m128i(hi, lo);
        let pairs = _mm256_maddubs_epi16(w, q);
        let sums = _mm256_madd_epi16(pairs, ones);
        let scale = _mm256_set1_ps(d * x.d[bi]);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc);
        mins += m * x.sum[bi];
    }
    hsum(acc) + mins
}

/// `out = W x` for `out.len()` rows of `ty` blocks (each row `x.len()` values) stored as in a
/// GGUF file. Errors name a type without a kernel or sizes that do not fit.
pub fn matvec(
    ty: GgmlType,
    weights: &[u8],
    x: &Q8Activations,
    out: &mut [f32],
) -> Result<(), String> {
    matmul(ty, weights, std::slice::from_ref(x), out)
}

/// `out[i] = W xs[i]` for every activation vector (all of one length), `out` activation-major
/// (`xs.len()` runs of `rows` values): the batched form of [`matvec`], each weight row read
/// once for the whole batch.
pub fn matmul(
    ty: GgmlType,
    weights: &[u8],
    xs: &[Q8Activations],
    out: &mut [f32],
) -> Result<(), String> {
    let Some(first) = xs.first() else {
        return if out.is_empty() {
            Ok(())
        } else {
            Err("no activation vectors for a non-empty output".into())
        };
    };
    let cols = first.len();
    if let Some(x) = xs.iter().find(|x| x.len() != cols) {
        return Err(format!(
            "activation vectors of {} and {} values in one batch",
            cols,
            x.len()
        ));
    }
    let row_bytes =
        ty.row_bytes(cols as u64)
            .ok_or_else(|| format!("{cols} values are not whole {ty} blocks"))? as usize;
    if cols == 0 || !out.len().is_multiple_of(xs.len()) {
        return Err(format!(
            "an output of {} values for {} activation vectors of {cols}",
            out.len(),
            xs.len()
        ));
    }
    let rows = out.len() / xs.len();
    if weights.len() != row_bytes * rows {
        return Err(format!(
            "{rows} rows of {cols} {ty} values take {} bytes, got {}",
            row_bytes * rows,
            weights.len()
        ));
    }
    match ty {
        GgmlType::Q4_1 => q4_1_rows(weights, xs, out),
        GgmlType::Q8_0 => q8_0_rows(weights, xs, out),
        other => return Err(format!("no quantized matrix-vector kernel for {other}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dequantize_row, quantize_q4_1, quantize_q8_0};

    /// `n` values uniform in `[-scale/2, scale/2)`, seeded.
    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut r = crate::rng::SplitMix::new(seed);
        (0..n).map(|_| r.uniform() * scale * 0.5).collect()
    }

    /// Against the f32 product of the decoded weights: the difference is the activations'
    /// rounding, at most half a step of each block's scale times the block's weights.
    #[test]
    fn quantized_products_match_the_decoded_weights() {
        let (rows, cols) = (7, 96);
        let x = values(cols, 3, 4.0);
        let xq = Q8Activations::quantize(&x);
        for (ty, w) in [
            (GgmlType::Q4_1, quantize_q4_1(&values(rows * cols, 5, 0.2))),
            (GgmlType::Q8_0, quantize_q8_0(&values(rows * cols, 7, 0.2))),
        ] {
            let mut got = vec![0f32; rows];
            matvec(ty, &w, &xq, &mut got).unwrap();
            let rb = ty.row_bytes(cols as u64).unwrap() as usize;
            for (r, g) in got.iter().enumerate() {
                let mut dec = vec![0f32; cols];
                dequantize_row(ty, &w[r * rb..(r + 1) * rb], &mut dec).unwrap();
                let want: f32 = dec.iter().zip(&x).map(|(a, b)| a * b).sum();
                // Each activation is off by at most half a step (amax / 254 of its block).
                let bound: f32 = dec
                    .chunks(QK)
                    .zip(x.chunks(QK))
                    .map(|(w, xb)| {
                        let step = xb.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                        w.iter().map(|v| v.abs()).sum::<f32>() * step * 0.5
                    })
                    .sum::<f32>()
                    + 1e-4;
                assert!(
                    (g - want).abs() <= bound,
                    "{ty} row {r}: {g} against {want} (bound {bound})"
                );
            }
        }
    }

    /// The AVX2 paths and the plain loops give the same sums (up to the order of float adds).
    #[test]
    fn both_paths_agree() {
        let (rows, cols) = (9, 160);
        let xq = Q8Activations::quantize(&values(cols, 13, 2.0));
        type Rows = fn(&[u8], &[Q8Activations], &mut [f32]);
        let cases: [(Vec<u8>, Rows, Rows); 2] = [
            (
                quantize_q4_1(&values(rows * cols, 11, 0.3)),
                q4_1_rows,
                rows_q4_1,
            ),
            (
                quantize_q8_0(&values(rows * cols, 17, 0.3)),
                q8_0_rows,
                rows_q8_0,
            ),
        ];
        for (w, fast_fn, plain_fn) in cases {
            let (mut fast, mut plain) = (vec![0f32; rows], vec![0f32; rows]);
            fast_fn(&w, std::slice::from_ref(&xq), &mut fast);
            plain_fn(&w, std::slice::from_ref(&xq), &mut plain);
            for (a, b) in fast.iter().zip(&plain) {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} against {b}");
            }
        }
    }

    /// A batch gives each vector's own product, laid out activation-major.
    #[test]
    fn a_batch_equals_its_vectors_one_by_one() {
        let (rows, cols) = (5, 64);
        let xs: Vec<Q8Activations> = (0..3)
            .map(|i| Q8Activations::quantize(&values(cols, 20 + i, 2.0)))
            .collect();
        for (ty, w) in [
            (GgmlType::Q4_1, quantize_q4_1(&values(rows * cols, 30, 0.3))),
            (GgmlType::Q8_0, quantize_q8_0(&values(rows * cols, 31, 0.3))),
        ] {
            let mut batch = vec![0f32; 3 * rows];
            matmul(ty, &w, &xs, &mut batch).unwrap();
            for (i, x) in xs.iter().enumerate() {
                let mut one = vec![0f32; rows];
                matvec(ty, &w, x, &mut one).unwrap();
                assert_eq!(
                    &batch[i * rows..(i + 1) * rows],
                    &one[..],
                    "{ty} vector {i}"
                );
            }
        }
        let short = Q8Activations::quantize(&[0.0; 32]);
        let e = matmul(
            GgmlType::Q8_0,
            &[0; 68],
            &[xs[0].clone(), short],
            &mut [0f32; 2],
        )
        .unwrap_err();
        assert!(e.contains("64 and 32"), "{e}");
        matmul(GgmlType::Q8_0, &[], &[], &mut []).unwrap();
        assert!(matmul(GgmlType::Q8_0, &[], &[], &mut [0.0]).is_err());
        assert!(matmul(GgmlType::Q8_0, &[0; 68], &xs[..2], &mut [0f32; 3]).is_err());
    }

    #[test]
    fn sizes_and_types_are_checked() {
        let xq = Q8Activations::quantize(&[0.5; 64]);
        let mut out = [0f32; 2];
        let e = matvec(GgmlType::Q4_1, &[0; 79], &xq, &mut out).unwrap_err();
        assert!(e.contains("take 80 bytes"), "{e}");
        let e = matvec(GgmlType::Q6K, &[0; 420], &xq, &mut out).unwrap_err();
        assert!(
            e.contains("not whole Q6_K blocks") || e.contains("Q6_K"),
            "{e}"
        );
        let e = matvec(GgmlType::F16, &[0; 256], &xq, &mut out).unwrap_err();
        assert!(e.contains("no quantized"), "{e}");
        // All-zero activations quantize to zero scales and codes.
        let z = Q8Activations::quantize(&[0.0; 32]);
        let w = quantize_q4_1(&[1.0; 32]);
        let mut o = [1f32];
        matvec(GgmlType::Q4_1, &w, &z, &mut o).unwrap();
        assert_eq!(o[0], 0.0);
    }
}

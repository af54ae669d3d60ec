//! Products of block-quantized weights with f32 activations: each weight block is decoded to 32
//! floats in registers (`d q + m`, or `d q`) and multiplied with the activations as they are,
//! so the result is the f32 product of the decoded weights up to the order of the sums. This is
//! the CPU decoder's default: the 8-bit activations of [`super::qmatvec`] (llama.cpp's way)
//! change the last-position logits of SmolLM2-135M by up to about 1.2 against transformers and
//! move greedy generation off the reference in 16 of 20 prompts; this path matches it
//! (docs/results.md). Weights are still read as blocks, a fifth of the bytes of f32.
//!
//! Activations go in tiles of `TILE` (4) rows: each weight block is decoded once per tile and
//! used for all its rows, so a prefill's rows share the decoding. AVX2 + FMA + F16C when the CPU
//! has them, else a plain loop over [`crate::quant::dequantize_row`].

use crate::gguf::GgmlType;
use crate::quant::{Q4_1_BYTES, Q8_0_BYTES, QK, dequantize_row};

/// Activation rows per pass over the weights.
const TILE: usize = 4;

/// `out = x W^T`: `x` is `m` rows of `cols` f32 values, `weights` `rows` rows of `cols` values
/// stored as `ty` blocks; `out` is `[m, rows]`. Errors name an unsupported type or sizes that
/// do not fit.
pub fn matmul(
    ty: GgmlType,
    weights: &[u8],
    x: &[f32],
    cols: usize,
    out: &mut [f32],
) -> Result<(), String> {
    let block = match ty {
        GgmlType::Q4_1 => Q4_1_BYTES,
        GgmlType::Q8_0 => Q8_0_BYTES,
        other => return Err(format!("no quantized product for {other}")),
    };
    if cols == 0 || !cols.is_multiple_of(QK) || !x.len().is_multiple_of(cols) {
        return Err(format!(
            "{} activations in rows of {cols}: not whole rows of {QK}-value blocks",
            x.len()
        ));
    }
    let m = x.len() / cols;
    let row_bytes = cols / QK * block;
    if m == 0 || !out.len().is_multiple_of(m) || weights.len() != out.len() / m * row_bytes {
        return Err(format!(
            "{} bytes of {ty} weights in rows of {cols}, {m} activation rows and {} outputs do not fit",
            weights.len(),
            out.len()
        ));
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_f16c() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked at run time); sizes checked above.
        unsafe { matmul_avx2(ty, weights, x, cols, out) };
        return Ok(());
    }
    matmul_plain(ty, weights, x, cols, out)
}

fn matmul_plain(
    ty: GgmlType,
    weights: &[u8],
    x: &[f32],
    cols: usize,
    out: &mut [f32],
) -> Result<(), String> {
    let m = x.len() / cols;
    let rows = out.len() / m;
    let row_bytes = weights.len() / rows;
    let block = row_bytes / (cols / QK);
    let mut w = [0f32; QK];
    for r in 0..rows {
        let row = &weights[r * row_bytes..(r + 1) * row_bytes];
        let mut acc = vec![0f32; m];
        for (b, blk) in row.chunks_exact(block).enumerate() {
            dequantize_row(ty, blk, &mut w)?;
            for (i, a) in acc.iter_mut().enumerate() {
                let xs = &x[i * cols + b * QK..i * cols + (b + 1) * QK];
                *a += super::simd::dot(&w, xs);
            }
        }
        for (i, a) in acc.into_iter().enumerate() {
            out[i * rows + r] = a;
        }
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
fn avx2_f16c() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::simd::avx2_fma() && *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("f16c"))
}

/// One block decoded into four vectors of 8 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn decode_avx2(ty: GgmlType, blk: &[u8]) -> [std::arch::x86_64::__m256; 4] {
    use std::arch::x86_64::*;
    // SAFETY (loads): `blk` is one whole block (20 or 34 bytes), as the callers slice it.
    unsafe {
        if ty == GgmlType::Q4_1 {
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([
                blk[0], blk[1], blk[2], blk[3],
            ])));
            let d = _mm256_set1_ps(_mm_cvtss_f32(dm));
            let m = _mm256_set1_ps(_mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1)));
            let codes = _mm_loadu_si128(blk[4..].as_ptr() as *const __m128i);
            let low = _mm_set1_epi8(0x0f);
            // Low nibbles are values 0..16, high nibbles 16..32.
            let lo = _mm_and_si128(codes, low);
            let hi = _mm_and_si128(_mm_srli_epi16(codes, 4), low);
            let f = |v: __m128i| _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), d, m);
            [
                f(lo),
                f(_mm_srli_si128(lo, 8)),
                f(hi),
                f(_mm_srli_si128(hi, 8)),
            ]
        } else {
            let bits = i32::from(u16::from_le_bytes([blk[0], blk[1]]));
            let d = _mm256_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits))));
            let q = blk[2..].as_ptr();
            let f = |k: usize| {
                let v = _mm_loadl_epi64(q.add(8 * k) as *const __m128i);
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d)
            };
            [f(0), f(1), f(2), f(3)]
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn matmul_avx2(ty: GgmlType, weights: &[u8], x: &[f32], cols: usize, out: &mut [f32]) {
    use super::qmatvec::hsum;
    use std::arch::x86_64::*;
    let m = x.len() / cols;
    let rows = out.len() / m;
    let row_bytes = weights.len() / rows;
    let block = row_bytes / (cols / QK);
    for t0 in (0..m).step_by(TILE) {
        let tile = (m - t0).min(TILE);
        for r in 0..rows {
            let row = &weights[r * row_bytes..(r + 1) * row_bytes];
            // Two accumulators per activation row (halves of the block), so the FMAs of one
            // row are two independent chains.
            let mut acc = [[_mm256_setzero_ps(); 2]; TILE];
            for (b, blk) in row.chunks_exact(block).enumerate() {
                let w = decode_avx2(ty, blk);
                for (i, a) in acc.iter_mut().enumerate().take(tile) {
                    let xs = x[(t0 + i) * cols + b * QK..].as_ptr();
                    // SAFETY: 32 values from `b * QK` lie inside the row (whole blocks).
                    unsafe {
                        a[0] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xs), a[0]);
                        a[1] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xs.add(8)), a[1]);
                        a[0] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xs.add(16)), a[0]);
                        a[1] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xs.add(24)), a[1]);
                    }
                }
            }
            for (i, a) in acc.iter().enumerate().take(tile) {
                out[(t0 + i) * rows + r] = hsum(_mm256_add_ps(a[0], a[1]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dequantize_rows, quantize};
    use crate::rng::SplitMix;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut r = SplitMix::new(seed);
        (0..n).map(|_| r.uniform()).collect()
    }

    /// Both paths equal the f32 product of the decoded weights, for batches around the tile.
    #[test]
    fn matches_the_decoded_product() {
        let (rows, cols) = (37, 96);
        for ty in [GgmlType::Q4_1, GgmlType::Q8_0] {
            let w = quantize(ty, &values(rows * cols, 1)).unwrap();
            let mut wf = vec![0f32; rows * cols];
            dequantize_rows(ty, &w, cols, &mut wf).unwrap();
            for m in [1, 3, 4, 5, 9] {
                let x = values(m * cols, 2 + m as u64);
                let want: Vec<f32> = (0..m)
                    .flat_map(|i| {
                        let xi = &x[i * cols..(i + 1) * cols];
                        wf.chunks(cols)
                            .map(|r| r.iter().zip(xi).map(|(a, b)| a * b).sum::<f32>())
                            .collect::<Vec<_>>()
                    })
                    .collect();
                let mut fast = vec![0f32; m * rows];
                matmul(ty, &w, &x, cols, &mut fast).unwrap();
                let mut plain = vec![0f32; m * rows];
                matmul_plain(ty, &w, &x, cols, &mut plain).unwrap();
                for (k, ((f, p), w)) in fast.iter().zip(&plain).zip(&want).enumerate() {
                    assert!((f - w).abs() < 1e-4, "{ty} m={m} [{k}]: {f} vs {w}");
                    assert!((p - w).abs() < 1e-4, "{ty} m={m} [{k}]: {p} vs {w}");
                }
            }
        }
    }

    #[test]
    fn sizes_and_types_are_refused() {
        let w = quantize(GgmlType::Q8_0, &values(64, 1)).unwrap();
        let mut out = vec![0f32; 2];
        assert!(matmul(GgmlType::F32, &w, &[0.0; 32], 32, &mut out).is_err());
        assert!(matmul(GgmlType::Q8_0, &w, &[0.0; 31], 31, &mut out).is_err());
        assert!(matmul(GgmlType::Q8_0, &w, &[0.0; 32], 32, &mut [0f32; 3]).is_err());
        assert!(matmul(GgmlType::Q8_0, &w, &[0.0; 32], 32, &mut out).is_ok());
    }
}

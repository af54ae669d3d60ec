//! Products of block-quantized weights with f32 activations: each weight block is decoded to 32
//! floats in registers (`d q + m`, or `d q`) and multiplied with the activations as they are,
//! so the result is the f32 product of the decoded weights up to the order of the sums. This is
//! the CPU decoder's default: the 8-bit activations of [`super::qmatvec`] (llama.cpp's way)
//! change the last-position logits of SmolLM2-135M by up to about 1.2 against transformers and
//! move greedy generation off the reference in 16 of 20 prompts; this path matches it
//! (docs/results.md). Weights are still read as blocks, a fifth of the bytes of f32.
//!
//! Activations go in tiles of rows: each weight block is decoded once per tile and used for all
//! its rows, so a batch's or a prefill's rows share the decoding. Chosen at run time by CPU
//! features and shape: AVX-512 tiles of 8 rows for two rows or more (`APPARATE_CPU_AVX512=0`
//! turns them off, for CPUs where 512-bit operations do not pay), AVX2 + FMA + F16C tiles of 4
//! otherwise, else a plain loop over [`crate::quant::dequantize_row`].

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
    // A single activation row has no tile to share a decoded block: there the AVX2 loop is
    // faster, measured on an AMD EPYC (Zen 4: 11.1 against 15.2 ms per token at batch 1, one
    // thread), while AVX-512 tiles of 8 rows are 7-14% faster from batch 8 (docs/results.md).
    #[cfg(target_arch = "x86_64")]
    if m >= 2 && avx512() {
        // SAFETY: the CPU has AVX-512F, AVX2, FMA and F16C (checked at run time); sizes
        // checked above.
        unsafe { matmul_avx512(ty, weights, x, cols, out) };
        return Ok(());
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

#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    avx2_f16c()
        && *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::env::var("APPARATE_CPU_AVX512").as_deref() != Ok("0")
        })
}

/// One block decoded into two vectors of 16 values (the same values as [`decode_avx2`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
fn decode_avx512(ty: GgmlType, blk: *const u8) -> [std::arch::x86_64::__m512; 2] {
    use std::arch::x86_64::*;
    // SAFETY (loads): `blk` points at one whole block (20 or 34 bytes), as the callers
    // compute it.
    unsafe {
        if ty == GgmlType::Q4_1 {
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()));
            let d = _mm512_set1_ps(_mm_cvtss_f32(dm));
            let m = _mm512_set1_ps(_mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1)));
            // Low nibbles are values 0..16, high nibbles 16..32 (as in `decode_avx2`).
            let codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.add(4) as *const __m128i));
            let f = |v: __m512i| _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), d, m);
            [
                f(_mm512_and_si512(codes, _mm512_set1_epi32(0x0f))),
                f(_mm512_srli_epi32(codes, 4)),
            ]
        } else {
            let bits = i32::from((blk as *const u16).read_unaligned());
            let d = _mm512_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits))));
            let q = blk.add(2);
            let f = |k: usize| {
                let v = _mm_loadu_si128(q.add(16 * k) as *const __m128i);
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), d)
            };
            [f(0), f(1)]
        }
    }
}

/// `out` rows `t0..t0 + T` (of `rows` outputs each) for weight rows `r0..r0 + R`: each block
/// is decoded once for `T` activation rows, and `R` weight rows share each load of the
/// activations. Two accumulators per (weight row, activation row): the block's halves.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
// Index loops: one load of an activation row's values serves every weight row's accumulator.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn tile_avx512<const R: usize, const T: usize>(
    ty: GgmlType,
    weights: &[u8],
    row_bytes: usize,
    block: usize,
    x: &[f32],
    cols: usize,
    out: &mut [f32],
    rows: usize,
    r0: usize,
    t0: usize,
) {
    use std::arch::x86_64::*;
    let blocks = cols / QK;
    let mut acc = [[[_mm512_setzero_ps(); 2]; T]; R];
    let w0 = weights[r0 * row_bytes..(r0 + R) * row_bytes].as_ptr();
    let x0 = x[t0 * cols..(t0 + T) * cols].as_ptr();
    for b in 0..blocks {
        // SAFETY: block `b` of weight rows `r0..r0 + R` and values `b * QK..(b + 1) * QK` of
        // activation rows `t0..t0 + T` lie inside the slices taken above.
        unsafe {
            let w: [[__m512; 2]; R] =
                std::array::from_fn(|r| decode_avx512(ty, w0.add(r * row_bytes + b * block)));
            for i in 0..T {
                let xs = x0.add(i * cols + b * QK);
                let (xa, xb) = (_mm512_loadu_ps(xs), _mm512_loadu_ps(xs.add(16)));
                for r in 0..R {
                    acc[r][i][0] = _mm512_fmadd_ps(w[r][0], xa, acc[r][i][0]);
                    acc[r][i][1] = _mm512_fmadd_ps(w[r][1], xb, acc[r][i][1]);
                }
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        for (i, a) in a.iter().enumerate() {
            out[(t0 + i) * rows + r0 + r] = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
        }
    }
}

/// The AVX-512 product: activation rows in tiles of 8 (then 4, 2, 1); a single activation row
/// goes with two weight rows at a time, so the multiply-adds still form four independent
/// chains.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn matmul_avx512(ty: GgmlType, weights: &[u8], x: &[f32], cols: usize, out: &mut [f32]) {
    let m = x.len() / cols;
    let rows = out.len() / m;
    let row_bytes = weights.len() / rows;
    let block = row_bytes / (cols / QK);
    let args = (ty, weights, row_bytes, block, x, cols);
    let mut t0 = 0;
    while t0 < m {
        let (ty, weights, row_bytes, block, x, cols) = args;
        let left = m - t0;
        let step = match left {
            8.. => 8,
            4..=7 => 4,
            2 | 3 => 2,
            _ => 1,
        };
        let mut r = 0;
        while r < rows {
            let o = &mut *out;
            match step {
                8 => tile_avx512::<1, 8>(ty, weights, row_bytes, block, x, cols, o, rows, r, t0),
                4 => tile_avx512::<1, 4>(ty, weights, row_bytes, block, x, cols, o, rows, r, t0),
                2 => tile_avx512::<1, 2>(ty, weights, row_bytes, block, x, cols, o, rows, r, t0),
                _ if r + 1 < rows => {
                    tile_avx512::<2, 1>(ty, weights, row_bytes, block, x, cols, o, rows, r, t0);
                    r += 1;
                }
                _ => tile_avx512::<1, 1>(ty, weights, row_bytes, block, x, cols, o, rows, r, t0),
            }
            r += 1;
        }
        t0 += step;
    }
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
            // Low nibbles are values 0..16, high nibbles 16..32: each code byte is widened
            // to a 32-bit lane once (straight from memory) and both nibbles taken there.
            let codes = blk[4..].as_ptr();
            let low = _mm256_set1_epi32(0x0f);
            let a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(codes as *const __m128i));
            let b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(codes.add(8) as *const __m128i));
            let f = |v: __m256i| _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), d, m);
            [
                f(_mm256_and_si256(a, low)),
                f(_mm256_and_si256(b, low)),
                f(_mm256_srli_epi32(a, 4)),
                f(_mm256_srli_epi32(b, 4)),
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
        // 37 rows: an odd one left after the pairs of a single activation row.
        for ty in [GgmlType::Q4_1, GgmlType::Q8_0] {
            let w = quantize(ty, &values(rows * cols, 1)).unwrap();
            let mut wf = vec![0f32; rows * cols];
            dequantize_rows(ty, &w, cols, &mut wf).unwrap();
            for m in [1, 2, 3, 4, 5, 7, 8, 9, 17] {
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
                // Each vector path on its own, where this CPU has it (`matmul` takes the
                // widest).
                let mut avx2 = plain.clone();
                #[cfg(target_arch = "x86_64")]
                if avx2_f16c() {
                    // SAFETY: the CPU has the features; sizes as `matmul` checked.
                    unsafe { matmul_avx2(ty, &w, &x, cols, &mut avx2) };
                }
                for (k, (((f, p), a), w)) in
                    fast.iter().zip(&plain).zip(&avx2).zip(&want).enumerate()
                {
                    assert!((f - w).abs() < 1e-4, "{ty} m={m} [{k}]: {f} vs {w}");
                    assert!((p - w).abs() < 1e-4, "{ty} m={m} [{k}]: {p} vs {w}");
                    assert!((a - w).abs() < 1e-4, "{ty} m={m} [{k}]: {a} vs {w}");
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

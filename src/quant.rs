//! Block-quantized weights as GGUF stores them (llama.cpp's layouts), kept as blocks: the
//! reference decoding of a row, and Q8_0 quantization of f32 values (what activations become
//! for an integer dot product, and how tests make blocks). The fast kernels that work on the
//! blocks directly are checked against these.

use half::f16;

use crate::gguf::GgmlType;

/// Values per Q4_0/Q4_1/Q8_0 block.
pub const QK: usize = 32;
/// Bytes of a Q4_1 block: f16 scale, f16 minimum, 16 bytes of 4-bit codes.
pub const Q4_1_BYTES: usize = 20;
/// Bytes of a Q8_0 block: f16 scale, 32 signed codes.
pub const Q8_0_BYTES: usize = 34;
/// Bytes of a Q4_0 block: f16 scale, 16 bytes of 4-bit codes (offset 8).
pub const Q4_0_BYTES: usize = 18;

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Decodes one row stored as `ty` into `out` (its length is the row's value count). Types
/// without a decoder here are refused by name.
pub fn dequantize_row(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), String> {
    let n = out.len();
    let need = ty
        .row_bytes(n as u64)
        .ok_or_else(|| format!("{n} values are not whole {ty} blocks"))? as usize;
    if bytes.len() != need {
        return Err(format!(
            "a {ty} row of {n} values takes {need} bytes, got {}",
            bytes.len()
        ));
    }
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(Q8_0_BYTES)) {
                let d = half_at(b, 0);
                for (v, &q) in o.iter_mut().zip(&b[2..]) {
                    *v = d * f32::from(q as i8);
                }
            }
        }
        GgmlType::Q4_1 => {
            // Low nibbles are values 0..16 of the block, high nibbles 16..32.
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(Q4_1_BYTES)) {
                let (d, m) = (half_at(b, 0), half_at(b, 2));
                for (j, &q) in b[4..].iter().enumerate() {
                    o[j] = d * f32::from(q & 0x0f) + m;
                    o[j + QK / 2] = d * f32::from(q >> 4) + m;
                }
            }
        }
        GgmlType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(Q4_0_BYTES)) {
                let d = half_at(b, 0);
                for (j, &q) in b[2..].iter().enumerate() {
                    o[j] = d * (f32::from(q & 0x0f) - 8.0);
                    o[j + QK / 2] = d * (f32::from(q >> 4) - 8.0);
                }
            }
        }
        other => return Err(format!("no decoder for {other} blocks")),
    }
    Ok(())
}

/// Decodes rows of `cols` values stored as `ty` one after another (a whole tensor) into `out`,
/// whose length is a whole number of rows.
pub fn dequantize_rows(
    ty: GgmlType,
    bytes: &[u8],
    cols: usize,
    out: &mut [f32],
) -> Result<(), String> {
    let row_bytes =
        ty.row_bytes(cols as u64)
            .ok_or_else(|| format!("{cols} values are not whole {ty} blocks"))? as usize;
    if cols == 0 || !out.len().is_multiple_of(cols) || bytes.len() != out.len() / cols * row_bytes {
        return Err(format!(
            "{} values in rows of {cols} do not match {} bytes of {ty}",
            out.len(),
            bytes.len()
        ));
    }
    for (o, b) in out.chunks_mut(cols).zip(bytes.chunks(row_bytes)) {
        dequantize_row(ty, b, o)?;
    }
    Ok(())
}

/// Quantizes `x` to `ty` (Q8_0 or Q4_1; a whole number of 32-value blocks).
pub fn quantize(ty: GgmlType, x: &[f32]) -> Result<Vec<u8>, String> {
    match ty {
        GgmlType::Q8_0 => Ok(quantize_q8_0(x)),
        GgmlType::Q4_1 => Ok(quantize_q4_1(x)),
        other => Err(format!("no quantizer for {other}")),
    }
}

/// Quantizes `x` (a whole number of 32-value blocks) to Q8_0: per block the scale is
/// `max |x| / 127` (stored as f16) and each code `round(x / scale)`.
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    assert!(
        x.len().is_multiple_of(QK),
        "Q8_0 needs whole blocks of {QK} values, got {}",
        x.len()
    );
    let mut out = Vec::with_capacity(x.len() / QK * Q8_0_BYTES);
    for block in x.chunks_exact(QK) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(
            block
                .iter()
                .map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8),
        );
    }
    out
}

/// Quantizes `x` to Q4_1 (per block: minimum `m`, scale `(max - min) / 15`, codes
/// `round((x - m) / d)`): how tests make Q4_1 blocks with known contents.
pub fn quantize_q4_1(x: &[f32]) -> Vec<u8> {
    assert!(
        x.len().is_multiple_of(QK),
        "Q4_1 needs whole blocks of {QK} values, got {}",
        x.len()
    );
    let mut out = Vec::with_capacity(x.len() / QK * Q4_1_BYTES);
    for block in x.chunks_exact(QK) {
        let lo = block.iter().fold(f32::INFINITY, |m, &v| m.min(v));
        let hi = block.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let d = (hi - lo) / 15.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(lo).to_le_bytes());
        let code = |v: f32| ((v - lo) * inv).round().clamp(0.0, 15.0) as u8;
        for j in 0..QK / 2 {
            out.push(code(block[j]) | (code(block[j + QK / 2]) << 4));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_blocks_decode_to_their_values() {
        // Q8_0: scale 0.5, codes -3..29.
        let mut b = f16::from_f32(0.5).to_le_bytes().to_vec();
        b.extend((0..32).map(|i| (i as i8 - 3) as u8));
        let mut out = [0f32; 32];
        dequantize_row(GgmlType::Q8_0, &b, &mut out).unwrap();
        assert_eq!(out[0], -1.5);
        assert_eq!(out[31], 14.0);
        // Q4_1: d 2, m -1, byte j holds code j (low) and 15 - j (high).
        let mut b = f16::from_f32(2.0).to_le_bytes().to_vec();
        b.extend_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        dequantize_row(GgmlType::Q4_1, &b, &mut out).unwrap();
        assert_eq!(out[0], -1.0);
        assert_eq!(out[15], 29.0);
        assert_eq!(out[16], 29.0);
        assert_eq!(out[31], -1.0);
        // Q4_0: d 1, codes offset by 8.
        let mut b = f16::from_f32(1.0).to_le_bytes().to_vec();
        b.extend([0x80u8; 16]);
        dequantize_row(GgmlType::Q4_0, &b, &mut out).unwrap();
        assert_eq!(&out[..2], &[-8.0, -8.0]);
        assert_eq!(&out[16..18], &[0.0, 0.0]);
    }

    #[test]
    fn quantizing_round_trips_within_half_a_step() {
        let mut r = crate::rng::SplitMix::new(12345);
        let x: Vec<f32> = (0..256).map(|_| r.uniform() * 3.0).collect();
        for (ty, q) in [
            (GgmlType::Q8_0, quantize_q8_0(&x)),
            (GgmlType::Q4_1, quantize_q4_1(&x)),
        ] {
            let mut y = vec![0f32; x.len()];
            dequantize_row(ty, &q, &mut y).unwrap();
            for (b, (xb, yb)) in x.chunks(QK).zip(y.chunks(QK)).enumerate() {
                let span = xb.iter().fold(0f32, |m, v| m.max(v.abs())) * 2.0;
                let step = if ty == GgmlType::Q8_0 {
                    span / 254.0
                } else {
                    span / 15.0
                };
                for (a, c) in xb.iter().zip(yb) {
                    // Half a step, plus the f16 rounding of the scale and minimum.
                    assert!(
                        (a - c).abs() <= step * 0.5 + 2e-3 * a.abs().max(1.0),
                        "{ty} block {b}: {a} -> {c}"
                    );
                }
            }
        }
    }

    #[test]
    fn whole_tensors_decode_row_by_row() {
        let x: Vec<f32> = (0..96).map(|i| i as f32 / 8.0 - 6.0).collect();
        let q = quantize(GgmlType::Q8_0, &x).unwrap();
        let mut all = vec![0f32; 96];
        dequantize_rows(GgmlType::Q8_0, &q, 32, &mut all).unwrap();
        let mut row = [0f32; 32];
        dequantize_row(GgmlType::Q8_0, &q[34..68], &mut row).unwrap();
        assert_eq!(&all[32..64], &row[..]);
        assert!(dequantize_rows(GgmlType::Q8_0, &q, 32, &mut [0f32; 64]).is_err());
        assert!(dequantize_rows(GgmlType::Q8_0, &q, 0, &mut []).is_err());
        assert!(quantize(GgmlType::Q6K, &x).is_err());
    }

    #[test]
    fn wrong_sizes_and_types_are_refused() {
        let mut out = [0f32; 32];
        let e = dequantize_row(GgmlType::Q8_0, &[0; 33], &mut out).unwrap_err();
        assert!(e.contains("34 bytes"), "{e}");
        let mut odd = [0f32; 31];
        assert!(dequantize_row(GgmlType::Q8_0, &[0; 34], &mut odd).is_err());
        let e = dequantize_row(GgmlType::Q6K, &[0; 210], &mut [0f32; 256]).unwrap_err();
        assert!(e.contains("Q6_K"), "{e}");
    }
}

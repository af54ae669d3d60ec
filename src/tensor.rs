//! Storage dtypes and borrowed tensor views over file bytes.

use std::borrow::Cow;

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

/// Storage dtype of a tensor in a model file. Compute is always f32 on the CPU backend;
/// GPU backends keep f16/bf16 in storage and accumulate in f32.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    pub(crate) fn from_safetensors(d: safetensors::Dtype) -> Option<DType> {
        match d {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::F16 => Some(DType::F16),
            safetensors::Dtype::BF16 => Some(DType::BF16),
            _ => None,
        }
    }

    pub(crate) fn to_safetensors(self) -> safetensors::Dtype {
        match self {
            DType::F32 => safetensors::Dtype::F32,
            DType::F16 => safetensors::Dtype::F16,
            DType::BF16 => safetensors::Dtype::BF16,
        }
    }

    /// Encode f32 values into this dtype's little-endian bytes (round to nearest even).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            DType::F32 => bytemuck::cast_slice(values).to_vec(),
            DType::F16 => values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            DType::BF16 => values
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
        }
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "f16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            other => Err(format!(
                "unknown dtype `{other}` (expected f32, f16 or bf16)"
            )),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A tensor as stored in a (memory-mapped) file: dtype, shape and raw little-endian bytes.
#[derive(Copy, Clone, Debug)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl<'a> TensorView<'a> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values as f32. Zero-copy when stored as f32 at a 4-byte aligned address (our
    /// writer aligns every tensor); otherwise decoded (f16/bf16 upcast exactly).
    pub fn to_f32(&self) -> Cow<'a, [f32]> {
        match self.dtype {
            DType::F32 => match bytemuck::try_cast_slice::<u8, f32>(self.bytes) {
                Ok(s) => Cow::Borrowed(s),
                Err(_) => Cow::Owned(
                    self.bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                ),
            },
            DType::F16 => Cow::Owned(
                self.bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            DType::BF16 => Cow::Owned(
                self.bytes
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
        }
    }

    /// Index of the first NaN or infinity, if any.
    pub fn first_non_finite(&self) -> Option<usize> {
        self.to_f32().iter().position(|v| !v.is_finite())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_roundtrip_each_dtype() {
        let vals = [0.0f32, 1.0, -2.5, 0.333, 65504.0, 1e-3];
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let bytes = dt.encode(&vals);
            assert_eq!(bytes.len(), vals.len() * dt.size());
            let view = TensorView {
                name: "t",
                dtype: dt,
                shape: &[6],
                bytes: &bytes,
            };
            let back = view.to_f32();
            let tol = match dt {
                DType::F32 => 0.0,
                DType::F16 => 1e-3,
                DType::BF16 => 1e-2,
            };
            for (a, b) in vals.iter().zip(back.iter()) {
                assert!((a - b).abs() <= tol * a.abs().max(1.0), "{dt}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn dtype_parses_names() {
        assert_eq!("BF16".parse::<DType>().unwrap(), DType::BF16);
        assert!("int8".parse::<DType>().unwrap_err().contains("int8"));
    }
}

//! Writing containers: tensors are encoded into their storage dtype and the file is written to a
//! temporary name and renamed, so a crash never leaves a half-written model under the real name.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::gguf::GgmlType;
use crate::tensor::DType;

/// A tensor ready to be written.
#[derive(Clone, Debug)]
pub struct OwnedTensor {
    /// Storage dtype of a float tensor (ignored when `blocks` is set).
    pub dtype: DType,
    /// The logical shape (`[rows, cols]` for block-quantized matrices).
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
    /// Block-quantized storage: the bytes are rows of `ty` blocks, written as a `u8` tensor
    /// `[rows, row bytes]` and named in the file's blocks entry ([`BLOCKS_ENTRY`]).
    pub blocks: Option<BlockStorage>,
}

/// How a block-quantized tensor is stored: its block type, and the `u8` shape the container
/// sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockStorage {
    pub ty: GgmlType,
    stored_shape: Vec<usize>,
}

impl OwnedTensor {
    /// Encodes f32 values into `dtype` storage.
    pub fn from_f32(values: &[f32], shape: Vec<usize>, dtype: DType) -> OwnedTensor {
        debug_assert_eq!(values.len(), shape.iter().product::<usize>());
        OwnedTensor {
            dtype,
            shape,
            bytes: dtype.encode(values),
            blocks: None,
        }
    }

    /// `rows` x `cols` values stored as `ty` blocks (kept as they are: Q4_1 or Q8_0).
    pub fn from_blocks(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: Vec<u8>,
    ) -> Result<OwnedTensor> {
        let info = crate::backend::decoder::QInfo::checked(ty, rows, cols, bytes.len())?;
        Ok(OwnedTensor {
            dtype: DType::F32,
            shape: vec![rows, cols],
            blocks: Some(BlockStorage {
                ty,
                stored_shape: vec![rows, info.row_bytes()],
            }),
            bytes,
        })
    }
}

/// Metadata entry naming the block-quantized tensors of a file and their block types, a JSON
/// object `{"tensor name": "Q4_1", ...}`: safetensors has no such dtypes, so these tensors are
/// stored as `u8` `[rows, row bytes]` and this entry says how to read them.
pub const BLOCKS_ENTRY: &str = "apparate.blocks";

impl safetensors::View for &OwnedTensor {
    fn dtype(&self) -> safetensors::Dtype {
        match self.blocks {
            Some(_) => safetensors::Dtype::U8,
            None => self.dtype.to_safetensors(),
        }
    }
    fn shape(&self) -> &[usize] {
        match &self.blocks {
            Some(b) => &b.stored_shape,
            None => &self.shape,
        }
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

pub(crate) fn write_container(
    path: &Path,
    mut metadata: HashMap<String, String>,
    tensors: &[(String, OwnedTensor)],
) -> Result<()> {
    let blocks: std::collections::BTreeMap<&str, &str> = tensors
        .iter()
        .filter_map(|(n, t)| t.blocks.as_ref().map(|b| (n.as_str(), b.ty.name())))
        .collect();
    if !blocks.is_empty() {
        metadata.insert(
            BLOCKS_ENTRY.to_string(),
            serde_json::to_string(&blocks).expect("a map of strings serializes"),
        );
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = std::path::PathBuf::from(tmp);
    let items = tensors.iter().map(|(n, t)| (n.as_str(), t));
    safetensors::serialize_to_file(items, Some(metadata), &tmp).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(io) => Error::io(&tmp, io),
        other => Error::format(path, format!("cannot serialize: {other}")),
    })?;
    // The container library creates files readable by the owner only; a model file is data
    // other users and services read.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Refuses to write a file whose tensors are not exactly `expected` (names and shapes).
pub(crate) fn check_owned_tensor_set(
    path: &Path,
    expected: &[(String, Vec<usize>)],
    tensors: &[(String, OwnedTensor)],
) -> Result<()> {
    for (name, shape) in expected {
        match tensors.iter().find(|(n, _)| n == name) {
            None => return Err(Error::tensor(path, name, "refusing to write: missing")),
            Some((_, t)) if &t.shape != shape => {
                return Err(Error::tensor(
                    path,
                    name,
                    format!(
                        "refusing to write: shape {:?}, expected {:?}",
                        t.shape, shape
                    ),
                ));
            }
            _ => {}
        }
    }
    if let Some((extra, _)) = tensors
        .iter()
        .find(|(n, _)| !expected.iter().any(|(e, _)| e == n))
    {
        return Err(Error::tensor(
            path,
            extra,
            "refusing to write: unexpected tensor",
        ));
    }
    Ok(())
}

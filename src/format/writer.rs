//! Writing containers: tensors are encoded into their storage dtype and the file is written to a
//! temporary name and renamed, so a crash never leaves a half-written model under the real name.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::tensor::DType;

/// A tensor ready to be written.
#[derive(Clone, Debug)]
pub struct OwnedTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl OwnedTensor {
    /// Encodes f32 values into `dtype` storage.
    pub fn from_f32(values: &[f32], shape: Vec<usize>, dtype: DType) -> OwnedTensor {
        debug_assert_eq!(values.len(), shape.iter().product::<usize>());
        OwnedTensor {
            dtype,
            shape,
            bytes: dtype.encode(values),
        }
    }
}

impl safetensors::View for &OwnedTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.to_safetensors()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
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
    metadata: HashMap<String, String>,
    tensors: &[(String, OwnedTensor)],
) -> Result<()> {
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

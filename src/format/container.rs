//! The safetensors container underneath model and ramps files: memory-mapped, validated once,
//! tensors borrowed straight from the mapping.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{SafeTensorError, SafeTensors};

use super::meta::FileKind;
use crate::error::{Error, Result};
use crate::tensor::{DType, TensorView};

/// Where one tensor lives inside the mapping.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub range: std::ops::Range<usize>,
}

pub(crate) struct Container {
    pub path: PathBuf,
    mmap: Mmap,
    pub tensors: BTreeMap<String, TensorInfo>,
    pub metadata: HashMap<String, String>,
}

fn describe(e: SafeTensorError) -> String {
    match e {
        SafeTensorError::HeaderTooSmall => "file is too short to hold a safetensors header".into(),
        SafeTensorError::HeaderTooLarge => {
            "declared header size is larger than the 100 MB safetensors allows".into()
        }
        SafeTensorError::InvalidHeaderLength => {
            "declared header size runs past the end of the file (truncated?)".into()
        }
        SafeTensorError::InvalidHeader(e) => format!("header is not UTF-8: {e}"),
        SafeTensorError::InvalidHeaderDeserialization(e) => {
            format!("header is not valid JSON: {e}")
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            "tensor data does not exactly fill the file (truncated or trailing bytes)".into()
        }
        SafeTensorError::InvalidOffset(t) => format!("tensor `{t}` has invalid data offsets"),
        SafeTensorError::TensorInvalidInfo => {
            "a tensor's shape does not match its byte size".into()
        }
        SafeTensorError::ValidationOverflow => "a tensor's declared size overflows".into(),
        other => format!("invalid safetensors container: {other}"),
    }
}

impl Container {
    /// Maps the file at `path`, which should hold a `kind` file (named in errors).
    pub fn open(path: &Path, kind: FileKind) -> Result<Container> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        // Mapping a folder or a device fails with the OS's "No such device", which says nothing
        // about what was wrong.
        if meta.is_dir() {
            return Err(Error::format(
                path,
                format!("is a directory, expected a {}", kind.file_name()),
            ));
        }
        if !meta.is_file() {
            return Err(Error::format(
                path,
                format!("is not a regular file, expected a {}", kind.file_name()),
            ));
        }
        let len = meta.len();
        if len < 8 {
            return Err(Error::format(
                path,
                format!("file is {len} bytes, too short to be a safetensors file"),
            ));
        }
        // SAFETY: the mapping is read-only and owned by the container. A model file must not be
        // modified while it is loaded (our writer replaces files by rename, which is safe).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, st_meta) =
            SafeTensors::read_metadata(&mmap).map_err(|e| Error::format(path, describe(e)))?;
        let data_start = 8 + header_len;
        let mut tensors = BTreeMap::new();
        for (name, info) in st_meta.tensors() {
            let dtype = DType::from_safetensors(info.dtype).ok_or_else(|| {
                Error::tensor(
                    path,
                    &name,
                    format!("dtype {:?} is not supported (f32, f16 or bf16)", info.dtype),
                )
            })?;
            let (s, e) = info.data_offsets;
            tensors.insert(
                name,
                TensorInfo {
                    dtype,
                    shape: info.shape.clone(),
                    range: data_start + s..data_start + e,
                },
            );
        }
        let metadata = st_meta.metadata().clone().unwrap_or_default();
        Ok(Container {
            path: path.to_path_buf(),
            mmap,
            tensors,
            metadata,
        })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }

    pub fn view(&self, name: &str) -> Option<TensorView<'_>> {
        let (key, info) = self.tensors.get_key_value(name)?;
        Some(TensorView {
            name: key,
            dtype: info.dtype,
            shape: &info.shape,
            bytes: &self.mmap[info.range.clone()],
        })
    }

    /// Parses the JSON metadata entry `key` into `T`, after checking that the file's `kind`
    /// is `want` (so a ramps file handed over as a model is named as such).
    pub fn json_entry<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        want: FileKind,
    ) -> Result<T> {
        let what = match want {
            FileKind::Model => "model file",
            FileKind::Ramps => "ramps file",
        };
        let raw = self.metadata.get(key).ok_or_else(|| {
            Error::format(
                &self.path,
                format!("no `{key}` metadata entry: not an Apparate {what} (make one with `apparate convert`)"),
            )
        })?;
        // Read only `kind` and `format_version` first (other fields are skipped, not built), so
        // that a ramps file handed over as a model, or a newer version, is named as such.
        #[derive(serde::Deserialize)]
        struct Peek {
            kind: Option<FileKind>,
            format_version: Option<u32>,
        }
        let peek: Option<Peek> = serde_json::from_str(raw).ok();
        let (kind, version) = peek.map_or((None, None), |p| (p.kind, p.format_version));
        if let Some(v) = version
            && v != super::meta::FORMAT_VERSION
        {
            return Err(Error::format(
                &self.path,
                format!(
                    "format version {v} is not supported (this build reads version {})",
                    super::meta::FORMAT_VERSION
                ),
            ));
        }
        match kind {
            Some(FileKind::Ramps) if want == FileKind::Model => {
                return Err(Error::format(
                    &self.path,
                    "this is a ramps file, not a model file",
                ));
            }
            Some(FileKind::Model) if want == FileKind::Ramps => {
                return Err(Error::format(
                    &self.path,
                    "this is a model file, not a ramps file",
                ));
            }
            _ => {}
        }
        serde_json::from_str(raw)
            .map_err(|e| Error::format(&self.path, format!("{what} metadata is invalid: {e}")))
    }

    /// Compares the tensors present with the `expected` list: names, shapes, dtypes.
    pub fn check_tensor_set(&self, expected: &[(String, Vec<usize>)]) -> Result<()> {
        let mut want: HashMap<&str, &[usize]> = HashMap::new();
        for (n, s) in expected {
            want.insert(n.as_str(), s.as_slice());
        }
        for (name, shape) in expected {
            let info = self.tensors.get(name).ok_or_else(|| {
                Error::tensor(&self.path, name, "missing (the configuration requires it)")
            })?;
            if &info.shape != shape {
                return Err(Error::tensor(
                    &self.path,
                    name,
                    format!("shape {:?}, expected {:?}", info.shape, shape),
                ));
            }
        }
        if let Some(extra) = self.tensors.keys().find(|n| !want.contains_key(n.as_str())) {
            return Err(Error::tensor(
                &self.path,
                extra,
                "unexpected tensor (not part of this configuration)",
            ));
        }
        Ok(())
    }
}

/// sha256 of bytes as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

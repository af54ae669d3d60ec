//! The safetensors container underneath model and ramps files: memory-mapped, validated once,
//! tensors borrowed straight from the mapping.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{SafeTensorError, SafeTensors};

use super::meta::FileKind;
use super::writer::BLOCKS_ENTRY;
use crate::error::{Error, Result};
use crate::gguf::GgmlType;
use crate::tensor::{DType, TensorView};

/// Where one tensor lives inside the mapping.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// Storage dtype of a float tensor (f32 for a block-quantized one: what it decodes to).
    pub dtype: DType,
    /// Logical shape (`[rows, cols]` of values for a block-quantized matrix).
    pub shape: Vec<usize>,
    /// Block-quantized storage (the file's blocks entry names it): rows of these blocks.
    pub blocks: Option<GgmlType>,
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
        let metadata = st_meta.metadata().clone().unwrap_or_default();
        let blocks = block_types(path, &metadata)?;
        let mut tensors = BTreeMap::new();
        for (name, info) in st_meta.tensors() {
            let (s, e) = info.data_offsets;
            let range = data_start + s..data_start + e;
            if let Some(&ty) = blocks.get(name.as_str()) {
                let shape = block_shape(ty, info.dtype, &info.shape).map_err(|why| {
                    Error::tensor(path, &name, format!("stored as {ty} blocks, but {why}"))
                })?;
                tensors.insert(
                    name,
                    TensorInfo {
                        dtype: DType::F32,
                        shape,
                        blocks: Some(ty),
                        range,
                    },
                );
                continue;
            }
            let dtype = DType::from_safetensors(info.dtype).ok_or_else(|| {
                Error::tensor(
                    path,
                    &name,
                    format!("dtype {:?} is not supported (f32, f16 or bf16, or u8 named in the `{BLOCKS_ENTRY}` entry)", info.dtype),
                )
            })?;
            tensors.insert(
                name,
                TensorInfo {
                    dtype,
                    shape: info.shape.clone(),
                    blocks: None,
                    range,
                },
            );
        }
        if let Some(missing) = blocks.keys().find(|n| !tensors.contains_key(n.as_str())) {
            return Err(Error::format(
                path,
                format!(
                    "the `{BLOCKS_ENTRY}` entry names `{missing}`, which the file does not hold"
                ),
            ));
        }
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

    /// A float tensor's view (None for a missing or block-quantized one).
    pub fn view(&self, name: &str) -> Option<TensorView<'_>> {
        let (key, info) = self.tensors.get_key_value(name)?;
        if info.blocks.is_some() {
            return None;
        }
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

/// The file's blocks entry: tensor name -> block type (Q4_1 or Q8_0, the types with kernels).
fn block_types(
    path: &Path,
    metadata: &HashMap<String, String>,
) -> Result<HashMap<String, GgmlType>> {
    let Some(raw) = metadata.get(BLOCKS_ENTRY) else {
        return Ok(HashMap::new());
    };
    let names: HashMap<String, String> = serde_json::from_str(raw).map_err(|e| {
        Error::format(
            path,
            format!("the `{BLOCKS_ENTRY}` entry is not a JSON object of type names: {e}"),
        )
    })?;
    names
        .into_iter()
        .map(|(n, t)| match GgmlType::from_name(&t) {
            Some(ty @ (GgmlType::Q4_1 | GgmlType::Q8_0)) => Ok((n, ty)),
            _ => Err(Error::tensor(
                path,
                &n,
                format!("block type `{t}` is not stored in this format (Q4_1 or Q8_0)"),
            )),
        })
        .collect()
}

/// The logical `[rows, cols]` of a block tensor stored as `u8 [rows, row bytes]`, or why not.
fn block_shape(
    ty: GgmlType,
    dtype: safetensors::Dtype,
    stored: &[usize],
) -> std::result::Result<Vec<usize>, String> {
    if dtype != safetensors::Dtype::U8 {
        return Err(format!("its dtype is {dtype:?}, not U8"));
    }
    let [rows, row_bytes] = stored else {
        return Err(format!(
            "its stored shape {stored:?} is not [rows, row bytes]"
        ));
    };
    let (bb, be) = (ty.block_bytes(), ty.block_elements());
    if *row_bytes == 0 || !row_bytes.is_multiple_of(bb) {
        return Err(format!(
            "a row of {row_bytes} bytes is not whole {bb}-byte blocks"
        ));
    }
    Ok(vec![*rows, row_bytes / bb * be])
}

/// sha256 of bytes as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

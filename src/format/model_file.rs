//! Reading and writing model files.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use super::container::{Container, TensorInfo, sha256_hex};
use super::meta::{FileKind, META_KEY, ModelMeta, Preprocessing};
use super::writer::{OwnedTensor, check_owned_tensor_set, write_container};
use crate::error::{Error, Result};
use crate::gguf::GgmlType;
use crate::tensor::TensorView;

/// A validated, memory-mapped model file.
///
/// Opening checks the container, the metadata (version, family configuration, stage graph,
/// preprocessing) and that the tensor set is exactly what the configuration requires, with the
/// right shapes and float dtypes. Tensor *values* are checked for NaN/infinity when a backend
/// loads them ([`ModelFile::finite_tensor`]), since that pass reads them anyway.
pub struct ModelFile {
    c: Container,
    meta: ModelMeta,
    sha256: OnceLock<String>,
}

impl ModelFile {
    pub fn open(path: impl AsRef<Path>) -> Result<ModelFile> {
        let path = path.as_ref();
        let c = Container::open(path, FileKind::Model)?;
        let meta: ModelMeta = c.json_entry(META_KEY, FileKind::Model)?;
        meta.validate().map_err(|r| Error::format(path, r))?;
        if let Preprocessing::Text {
            tokenizer_entry, ..
        } = &meta.preprocessing
            && !c.metadata.contains_key(tokenizer_entry)
        {
            return Err(Error::format(
                path,
                format!("metadata entry `{tokenizer_entry}` (the tokenizer) is missing"),
            ));
        }
        c.check_tensor_set(&meta.expected_tensors())?;
        if let super::meta::Family::Llama(lc) = &meta.family {
            // Matrices stored as the blocks the configuration names, norms as floats.
            for (name, _) in lc.expected_tensors() {
                let want = lc
                    .matrix_types
                    .get(&name)
                    .and_then(|t| GgmlType::from_name(t));
                let got = c.tensors[&name].blocks;
                if got != want {
                    let show = |t: Option<GgmlType>| {
                        t.map_or("floats".to_string(), |t| format!("{t} blocks"))
                    };
                    return Err(Error::tensor(
                        path,
                        &name,
                        format!(
                            "stored as {}, the configuration says {}",
                            show(got),
                            show(want)
                        ),
                    ));
                }
            }
        }
        Ok(ModelFile {
            c,
            meta,
            sha256: OnceLock::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.c.path
    }

    pub fn meta(&self) -> &ModelMeta {
        &self.meta
    }

    /// Size of the file in bytes.
    pub fn file_size(&self) -> usize {
        self.c.bytes().len()
    }

    /// All tensors, sorted by name.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &TensorInfo)> {
        self.c.tensors.iter().map(|(n, i)| (n.as_str(), i))
    }

    /// A float tensor's raw view (present by construction for every expected name).
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        self.c
            .view(name)
            .ok_or_else(|| match self.c.tensors.get(name) {
                Some(TensorInfo {
                    blocks: Some(ty), ..
                }) => Error::tensor(
                    self.path(),
                    name,
                    format!("stored as {ty} blocks, not floats"),
                ),
                _ => Error::tensor(self.path(), name, "missing"),
            })
    }

    /// A block-quantized matrix: its block type, `[rows, cols]` and the blocks as stored.
    pub fn blocks(&self, name: &str) -> Result<(GgmlType, [usize; 2], &[u8])> {
        match self.c.tensors.get(name) {
            Some(TensorInfo {
                blocks: Some(ty),
                shape,
                range,
                ..
            }) => Ok((*ty, [shape[0], shape[1]], &self.c.bytes()[range.clone()])),
            Some(_) => Err(Error::tensor(
                self.path(),
                name,
                "stored as floats, not blocks",
            )),
            None => Err(Error::tensor(self.path(), name, "missing")),
        }
    }

    /// A tensor's view after checking that every value is finite (weights must be).
    pub fn finite_tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let v = self.tensor(name)?;
        if let Some(i) = v.first_non_finite() {
            return Err(Error::tensor(
                self.path(),
                name,
                format!("element {i} is {} (weights must be finite)", v.to_f32()[i]),
            ));
        }
        Ok(v)
    }

    /// A raw metadata entry other than the main JSON (e.g. the embedded tokenizer).
    pub fn entry(&self, key: &str) -> Option<&str> {
        self.c.metadata.get(key).map(String::as_str)
    }

    /// Every metadata entry, the main JSON included, as `(key, text)` (to copy a file's entries
    /// into a derived file, e.g. one with a new head).
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.c
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The embedded `tokenizer.json` text (empty for models that take no text).
    pub fn tokenizer_json(&self) -> &str {
        match &self.meta.preprocessing {
            Preprocessing::Text {
                tokenizer_entry, ..
            } => self.entry(tokenizer_entry).unwrap_or_default(),
            Preprocessing::Image {} => "",
        }
    }

    /// sha256 of the whole file (computed once, on first use): the identity ramps files bind to.
    pub fn sha256(&self) -> &str {
        self.sha256.get_or_init(|| sha256_hex(self.c.bytes()))
    }
}

/// Validates `meta` and the tensor set, then writes a model file atomically.
pub fn write_model(
    path: impl AsRef<Path>,
    meta: &ModelMeta,
    entries: &[(String, String)],
    tensors: Vec<(String, OwnedTensor)>,
) -> Result<()> {
    let path = path.as_ref();
    meta.validate()
        .map_err(|r| Error::format(path, format!("refusing to write: {r}")))?;
    check_owned_tensor_set(path, &meta.expected_tensors(), &tensors)?;
    let mut metadata = HashMap::new();
    metadata.insert(
        META_KEY.to_string(),
        serde_json::to_string_pretty(meta).expect("metadata serializes"),
    );
    for (k, v) in entries {
        metadata.insert(k.clone(), v.clone());
    }
    write_container(path, metadata, &tensors)
}

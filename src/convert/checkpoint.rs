//! Reading the float tensors of another framework's safetensors checkpoint, for the converters.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::tensor::DType;

pub(crate) fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Float tensors of a safetensors checkpoint, decoded to f32, by name.
pub(crate) struct Checkpoint {
    pub path: PathBuf,
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    pub metadata: std::collections::HashMap<String, String>,
}

impl Checkpoint {
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let bytes = read(path)?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::format(path, format!("not a safetensors file: {e}")))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::format(path, format!("not a safetensors file: {e}")))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            // Integer buffers (e.g. `position_ids`) are not weights.
            let Some(dtype) = DType::from_safetensors(view.dtype()) else {
                continue;
            };
            let tv = crate::tensor::TensorView {
                name: &name,
                dtype,
                shape: view.shape(),
                bytes: view.data(),
            };
            let values = tv.to_f32().into_owned();
            tensors.insert(name.clone(), (view.shape().to_vec(), values));
        }
        Ok(Checkpoint {
            path: path.to_path_buf(),
            tensors,
            metadata: meta.metadata().clone().unwrap_or_default(),
        })
    }

    /// The shape of a tensor the checkpoint must have.
    pub fn shape_of(&self, name: &str) -> Result<Vec<usize>> {
        self.tensors
            .get(name)
            .map(|(s, _)| s.clone())
            .ok_or_else(|| Error::tensor(&self.path, name, "missing from the checkpoint"))
    }

    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (s, v) = self
            .tensors
            .remove(name)
            .ok_or_else(|| Error::tensor(&self.path, name, "missing from the checkpoint"))?;
        if s != shape {
            return Err(Error::tensor(
                &self.path,
                name,
                format!("shape {s:?}, expected {shape:?} from config.json"),
            ));
        }
        Ok(v)
    }
}

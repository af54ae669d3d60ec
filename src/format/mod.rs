//! Our model format: a safetensors container with one JSON metadata entry. See `docs/format.md`.
//! The model families' configurations ([`bert_config`], [`cnn_config`]) are defined here, with
//! the metadata that stores them, so the format depends on no model and `models` re-exports them.

pub mod bert_config;
pub mod cnn_config;
mod container;
pub mod head;
pub mod llama_config;
pub mod meta;
mod model_file;
pub mod ramps;
mod writer;

pub use container::{TensorInfo, sha256_hex};
pub use head::{ClassifierHead, head_input_width, write_with_head};
pub use meta::{
    FORMAT_VERSION, Family, FileKind, HeadMeta, META_KEY, ModelMeta, Preprocessing, Provenance,
    TOKENIZER_ENTRY,
};
pub use model_file::{ModelFile, write_model};
pub use ramps::{RampHead, RampMeta, RampsFile, RampsMeta, write_ramps};
pub use writer::{BLOCKS_ENTRY, OwnedTensor};

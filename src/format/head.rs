//! A model file with a new classifier head: every tensor and metadata entry of a backbone's
//! file, plus (or in place of its own) a head trained elsewhere (`apparate train-head`). BERT
//! files get `head.weight` / `head.bias` on the pooled sentence vector, as `convert --head`
//! writes them; a CNN's final linear layer is replaced (same name, new output count), so the
//! head reads exactly what the old one read.

use std::path::Path;

use super::cnn_config::Op;
use super::meta::{Family, HeadMeta, META_KEY, Provenance};
use super::model_file::{ModelFile, write_model};
use super::writer::OwnedTensor;
use crate::error::{Error, Result};

/// A softmax-regression head: `softmax(weight x + bias)` over the backbone's pooled features.
#[derive(Clone, Debug)]
pub struct ClassifierHead {
    /// Class names, in row order of `weight`.
    pub labels: Vec<String>,
    /// `[labels.len(), width]`, row-major.
    pub weight: Vec<f32>,
    /// `[labels.len()]`.
    pub bias: Vec<f32>,
    /// Where the head came from (recorded after the backbone's own provenance).
    pub provenance: Provenance,
}

/// Width of the features a head on this model reads: BERT's hidden size (the pooled sentence
/// vector), or the inputs of a CNN's final linear layer. An error says why a model has no such
/// place (a CNN whose last operation is not a linear layer).
pub fn head_input_width(file: &ModelFile) -> Result<usize> {
    match &file.meta().family {
        Family::Bert(c) => Ok(c.hidden_size),
        Family::Llama(_) => Err(Error::format(
            file.path(),
            "a llama (decoder) model takes no classifier head",
        )),
        Family::Cnn(c) => match c.blocks.last().and_then(|b| b.ops.last()) {
            Some(Op::Linear { inputs, .. }) => Ok(*inputs),
            _ => Err(Error::format(
                file.path(),
                "the last block of this CNN does not end in a linear layer, so there is no \
                 classifier to replace",
            )),
        },
    }
}

/// Writes `out`: `src` with `head` attached (replacing any head it had). The stored dtype of the
/// head is the dtype of the tensor it replaces (CNN) or of the word embeddings (BERT), so a f16
/// file stays f16. Refuses a head whose shapes do not fit the model, or non-finite values.
pub fn write_with_head(src: &ModelFile, out: &Path, head: &ClassifierHead) -> Result<()> {
    let classes = head.labels.len();
    let width = head_input_width(src)?;
    if classes == 0 {
        return Err(Error::Input("a head needs at least one label".into()));
    }
    if head.weight.len() != classes * width || head.bias.len() != classes {
        return Err(Error::Input(format!(
            "head of {} weights and {} biases does not fit {classes} classes x {width} features",
            head.weight.len(),
            head.bias.len()
        )));
    }
    if head.weight.iter().chain(&head.bias).any(|v| !v.is_finite()) {
        return Err(Error::Input("the head has non-finite values".into()));
    }
    let mut meta = src.meta().clone();
    // Names of the head's tensors and the dtype they are stored in.
    let (prefix, dtype) = match &mut meta.family {
        Family::Bert(_) => ("head".to_string(), src.tensor("embeddings.word")?.dtype),
        Family::Llama(_) => unreachable!("head_input_width refused it"),
        Family::Cnn(c) => {
            let Some(Op::Linear {
                name, outputs, act, ..
            }) = c.blocks.last_mut().and_then(|b| b.ops.last_mut())
            else {
                unreachable!("head_input_width checked the last op")
            };
            *outputs = classes;
            // Softmax regression: the head's logits are the answer, no activation on them.
            *act = crate::backend::Activation::None;
            let dtype = src.tensor(&format!("{name}.weight"))?.dtype;
            (name.clone(), dtype)
        }
    };
    meta.head = Some(HeadMeta {
        labels: head.labels.clone(),
    });
    meta.provenance.push(head.provenance.clone());
    let (w_name, b_name) = (format!("{prefix}.weight"), format!("{prefix}.bias"));
    let mut tensors: Vec<(String, OwnedTensor)> = src
        .tensors()
        .filter(|(n, _)| *n != w_name && *n != b_name)
        .map(|(n, _)| {
            let v = src.tensor(n)?;
            Ok((
                n.to_string(),
                OwnedTensor {
                    dtype: v.dtype,
                    shape: v.shape.to_vec(),
                    bytes: v.bytes.to_vec(),
                    blocks: None,
                },
            ))
        })
        .collect::<Result<_>>()?;
    tensors.push((
        w_name,
        OwnedTensor::from_f32(&head.weight, vec![classes, width], dtype),
    ));
    tensors.push((
        b_name,
        OwnedTensor::from_f32(&head.bias, vec![classes], dtype),
    ));
    let entries: Vec<(String, String)> = src
        .entries()
        .filter(|(k, _)| *k != META_KEY)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    write_model(out, &meta, &entries, tensors)
}

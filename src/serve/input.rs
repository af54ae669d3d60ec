//! Inputs are validated and prepared when they are submitted, on the submitting thread: texts
//! are cut to what the model can read and tokenized, pixels are normalised. A bad input is
//! answered at once and never reaches a batch, and the executor only pads and stacks
//! (issue 12, defect 8: one 1 MB text tokenized on the executor stalled every request behind it).

use std::sync::Arc;

use super::ServeError;
use super::queue::Pending;
use crate::backbone::{Backbone, BatchInput};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::models::cnn::ImageInput;
use crate::tokenize::{TextTokenizer, Tokens};
use crate::vision::{ImageLimits, image_from_bytes};

/// One request's input.
#[derive(Clone, Debug)]
pub enum Input {
    /// A text (text models). Only its first [`TextTokenizer::max_chars`] characters are read,
    /// then the model file's truncation length in tokens applies.
    Text(String),
    /// Raw 8-bit pixels, HWC at the model's input size (image models); normalised by the engine.
    Pixels(Vec<u8>),
    /// Already normalised HWC values (image models), as [`crate::dataset`] reads them.
    Normalized(Vec<f32>),
    /// An image file's bytes, PNG or JPEG (image models): decoded, resized, cropped and
    /// normalised as the model file says, as `apparate classify` prepares image files, within
    /// the default [`ImageLimits`] (decoding happens on the submitting thread).
    Encoded(Vec<u8>),
}

/// An input ready for a batch.
#[derive(Clone, Debug)]
pub(crate) enum Prepared {
    Tokens(Tokens),
    /// Normalised HWC values of one image.
    Pixels(Vec<f32>),
}

/// What the model takes, and what preparing an input needs.
pub(crate) enum InputKind {
    Text {
        tokenizer: Arc<TextTokenizer>,
        max_positions: usize,
    },
    /// The model file's input: size, normalisation, and the resize and crop of image files.
    Image(ImageInput),
}

impl InputKind {
    pub fn of<B: Backend>(backbone: &Backbone<B>) -> Result<InputKind> {
        if let Some(i) = backbone.image_input() {
            return Ok(InputKind::Image(i.clone()));
        }
        match (backbone.tokenizer(), backbone.max_positions()) {
            (Some(t), Some(max_positions)) => Ok(InputKind::Text {
                tokenizer: t.clone(),
                max_positions,
            }),
            _ => Err(Error::Input(
                "the model is neither a text nor an image model".into(),
            )),
        }
    }

    /// Validates an input against the model and prepares it.
    pub fn prepare(&self, input: Input) -> Result<Prepared, ServeError> {
        match (self, input) {
            (
                InputKind::Text {
                    tokenizer,
                    max_positions,
                },
                Input::Text(t),
            ) => {
                if t.trim().is_empty() {
                    return Err(ServeError::BadInput(
                        "the text is empty (or only whitespace): there is nothing to classify"
                            .into(),
                    ));
                }
                let tokens = tokenizer
                    .tokenize(&t)
                    .map_err(|e| ServeError::BadInput(e.to_string()))?;
                if tokens.len() > *max_positions {
                    return Err(ServeError::BadInput(format!(
                        "{} tokens after truncation, more than the model's {max_positions} \
                         positions (the model file's truncation length is too long)",
                        tokens.len()
                    )));
                }
                if tokens.is_empty() {
                    return Err(ServeError::BadInput("the text has no tokens".into()));
                }
                Ok(Prepared::Tokens(tokens))
            }
            (InputKind::Text { .. }, _) => Err(ServeError::BadInput(
                "this is a text model: send Input::Text".into(),
            )),
            (InputKind::Image(_), Input::Text(_)) => Err(ServeError::BadInput(
                "this is an image model: send Input::Pixels, Input::Normalized or Input::Encoded"
                    .into(),
            )),
            (InputKind::Image(image), Input::Encoded(bytes)) => {
                image_from_bytes(&bytes, image, &ImageLimits::default())
                    .map(Prepared::Pixels)
                    .map_err(ServeError::BadInput)
            }
            (InputKind::Image(image), Input::Pixels(p)) => {
                let values = image.height * image.width * image.channels;
                let (mean, std) = (&image.mean, &image.std);
                if p.len() != values {
                    return Err(ServeError::BadInput(format!(
                        "{} pixel values, the model takes {values}",
                        p.len()
                    )));
                }
                let c = mean.len().max(1);
                Ok(Prepared::Pixels(
                    p.iter()
                        .enumerate()
                        .map(|(i, &v)| (v as f32 / 255.0 - mean[i % c]) / std[i % c])
                        .collect(),
                ))
            }
            (InputKind::Image(image), Input::Normalized(v)) => {
                let values = image.height * image.width * image.channels;
                if v.len() != values {
                    return Err(ServeError::BadInput(format!(
                        "{} values, the model takes {values}",
                        v.len()
                    )));
                }
                if v.iter().any(|x| !x.is_finite()) {
                    return Err(ServeError::BadInput("non-finite input values".into()));
                }
                Ok(Prepared::Pixels(v))
            }
        }
    }
}

/// Pads (texts) or stacks (images) the prepared inputs of a batch. Every input was checked at
/// submission, so this fails only on a batch mixing kinds, which the engine never forms.
pub(crate) fn assemble<B: Backend>(
    backbone: &Backbone<B>,
    batch: &[Pending],
) -> Result<BatchInput> {
    let tokens: Vec<&Tokens> = batch
        .iter()
        .filter_map(|p| match &p.input {
            Prepared::Tokens(t) => Some(t),
            Prepared::Pixels(_) => None,
        })
        .collect();
    if tokens.len() == batch.len() {
        return backbone.prepare_tokens(&tokens);
    }
    if !tokens.is_empty() {
        return Err(Error::Input("a batch mixes texts and images".into()));
    }
    let mut pixels = Vec::new();
    for p in batch {
        if let Prepared::Pixels(v) = &p.input {
            pixels.extend_from_slice(v);
        }
    }
    backbone.prepare_images(pixels, batch.len())
}

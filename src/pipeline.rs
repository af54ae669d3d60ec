//! Text in, answer out: a model file's tokenizer and encoder together, with timings.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::format::ModelFile;
use crate::models::bert::{Bert, EncoderOutput};
use crate::tokenize::TextTokenizer;

/// Wall-clock time of each step of one call.
#[derive(Copy, Clone, Debug, Default)]
pub struct Timings {
    pub tokenize: Duration,
    pub forward: Duration,
}

/// One answer of a classifier.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    pub class: usize,
    pub label: String,
    pub probability: f32,
}

/// A text model loaded from one file: tokenizer + BERT encoder (+ head).
pub struct TextModel<B: Backend> {
    pub tokenizer: TextTokenizer,
    pub encoder: Bert<B>,
    /// Time to open, validate and load the file.
    pub load_time: Duration,
}

impl<B: Backend> TextModel<B> {
    pub fn load(backend: B, path: impl AsRef<Path>) -> Result<TextModel<B>> {
        let t0 = Instant::now();
        let file = ModelFile::open(path)?;
        Self::from_file(backend, &file).map(|mut m| {
            m.load_time = t0.elapsed();
            m
        })
    }

    pub fn from_file(backend: B, file: &ModelFile) -> Result<TextModel<B>> {
        let t0 = Instant::now();
        Ok(TextModel {
            tokenizer: TextTokenizer::from_model(file)?,
            encoder: Bert::load(backend, file)?,
            load_time: t0.elapsed(),
        })
    }

    /// Tokenizes and encodes a batch of texts. An empty (or whitespace-only) text is refused:
    /// the model would answer it with the special tokens alone.
    pub fn run(&self, texts: &[&str]) -> Result<(EncoderOutput, Timings)> {
        if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
            return Err(Error::Input(format!(
                "text {} of the batch is empty (or only whitespace): there is nothing to read",
                i + 1
            )));
        }
        let t0 = Instant::now();
        let input = self.tokenizer.encode(texts)?;
        let t1 = Instant::now();
        let out = self.encoder.forward(&input)?;
        Ok((
            out,
            Timings {
                tokenize: t1 - t0,
                forward: t1.elapsed(),
            },
        ))
    }

    /// The `k` most likely labels per text (empty lists when the model has no head).
    pub fn classify(&self, texts: &[&str], k: usize) -> Result<(Vec<Vec<Prediction>>, Timings)> {
        let (out, t) = self.run(texts)?;
        let labels = self.encoder.labels();
        let preds = (0..out.batch)
            .map(|i| {
                out.top_k(i, k)
                    .into_iter()
                    .map(|(class, probability)| Prediction {
                        class,
                        label: labels[class].clone(),
                        probability,
                    })
                    .collect()
            })
            .collect();
        Ok((preds, t))
    }
}

//! Any model family as a chain of stages that can be run one at a time: what ramp training, the
//! profiler and the serving runtime need (they look at, time and branch off every stage output).
//!
//! Stage `i` is the `i`-th stage of the model file's stage graph: for BERT `embeddings`,
//! `layer.0` .. `layer.{n-1}`, `head` (pooling, normalisation, classifier, softmax); for a CNN its
//! blocks. The last stage's output is the model's answer.

use std::sync::Arc;

use crate::backend::{Backend, BatchShape, Pooling};
use crate::error::{Error, Result};
use crate::format::{Family, ModelFile};
use crate::graph::StageGraph;
use crate::models::bert::{Bert, EncoderInput};
use crate::models::cnn::{Cnn, ImageInput};
use crate::tokenize::{TextTokenizer, Tokens};

/// A loaded model, any family.
pub enum Backbone<B: Backend> {
    Text {
        /// Shared: the serving runtime tokenizes on the submitting threads.
        tokenizer: Arc<TextTokenizer>,
        encoder: Bert<B>,
    },
    Image(Cnn<B>),
}

/// One batch, prepared on the host (tokenized / decoded and normalised).
pub enum BatchInput {
    Text(EncoderInput),
    /// NHWC `[batch, h, w, c]` normalised pixels.
    Image {
        pixels: Vec<f32>,
        batch: usize,
    },
}

impl BatchInput {
    pub fn batch(&self) -> usize {
        match self {
            BatchInput::Text(e) => e.shape.batch(),
            BatchInput::Image { batch, .. } => *batch,
        }
    }
}

/// A stage output on the backend with the geometry a ramp needs to pool it: viewed as
/// `[batch, positions, width]`, input `b` owns its first `lengths[b]` positions.
pub struct StageOutput<T> {
    pub x: T,
    pub positions: usize,
    pub lengths: Vec<usize>,
}

impl<B: Backend> Backbone<B> {
    /// Loads the model in `file` onto `backend`, whatever its family.
    pub fn load(backend: B, file: &ModelFile) -> Result<Backbone<B>> {
        Ok(match &file.meta().family {
            Family::Bert(_) => Backbone::Text {
                tokenizer: Arc::new(TextTokenizer::from_model(file)?),
                encoder: Bert::load(backend, file)?,
            },
            Family::Cnn(_) => Backbone::Image(Cnn::load(backend, file)?),
            Family::Llama(_) => {
                return Err(crate::error::Error::format(
                    file.path(),
                    "a llama (decoder) model generates text: run it with `apparate generate` or \
                     `generation::LanguageModel`, not as a classifier",
                ));
            }
        })
    }

    pub fn backend(&self) -> &B {
        match self {
            Backbone::Text { encoder, .. } => encoder.backend(),
            Backbone::Image(c) => c.backend(),
        }
    }

    /// Class names of the model's head (empty without one).
    pub fn labels(&self) -> &[String] {
        match self {
            Backbone::Text { encoder, .. } => encoder.labels(),
            Backbone::Image(c) => c.labels(),
        }
    }

    /// Whether the final stage ends in a classifier (ramps need one to imitate).
    pub fn has_classifier(&self) -> bool {
        !self.labels().is_empty()
    }

    /// How a ramp pools a stage output: as the model pools (BERT), or the global average (CNN).
    pub fn ramp_pooling(&self) -> Pooling {
        match self {
            Backbone::Text { encoder, .. } => encoder.config().pooling,
            Backbone::Image(_) => Pooling::Mean,
        }
    }

    /// The stage graph (stage names in execution order, ramp-eligible points).
    pub fn graph(&self) -> StageGraph {
        match self {
            Backbone::Text { encoder, .. } => encoder.config().stage_graph(),
            Backbone::Image(c) => c.config().stage_graph(),
        }
    }

    pub fn num_stages(&self) -> usize {
        match self {
            Backbone::Text { encoder, .. } => encoder.config().num_layers + 2,
            Backbone::Image(c) => c.config().blocks.len(),
        }
    }

    /// The image geometry and normalisation of a CNN; `None` for text models.
    pub fn image_input(&self) -> Option<&ImageInput> {
        match self {
            Backbone::Text { .. } => None,
            Backbone::Image(c) => Some(&c.config().input),
        }
    }

    /// The tokenizer of a text model (`None` for image models).
    pub fn tokenizer(&self) -> Option<&Arc<TextTokenizer>> {
        match self {
            Backbone::Text { tokenizer, .. } => Some(tokenizer),
            Backbone::Image(_) => None,
        }
    }

    /// Most tokens the model reads per input (`None` for image models).
    pub fn max_positions(&self) -> Option<usize> {
        match self {
            Backbone::Text { encoder, .. } => Some(encoder.config().max_position_embeddings),
            Backbone::Image(_) => None,
        }
    }

    /// Tokenizes texts into a batch (text models only).
    pub fn prepare_texts(&self, texts: &[&str]) -> Result<BatchInput> {
        match self {
            Backbone::Text { tokenizer, .. } => self.checked_text(tokenizer.encode(texts)?),
            Backbone::Image(_) => Err(Error::Input(
                "this is an image model: it takes images, not texts".into(),
            )),
        }
    }

    /// Pads texts tokenized by [`TextTokenizer::tokenize`] into a batch (text models only).
    pub fn prepare_tokens(&self, texts: &[&Tokens]) -> Result<BatchInput> {
        match self {
            Backbone::Text { tokenizer, .. } => self.checked_text(tokenizer.batch(texts)?),
            Backbone::Image(_) => Err(Error::Input(
                "this is an image model: it takes images, not texts".into(),
            )),
        }
    }

    fn checked_text(&self, mut input: EncoderInput) -> Result<BatchInput> {
        let max = self.max_positions().unwrap_or(0);
        if input.shape.seq > max {
            return Err(Error::Input(format!(
                "sequence of {} tokens is longer than the model's {max} positions",
                input.shape.seq
            )));
        }
        // Where stages run as graphs, to one of a few lengths, so that they replay
        // (`Backend::padded_seq`); never past the model's positions.
        let seq = self.backend().padded_seq(input.shape.seq).min(max);
        if let Backbone::Text { tokenizer, .. } = self {
            input.pad_to(seq, tokenizer.pad_id());
        }
        Ok(BatchInput::Text(input))
    }

    /// Wraps normalised NHWC pixels of `batch` images (image models only).
    pub fn prepare_images(&self, pixels: Vec<f32>, batch: usize) -> Result<BatchInput> {
        let Some(i) = self.image_input() else {
            return Err(Error::Input(
                "this is a text model: it takes texts, not images".into(),
            ));
        };
        let want = batch * i.height * i.width * i.channels;
        if batch == 0 || pixels.len() != want {
            return Err(Error::Input(format!(
                "{} values for {batch} images of {}x{}x{} (expected {want})",
                pixels.len(),
                i.height,
                i.width,
                i.channels
            )));
        }
        Ok(BatchInput::Image { pixels, batch })
    }

    /// Runs stage `i` on the previous stage's output (`None` for stage 0, which reads `input`).
    pub fn run_stage(
        &self,
        i: usize,
        input: &BatchInput,
        prev: Option<StageOutput<B::Tensor>>,
    ) -> Result<StageOutput<B::Tensor>> {
        let n = self.num_stages();
        if i >= n {
            return Err(Error::Input(format!(
                "stage {i} does not exist ({n} stages)"
            )));
        }
        let need_prev = || Error::Input(format!("stage {i} needs the output of stage {}", i - 1));
        match (self, input) {
            (Backbone::Text { encoder, .. }, BatchInput::Text(inp)) => {
                let shape: &BatchShape = &inp.shape;
                let prev = match i {
                    0 => None,
                    _ => Some(&prev.as_ref().ok_or_else(need_prev)?.x),
                };
                // One graph per (model, stage, batch, sequence) on a backend that graphs runs
                // (`Backend::graphed`): the stage's launches become one, its output lives in
                // that graph's buffers until the same stage of the next batch of this size,
                // after this batch's later stages and ramps were queued behind it.
                let key = format!(
                    "{:p} stage {i} {}x{}",
                    self as *const Self,
                    shape.batch(),
                    shape.seq
                );
                let be = self.backend();
                let x = if i == 0 {
                    be.graphed(&key, &mut || encoder.embed(inp))?
                } else if i + 1 < n {
                    let x = prev.ok_or_else(need_prev)?;
                    be.graphed(&key, &mut || encoder.layer(i - 1, x, shape))?
                } else {
                    let x = prev.ok_or_else(need_prev)?;
                    let out = be.graphed(&key, &mut || {
                        let pooled = encoder.pool(x, shape)?;
                        let probs = encoder.classify(&pooled)?;
                        Ok(probs.unwrap_or(pooled))
                    })?;
                    return Ok(StageOutput {
                        x: out,
                        positions: 1,
                        lengths: vec![1; shape.batch()],
                    });
                };
                Ok(StageOutput {
                    x,
                    positions: shape.seq,
                    lengths: shape.lengths.clone(),
                })
            }
            (Backbone::Image(cnn), BatchInput::Image { pixels, batch }) => {
                // Graphed per (model, stage, batch) as text stages are, the pixels uploaded
                // inside stage 0's graph; a block that flattens its input needs the input
                // itself and runs as it is.
                let key = format!("{:p} stage {i} {batch}", self as *const Self);
                let be = self.backend();
                let x = match prev {
                    Some(p) if i > 0 && cnn.block_takes_input(i) => cnn.block(i, p.x)?,
                    Some(p) if i > 0 => be.graphed(&key, &mut || cnn.block_ref(i, &p.x))?,
                    None if i == 0 => be.graphed(&key, &mut || {
                        let c = &cnn.config().input;
                        let x = be.upload(pixels, &[*batch, c.height, c.width, c.channels])?;
                        cnn.block(i, x)
                    })?,
                    _ => return Err(need_prev()),
                };
                let shape = cnn.backend().shape(&x);
                // NHWC images pool over h * w; a flat [n, features] tensor is one position.
                let positions = if shape.len() == 4 {
                    shape[1] * shape[2]
                } else {
                    1
                };
                Ok(StageOutput {
                    x,
                    positions,
                    lengths: vec![positions; *batch],
                })
            }
            _ => Err(Error::Input(
                "the batch is of the wrong kind for this model (texts vs images)".into(),
            )),
        }
    }

    /// Runs every stage in order, calling `after(stage, output)` after each (ramps branch off,
    /// features are pooled, stages are timed there); returns the final output. The one
    /// stage-by-stage loop of the crate: training, recording, profiling and serving all use it.
    pub fn run_stages(
        &self,
        input: &BatchInput,
        mut after: impl FnMut(usize, &StageOutput<B::Tensor>) -> Result<()>,
    ) -> Result<StageOutput<B::Tensor>> {
        let mut out = None;
        for i in 0..self.num_stages() {
            let o = self.run_stage(i, input, out)?;
            after(i, &o)?;
            out = Some(o);
        }
        out.ok_or_else(|| Error::Input("the model has no stages".into()))
    }

    /// Runs every stage; returns the final output.
    pub fn forward(&self, input: &BatchInput) -> Result<StageOutput<B::Tensor>> {
        self.run_stages(input, |_, _| Ok(()))
    }

    /// The pooled stage output `[batch, width]` on the host, as a ramp with grid `grid` reads it
    /// before its head (the features ramp heads are trained on); see [`crate::ramps::grid`].
    pub fn pooled_features(&self, out: &StageOutput<B::Tensor>, grid: usize) -> Result<Vec<f32>> {
        let be = self.backend();
        let pooled = match self {
            Backbone::Text { .. } => {
                let shape = BatchShape {
                    seq: out.positions,
                    lengths: out.lengths.clone(),
                };
                be.pool(&out.x, &shape, self.ramp_pooling())?
            }
            Backbone::Image(_) if grid > 1 => return be.download(&self.grid_cells(&out.x, grid)?),
            Backbone::Image(_) if be.shape(&out.x).len() == 4 => be.global_avg_pool(&out.x)?,
            Backbone::Image(_) => return be.download(&out.x),
        };
        be.download(&pooled)
    }

    /// An `[n, h, w, c]` stage output averaged over `grid x grid` cells: `[n, grid * grid * c]`
    /// (cells row-major, channels innermost), as a grid ramp reads it.
    pub fn grid_cells(&self, x: &B::Tensor, grid: usize) -> Result<B::Tensor> {
        let be = self.backend();
        let (n, h, w) = match *be.shape(x) {
            [n, h, w, _] if crate::ramps::grid::fits(grid, h, w) => (n, h, w),
            ref s => {
                return Err(Error::Input(format!(
                    "a ramp with grid {grid} needs an image output of at least {grid}x{grid} \
                     pixels, not {s:?}"
                )));
            }
        };
        let cells = be.pool2d(x, &crate::ramps::grid::cell_pool(grid, h, w))?;
        let width = be.shape(&cells).iter().skip(1).product::<usize>();
        be.reshape(cells, &[n, width])
    }

    /// `(class, probability)` of each input from the final stage's output (softmax of CNN
    /// logits; a BERT head's output is already probabilities).
    pub fn predictions_with_confidence(
        &self,
        last: &StageOutput<B::Tensor>,
    ) -> Result<Vec<(u32, f32)>> {
        let v = self.backend().download(&last.x)?;
        let batch = last.lengths.len();
        let classes = (v.len() / batch.max(1)).max(1);
        let probs = matches!(self, Backbone::Text { .. });
        Ok(v.chunks(classes)
            .map(|row| {
                let best = row
                    .iter()
                    .enumerate()
                    .fold(0usize, |b, (k, p)| if *p > row[b] { k } else { b });
                let p = if probs {
                    row[best]
                } else {
                    let z: f32 = row.iter().map(|x| (x - row[best]).exp()).sum();
                    1.0 / z
                };
                (best as u32, p)
            })
            .collect())
    }

    /// The class each input of the final stage's output is given (argmax; first on ties).
    pub fn predictions(&self, last: &StageOutput<B::Tensor>) -> Result<Vec<u32>> {
        let v = self.backend().download(&last.x)?;
        let batch = last.lengths.len();
        let classes = v.len() / batch.max(1);
        Ok(v.chunks(classes.max(1))
            .map(|row| {
                row.iter()
                    .enumerate()
                    .fold(0usize, |best, (k, p)| if *p > row[best] { k } else { best })
                    as u32
            })
            .collect())
    }
}

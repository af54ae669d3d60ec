//! The CNN family (ResNet, VGG, EfficientNet-Lite): NHWC images -> class scores, block by block
//! (each block is a stage; the runtime can put ramps between blocks). Written once against
//! [`Backend`].

use std::collections::HashMap;

/// The configuration lives with the file format that stores it (`format` depends on no model).
pub use crate::format::cnn_config::{Block, CnnConfig, ImageInput, Op, Residual};

use crate::backend::{Activation, Backend, ConvStep};
use crate::error::{Error, Result};
use crate::format::{Family, ModelFile};

/// A loaded CNN on backend `B`.
pub struct Cnn<B: Backend> {
    backend: B,
    config: CnnConfig,
    /// `(weight, bias)` of every convolution and linear layer, by name.
    params: HashMap<String, (B::Tensor, B::Tensor)>,
    labels: Vec<String>,
}

/// Host-side results of [`Cnn::forward`].
#[derive(Clone, Debug)]
pub struct CnnOutput {
    pub batch: usize,
    pub classes: usize,
    /// `[batch, classes]` scores (logits) of the last layer.
    pub logits: Vec<f32>,
}

impl CnnOutput {
    /// The `k` highest-scoring classes of image `i`, best first, with softmax probabilities.
    /// Panics if `i >= batch`.
    pub fn top_k(&self, i: usize, k: usize) -> Vec<(usize, f32)> {
        let row = &self.logits[i * self.classes..(i + 1) * self.classes];
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let z: f32 = row.iter().map(|v| (v - max).exp()).sum();
        let mut idx: Vec<usize> = (0..row.len()).collect();
        idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        idx.into_iter()
            .take(k)
            .map(|c| (c, (row[c] - max).exp() / z))
            .collect()
    }
}

impl<B: Backend> Cnn<B> {
    pub fn load(backend: B, file: &ModelFile) -> Result<Cnn<B>> {
        let Family::Cnn(config) = &file.meta().family else {
            return Err(Error::format(
                file.path(),
                format!("a {} model, not a CNN", file.meta().family.name()),
            ));
        };
        let mut params = HashMap::new();
        let mut load = |name: &str| -> Result<()> {
            let w = backend.load_weight(&file.finite_tensor(&format!("{name}.weight"))?)?;
            let b = backend.load_weight(&file.finite_tensor(&format!("{name}.bias"))?)?;
            params.insert(name.to_string(), (w, b));
            Ok(())
        };
        for block in &config.blocks {
            let shortcut = block.residual.as_ref().and_then(|r| r.shortcut.as_ref());
            for op in block.ops.iter().chain(shortcut) {
                if let Op::Conv { name, .. } | Op::Linear { name, .. } = op {
                    load(name)?;
                }
            }
        }
        Ok(Cnn {
            labels: file
                .meta()
                .head
                .as_ref()
                .map(|h| h.labels.clone())
                .unwrap_or_default(),
            backend,
            config: config.clone(),
            params,
        })
    }

    pub fn config(&self) -> &CnnConfig {
        &self.config
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Class names, in output order (empty when the file has none).
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    fn param(&self, name: &str) -> Result<&(B::Tensor, B::Tensor)> {
        self.params
            .get(name)
            .ok_or_else(|| Error::Input(format!("no parameters named `{name}`")))
    }

    fn apply(
        &self,
        op: &Op,
        x: &B::Tensor,
        residual: Option<&B::Tensor>,
        act_override: Option<Activation>,
    ) -> Result<B::Tensor> {
        let be = &self.backend;
        match op {
            Op::Conv { .. } => {
                let s = self.conv_step(op)?.expect("a convolution");
                be.conv2d(x, s.w, s.b, &s.p, residual, act_override.unwrap_or(s.act))
            }
            Op::Pool(p) => be.pool2d(x, p),
            Op::GlobalAvgPool => be.global_avg_pool(x),
            // `block` reshapes in place; reaching here would mean a flatten as a shortcut,
            // which the configuration refuses.
            Op::Flatten => Err(Error::Input(
                "a flatten can only be a block operation".into(),
            )),
            Op::Linear { name, act, .. } => {
                let (w, b) = self.param(name)?;
                be.linear(x, w, Some(b), *act)
            }
        }
    }

    /// Stage `i` (block `i`) on `x`.
    pub fn block(&self, i: usize, x: B::Tensor) -> Result<B::Tensor> {
        self.run_block(i, Held::Owned(x))
    }

    /// Whether block `i` starts by flattening its input, so that it needs the input itself
    /// ([`Cnn::block`]) and cannot run on a borrowed one ([`Cnn::block_ref`]).
    pub fn block_takes_input(&self, i: usize) -> bool {
        self.config
            .blocks
            .get(i)
            .is_some_and(|b| matches!(b.ops.first(), Some(Op::Flatten)))
    }

    /// Stage `i` on a borrowed `x` (what a graphed stage needs: its closure may run twice); an
    /// error for a block that flattens its input first ([`Cnn::block_takes_input`]).
    pub fn block_ref(&self, i: usize, x: &B::Tensor) -> Result<B::Tensor> {
        self.run_block(i, Held::Borrowed(x))
    }

    fn run_block(&self, i: usize, x: Held<'_, B::Tensor>) -> Result<B::Tensor> {
        let block = self.config.blocks.get(i).ok_or_else(|| {
            Error::Input(format!(
                "block {i} does not exist ({} blocks)",
                self.config.blocks.len()
            ))
        })?;
        if let Some(out) = self.inverted_residual(block, x.get().expect("a block's input"))? {
            return Ok(out);
        }
        let n = block.ops.len();
        // The block's input stays alive while a residual may still need it; `cur` is the
        // running value.
        let mut input = x;
        let mut cur: Option<B::Tensor> = None;
        let consumed = || Error::Input(format!("block `{}`: its input was flattened", block.name));
        for (j, op) in block.ops.iter().enumerate() {
            if matches!(op, Op::Flatten) {
                // A reshape of the running value (or of the input: a flattened block has no
                // residual, the configuration checks it), never a copy.
                let t = match cur.take() {
                    Some(t) => t,
                    None => input.take().ok_or_else(|| match input {
                        Held::Borrowed(_) => Error::Input(format!(
                            "block `{}` flattens its input: it needs the input itself, not a borrow",
                            block.name
                        )),
                        _ => consumed(),
                    })?,
                };
                let s = self.backend.shape(&t).to_vec();
                cur = Some(self.backend.reshape(t, &[s[0], s[1..].iter().product()])?);
                continue;
            }
            let x = input.get();
            let running = cur.as_ref().or(x).ok_or_else(consumed)?;
            let out = match (&block.residual, j + 1 == n) {
                (Some(r), true) => {
                    let x = x.ok_or_else(consumed)?;
                    let shortcut = match &r.shortcut {
                        Some(s) => Some(self.apply(s, x, None, None)?),
                        None => None,
                    };
                    let res = shortcut.as_ref().unwrap_or(x);
                    self.apply(op, running, Some(res), Some(r.act))?
                }
                _ => self.apply(op, running, None, None)?,
            };
            cur = Some(out);
        }
        cur.ok_or_else(|| Error::Input(format!("block `{}` has no operations", block.name)))
    }

    /// A convolution op's weight, bias, geometry and activation; `None` for other ops.
    fn conv_step(&self, op: &Op) -> Result<Option<ConvStep<'_, B::Tensor>>> {
        let (Op::Conv { name, act, .. }, Some(p)) = (op, op.conv_geometry()) else {
            return Ok(None);
        };
        let (w, b) = self.param(name)?;
        Ok(Some(ConvStep {
            w,
            b: Some(b),
            p,
            act: *act,
        }))
    }

    /// A block that is an inverted residual (MobileNetV2 / EfficientNet-Lite: [1x1 expansion,]
    /// depthwise, 1x1 projection, the input itself as the residual if any) through the
    /// backend's [`Backend::inverted_residual`], which may fuse it; `None` for other blocks.
    fn inverted_residual(&self, block: &Block, x: &B::Tensor) -> Result<Option<B::Tensor>> {
        let step = |op| self.conv_step(op);
        let pointwise = |op: &Op| {
            matches!(
                op,
                Op::Conv {
                    kernel: 1,
                    stride: 1,
                    padding: 0,
                    groups: 1,
                    padding_extra: 0,
                    ..
                }
            )
        };
        let depthwise = |op: &Op| matches!(op, Op::Conv { cin, cout, groups, .. } if cin == cout && groups == cin);
        let (expand, dw, project) = match block.ops.as_slice() {
            [e, d, p] if pointwise(e) && depthwise(d) && pointwise(p) => (Some(e), d, p),
            [d, p] if depthwise(d) && pointwise(p) => (None, d, p),
            _ => return Ok(None),
        };
        let act = match &block.residual {
            None => None,
            Some(Residual {
                shortcut: None,
                act,
            }) => Some(*act),
            Some(_) => return Ok(None),
        };
        let expand = match expand {
            Some(e) => step(e)?,
            None => None,
        };
        let (Some(dw), Some(mut project)) = (step(dw)?, step(project)?) else {
            return Ok(None);
        };
        if let Some(a) = act {
            project.act = a;
        }
        let residual = act.map(|_| x);
        self.backend
            .inverted_residual(x, expand, dw, project, residual)
            .map(Some)
    }

    /// All blocks on a batch of preprocessed images, NHWC `[batch, height, width, channels]`.
    pub fn forward(&self, images: &[f32], batch: usize) -> Result<CnnOutput> {
        let i = &self.config.input;
        let want = batch * i.height * i.width * i.channels;
        if batch == 0 || images.len() != want {
            return Err(Error::Input(format!(
                "{} values for {batch} images of {}x{}x{} (expected {want})",
                images.len(),
                i.height,
                i.width,
                i.channels
            )));
        }
        let mut x = self
            .backend
            .upload(images, &[batch, i.height, i.width, i.channels])?;
        for b in 0..self.config.blocks.len() {
            x = self.block(b, x)?;
        }
        let logits = self.backend.download(&x)?;
        Ok(CnnOutput {
            batch,
            classes: logits.len() / batch,
            logits,
        })
    }
}

/// A block's input: owned (it may be flattened in place) or borrowed.
enum Held<'a, T> {
    Owned(T),
    Borrowed(&'a T),
    Taken,
}

impl<T> Held<'_, T> {
    fn get(&self) -> Option<&T> {
        match self {
            Held::Owned(t) => Some(t),
            Held::Borrowed(t) => Some(t),
            Held::Taken => None,
        }
    }

    /// The input itself, when owned and not taken yet.
    fn take(&mut self) -> Option<T> {
        match std::mem::replace(self, Held::Taken) {
            Held::Owned(t) => Some(t),
            other => {
                *self = other;
                None
            }
        }
    }
}

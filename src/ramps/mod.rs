//! Ramps at run time: the heads of a ramps file loaded onto a backend, placed at their stages, and
//! checked with the fused ramp + exit kernel ([`Backend::ramp_exit`]). Training them is
//! [`train`]; the bootstrap driver (features, heads, report) is [`bootstrap`].

pub mod bootstrap;
pub mod curve;
pub mod grid;
pub mod train;

use crate::backbone::{Backbone, StageOutput};
use crate::backend::{Backend, PendingDecisions, Pooling, RampDecision, RampInput, RampWeights};
use crate::dataset::Inputs;
use crate::error::{Error, Result};
use crate::format::{RampHead, RampsFile};
use train::TrainedHead;

/// One ramp on a backend.
pub struct Ramp<T> {
    /// The stage (point) name whose output it reads.
    pub point: String,
    /// Index of that stage in the backbone.
    pub stage: usize,
    pub head: RampHead,
    /// Cells per side the stage output is averaged over (1: the global average; see [`grid`]).
    pub grid: usize,
    dense: Option<(T, T)>,
    out: (T, T),
}

/// Every ramp of a ramps file, loaded for one backbone, in stage order.
pub struct Ramps<T> {
    ramps: Vec<Ramp<T>>,
    pooling: Pooling,
}

impl<T> Ramps<T> {
    /// Loads the heads of `file` (opened for this backbone's model file) onto its backend.
    pub fn load<B: Backend<Tensor = T>>(backbone: &Backbone<B>, file: &RampsFile) -> Result<Self> {
        let be = backbone.backend();
        let graph = backbone.graph();
        let mut ramps = Vec::new();
        for r in &file.meta().ramps {
            let stage = graph.position(&r.point).ok_or_else(|| {
                Error::Input(format!(
                    "ramp point `{}` is not a stage of the model",
                    r.point
                ))
            })?;
            let w = |suffix: &str| -> Result<T> {
                let view = file.tensor(&r.point, suffix)?;
                if let Some(bad) = view.to_f32().iter().find(|v| !v.is_finite()) {
                    return Err(Error::Input(format!(
                        "ramp `{}`: tensor `{suffix}` holds a non-finite value ({bad})",
                        r.point
                    )));
                }
                be.load_weight(&view)
            };
            let (dense, out) = match r.head {
                RampHead::Linear { .. } => (None, (w("weight")?, w("bias")?)),
                RampHead::DenseTanhLinear { .. } => (
                    Some((w("dense.weight")?, w("dense.bias")?)),
                    (w("out.weight")?, w("out.bias")?),
                ),
            };
            ramps.push(Ramp {
                point: r.point.clone(),
                stage,
                head: r.head.clone(),
                grid: r.grid,
                dense,
                out,
            });
        }
        ramps.sort_by_key(|r| r.stage);
        Ok(Ramps {
            ramps,
            pooling: backbone.ramp_pooling(),
        })
    }

    pub fn len(&self) -> usize {
        self.ramps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ramps.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Ramp<T>> {
        self.ramps.iter()
    }

    /// The ramp (index) reading stage `stage`, if any.
    pub fn at_stage(&self, stage: usize) -> Option<usize> {
        self.ramps.iter().position(|r| r.stage == stage)
    }

    /// Replaces ramp `i`'s head with `head` (same shape), uploaded the way a ramps file's
    /// tensors are: the live loops' retrained heads.
    pub fn replace_head<B: Backend<Tensor = T>>(
        &mut self,
        be: &B,
        i: usize,
        head: &TrainedHead,
    ) -> Result<()> {
        let r = self
            .ramps
            .get_mut(i)
            .ok_or_else(|| Error::Input(format!("no ramp {i} to replace")))?;
        if head.head != r.head {
            return Err(Error::Input(format!(
                "a retrained head for `{}` has another shape than the serving one",
                r.point
            )));
        }
        let tensors = head.tensors();
        let up = |k: usize| -> Result<T> {
            let (name, t) = &tensors[k];
            be.load_weight(&crate::tensor::TensorView {
                name,
                dtype: t.dtype,
                shape: &t.shape,
                bytes: &t.bytes,
            })
        };
        match r.head {
            RampHead::Linear { .. } => r.out = (up(0)?, up(1)?),
            RampHead::DenseTanhLinear { .. } => {
                r.dense = Some((up(0)?, up(1)?));
                r.out = (up(2)?, up(3)?);
            }
        }
        Ok(())
    }

    /// Ramp `i`'s weights as the backend's fused kernel takes them.
    fn head(&self, i: usize) -> RampWeights<'_, T> {
        let r = &self.ramps[i];
        RampWeights {
            dense: r.dense.as_ref().map(|(w, b)| (w, b)),
            out: (&r.out.0, &r.out.1),
        }
    }

    /// A stage output as the fused ramp kernel reads it for a global-average ramp (pooled
    /// inside the kernel).
    fn input<'a>(&self, out: &'a StageOutput<T>) -> RampInput<'a, T> {
        RampInput {
            x: &out.x,
            positions: out.positions,
            lengths: &out.lengths,
            pooling: self.pooling,
        }
    }

    /// [`Ramps::check`] without waiting for the decisions (see [`Backend::ramp_exit_async`]).
    pub fn check_async<B: Backend<Tensor = T>>(
        &self,
        backbone: &Backbone<B>,
        i: usize,
        out: &StageOutput<T>,
        threshold: &T,
    ) -> Result<Box<dyn PendingDecisions>>
    where
        T: Send + 'static,
    {
        let (be, head) = (backbone.backend(), self.head(i));
        let Some((cells, lengths)) = self.cells(backbone, i, out)? else {
            return be.ramp_exit_async(&self.input(out), &head, threshold);
        };
        let pending = be.ramp_exit_async(&cells_input(&cells, &lengths), &head, threshold)?;
        // The kernel may still read the cells: they live until its decisions are in.
        Ok(Box::new(KeepAlive {
            pending,
            _cells: cells,
        }))
    }

    /// Runs ramp `i` on its stage's output: one fused kernel per batch (after one average pool
    /// for a grid ramp).
    pub fn check<B: Backend<Tensor = T>>(
        &self,
        backbone: &Backbone<B>,
        i: usize,
        out: &StageOutput<T>,
        threshold: &T,
    ) -> Result<Vec<RampDecision>> {
        let (be, head) = (backbone.backend(), self.head(i));
        let Some((cells, lengths)) = self.cells(backbone, i, out)? else {
            return be.ramp_exit(&self.input(out), &head, threshold);
        };
        be.ramp_exit(&cells_input(&cells, &lengths), &head, threshold)
    }

    /// For a grid ramp, its cell means and one position per input; `None` for a
    /// global-average ramp (pooled inside the kernel).
    fn cells<B: Backend<Tensor = T>>(
        &self,
        backbone: &Backbone<B>,
        i: usize,
        out: &StageOutput<T>,
    ) -> Result<Option<(T, Vec<usize>)>> {
        match self.ramps[i].grid {
            g if g <= 1 => Ok(None),
            g => Ok(Some((
                backbone.grid_cells(&out.x, g)?,
                vec![1; out.lengths.len()],
            ))),
        }
    }

    /// Cells per side of ramp `i` (see [`grid`]).
    pub fn grid(&self, i: usize) -> usize {
        self.ramps[i].grid
    }
}

/// A grid ramp's cell means `[n, g * g * c]` as the fused kernel's input: one position each.
fn cells_input<'a, T>(cells: &'a T, lengths: &'a [usize]) -> RampInput<'a, T> {
    RampInput {
        x: cells,
        positions: 1,
        lengths,
        pooling: Pooling::Mean,
    }
}

/// Pending decisions that hold the tensor their kernel reads.
struct KeepAlive<T> {
    pending: Box<dyn PendingDecisions>,
    _cells: T,
}

impl<T: Send> PendingDecisions for KeepAlive<T> {
    fn wait(self: Box<Self>) -> Result<Vec<RampDecision>> {
        self.pending.wait()
    }
}

/// Host copies of every head of `file`, in stage order as [`Ramps::load`] orders them for
/// `backbone`: what the live loops score shadow samples with and retrain.
pub fn host_heads<B: Backend>(
    backbone: &Backbone<B>,
    file: &RampsFile,
) -> Result<Vec<TrainedHead>> {
    let graph = backbone.graph();
    let mut heads: Vec<(usize, TrainedHead)> = Vec::new();
    for r in &file.meta().ramps {
        let stage = graph.position(&r.point).unwrap_or(usize::MAX);
        let values = r
            .head
            .tensors()
            .iter()
            .map(|(suffix, _)| Ok(file.tensor(&r.point, suffix)?.to_f32().into_owned()))
            .collect::<Result<Vec<_>>>()?;
        let h = TrainedHead::from_tensors(r.head.clone(), values)
            .map_err(|e| Error::Input(format!("ramp `{}`: {e}", r.point)))?;
        heads.push((stage, h));
    }
    heads.sort_by_key(|h| h.0);
    Ok(heads.into_iter().map(|h| h.1).collect())
}

/// What the ramps of a file say about a set of inputs: every ramp's `(u, agrees)` rows, the
/// model's answers, and the pooled features each ramp read (per ramp, `[n, width]`).
pub struct Evidence {
    pub rows: RampRows,
    pub answers: Vec<u32>,
    pub features: Vec<Vec<f32>>,
}

/// [`record_outputs`] that also keeps the model's answers and each ramp's pooled features:
/// the live loops' first evidence (the bootstrap inputs).
pub fn record_evidence<B: Backend>(
    backbone: &Backbone<B>,
    ramps: &Ramps<B::Tensor>,
    inputs: &Inputs,
    batch_size: usize,
) -> Result<Evidence> {
    run_ramps(backbone, ramps, inputs, batch_size, true, &mut |_, _| {})
}

/// Every ramp at threshold 0 over `inputs`, batch by batch: rows, answers and (with
/// `keep_features`) each ramp's pooled features. The one loop behind [`record_outputs`],
/// [`record_outputs_and_answers`] and [`record_evidence`].
fn run_ramps<B: Backend>(
    backbone: &Backbone<B>,
    ramps: &Ramps<B::Tensor>,
    inputs: &Inputs,
    batch_size: usize,
    keep_features: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Evidence> {
    let never = backbone.backend().upload(&[0.0], &[1])?;
    let mut ev = Evidence {
        rows: Vec::with_capacity(inputs.len()),
        answers: Vec::with_capacity(inputs.len()),
        features: vec![Vec::new(); if keep_features { ramps.len() } else { 0 }],
    };
    let mut done = 0;
    while done < inputs.len() {
        let end = (done + batch_size.max(1)).min(inputs.len());
        let batch = inputs.batch(backbone, done..end)?;
        let mut outs: Vec<Vec<(u32, f32)>> = vec![Vec::new(); end - done];
        let last = backbone.run_stages(&batch, |s, o| {
            if let Some(r) = ramps.at_stage(s) {
                if keep_features {
                    ev.features[r].extend(backbone.pooled_features(o, ramps.grid(r))?);
                }
                for (i, d) in ramps.check(backbone, r, o, &never)?.iter().enumerate() {
                    outs[i].push((d.class, d.uncertainty));
                }
            }
            Ok(())
        })?;
        for (o, label) in outs.iter().zip(backbone.predictions(&last)?) {
            ev.rows
                .push(o.iter().map(|(c, u)| (*u, *c == label)).collect());
            ev.answers.push(label);
        }
        done = end;
        progress(done, inputs.len());
    }
    Ok(ev)
}

/// Per input, every ramp's `(u, its class == the model's answer)`.
pub type RampRows = Vec<Vec<(f32, bool)>>;

/// Per input of `inputs`, every ramp's `(u, its class == the model's answer)`, ramps in stage
/// order (thresholds 0: nothing exits). The bootstrap data of the initial ramp placement, and
/// recorded ramp outputs for replaying the adaptation loops.
pub fn record_outputs<B: Backend>(
    backbone: &Backbone<B>,
    ramps: &Ramps<B::Tensor>,
    inputs: &Inputs,
    batch_size: usize,
) -> Result<Vec<Vec<(f32, bool)>>> {
    record_outputs_and_answers(backbone, ramps, inputs, batch_size, &mut |_, _| {}).map(|r| r.0)
}

/// [`record_outputs`], also returning the model's answer on each input; `progress(done,
/// total)` after each batch.
pub fn record_outputs_and_answers<B: Backend>(
    backbone: &Backbone<B>,
    ramps: &Ramps<B::Tensor>,
    inputs: &Inputs,
    batch_size: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(RampRows, Vec<u32>)> {
    let ev = run_ramps(backbone, ramps, inputs, batch_size, false, progress)?;
    Ok((ev.rows, ev.answers))
}

//! Bootstrap training of ramps (Apparate section 2): the frozen backbone runs once over the
//! bootstrap inputs, the pooled features at every chosen ramp point are cached together with the
//! model's own final predictions (the labels), one head per point is trained on 90% of them, the
//! ramps file is written, and the held-out 10% is run again through the real path (backbone +
//! fused ramp kernel) to report each ramp's agreement with the model and its exit curve.

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::train::{
    CurvePoint, HeadInit, REPORT_THRESHOLDS, TrainConfig, agreement, exit_curve, judged, train_head,
};
use super::{Ramps, train::TrainedHead};
use crate::backbone::Backbone;
use crate::backend::Backend;
use crate::dataset::Inputs;
use crate::error::{Error, Result};
use crate::format::{Family, ModelFile, OwnedTensor, RampMeta, RampsFile, write_ramps};

/// Settings of [`train_ramps`].
#[derive(Clone, Debug)]
pub struct BootstrapConfig {
    /// Fraction of the bootstrap inputs held out (the last ones, in stream order) to report
    /// agreement on. Default 0.1 (Apparate: 90% train / 10% held out).
    pub holdout_fraction: f64,
    /// Inputs per backbone batch while caching features. Default 32.
    pub batch_size: usize,
    /// Ramp points to train (default `None`: every ramp-eligible point).
    pub points: Option<Vec<String>>,
    /// Cells per side a CNN ramp averages its stage output over (see [`super::grid`]); `None`
    /// (the default) picks per point with [`super::grid::auto_grid`]; transformer ramps always
    /// use 1.
    pub grid: Option<usize>,
    pub train: TrainConfig,
}

impl Default for BootstrapConfig {
    fn default() -> Self {
        BootstrapConfig {
            holdout_fraction: 0.1,
            batch_size: 32,
            points: None,
            grid: None,
            train: TrainConfig::default(),
        }
    }
}

/// One ramp's results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RampReport {
    pub point: String,
    /// `linear` or `dense_tanh_linear`.
    pub head: String,
    /// Cells per side the ramp averages its stage output over (1: the global average).
    #[serde(default = "one")]
    pub grid: usize,
    pub width: usize,
    pub classes: usize,
    /// Mean cross-entropy on the training features after the last epoch.
    pub final_loss: f32,
    /// Agreement of the ramp's argmax with the model on the training inputs.
    pub train_agreement: f32,
    /// The same on the held-out inputs, measured through the fused ramp kernel.
    pub heldout_agreement: f32,
    /// Exit rate and agreement over thresholds, on the held-out inputs.
    pub curve: Vec<CurvePoint>,
}

/// What [`train_ramps`] did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BootstrapReport {
    pub model_sha256: String,
    pub backend: String,
    pub train_inputs: usize,
    pub heldout_inputs: usize,
    /// How often each class is the model's answer on the bootstrap inputs (train + held out).
    pub label_counts: Vec<usize>,
    pub seed: u64,
    pub epochs: usize,
    pub features_seconds: f64,
    pub training_seconds: f64,
    pub heldout_seconds: f64,
    pub ramps: Vec<RampReport>,
}

/// Progress of a long phase: `(phase, done, total)`.
pub type Progress<'a> = &'a mut dyn FnMut(&str, usize, usize);

/// Trains a ramp at every chosen point of `backbone` (loaded from `file`) on `inputs` (the
/// bootstrap set), writes them to `out` and reports.
pub fn train_ramps<B: Backend>(
    backbone: &Backbone<B>,
    file: &ModelFile,
    inputs: &Inputs,
    out: &Path,
    cfg: &BootstrapConfig,
    progress: Progress<'_>,
) -> Result<BootstrapReport> {
    if !backbone.has_classifier() {
        return Err(Error::Input(format!(
            "{} has no classifier head: ramps imitate the model's predictions, so the model \
             needs one (convert it with --head)",
            file.path().display()
        )));
    }
    // Settings, not inputs: named as knobs with their range, like every other config check.
    if cfg.batch_size == 0 {
        return Err(Error::config("batch_size", 0, "1.."));
    }
    if !(0.0..1.0).contains(&cfg.holdout_fraction) || cfg.holdout_fraction <= 0.0 {
        return Err(Error::config(
            "holdout_fraction",
            cfg.holdout_fraction,
            "(0, 1)",
        ));
    }
    let n = inputs.len();
    let heldout = ((n as f64 * cfg.holdout_fraction).round() as usize).max(1);
    if n < heldout + 2 {
        return Err(Error::Input(format!(
            "the bootstrap set has {n} inputs: too few to train on and hold some out (at \
             least {} needed)",
            heldout + 2
        )));
    }
    let train_n = n - heldout;
    let graph = backbone.graph();
    let points = match &cfg.points {
        None => graph.ramp_points.clone(),
        Some(p) => {
            for name in p {
                if !graph.ramp_points.contains(name) {
                    return Err(Error::Input(format!(
                        "`{name}` is not a ramp-eligible point of the model (eligible: {})",
                        graph.ramp_points.join(", ")
                    )));
                }
            }
            let mut p = p.clone();
            p.sort_by_key(|name| graph.position(name));
            p.dedup();
            p
        }
    };
    if points.is_empty() {
        return Err(Error::Input(
            "the model has no ramp-eligible points to train ramps at".into(),
        ));
    }
    let stages: Vec<usize> = points
        .iter()
        .map(|p| graph.position(p).expect("eligible points are stages"))
        .collect();
    let classes = backbone.labels().len();
    let grids = grids(file, &points, cfg.grid)?;

    // 1. Features at every point + the model's answers, over the training inputs.
    let t0 = Instant::now();
    let mut features: Vec<Vec<f32>> = vec![Vec::new(); points.len()];
    let mut labels: Vec<u32> = Vec::with_capacity(train_n);
    let mut done = 0;
    progress("features", 0, train_n);
    while done < train_n {
        let end = (done + cfg.batch_size).min(train_n);
        let batch = inputs.batch(backbone, done..end)?;
        let last = backbone.run_stages(&batch, |s, o| {
            if let Some(k) = stages.iter().position(|&p| p == s) {
                features[k].extend(backbone.pooled_features(o, grids[k])?);
            }
            Ok(())
        })?;
        labels.extend(backbone.predictions(&last)?);
        done = end;
        progress("features", done, train_n);
    }
    let features_seconds = t0.elapsed().as_secs_f64();

    // 2. One head per point.
    let t0 = Instant::now();
    let pooler = match &file.meta().family {
        Family::Bert(c) if c.has_pooler => Some((
            file.finite_tensor("pooler.weight")?.to_f32(),
            file.finite_tensor("pooler.bias")?.to_f32(),
        )),
        _ => None,
    };
    let mut heads: Vec<TrainedHead> = Vec::new();
    let epochs = cfg.train.epochs;
    for (k, point) in points.iter().enumerate() {
        let width = features[k].len() / train_n;
        let init = match (&file.meta().family, &pooler) {
            (Family::Bert(_), Some((w, b))) => HeadInit::DenseTanh(Some((w, b))),
            (Family::Bert(_) | Family::Llama(_), None) => HeadInit::DenseTanh(None),
            (Family::Llama(_), Some(_)) => unreachable!("only BERT has a pooler"),
            (Family::Cnn(_), _) => HeadInit::Linear,
        };
        let phase = format!("ramp {point}");
        progress(&phase, 0, epochs);
        let head = train_head(
            &features[k],
            &labels,
            width,
            classes,
            init,
            &cfg.train,
            |e, _| progress(&phase, e, epochs),
        )
        .map_err(|r| Error::Input(format!("training the ramp at `{point}`: {r}")))?;
        heads.push(head);
    }
    let training_seconds = t0.elapsed().as_secs_f64();
    let train_agreements: Vec<f32> = heads
        .iter()
        .zip(&features)
        .map(|(h, f)| agreement(&judged(&h.predict(f), &labels)))
        .collect();
    drop(features);

    // 3. Write the ramps file, then load it the way the runtime will.
    let metas: Vec<RampMeta> = points
        .iter()
        .zip(&heads)
        .zip(&grids)
        .map(|((p, h), &grid)| RampMeta {
            point: p.clone(),
            head: h.head.clone(),
            grid,
        })
        .collect();
    let tensors: Vec<(String, OwnedTensor)> = points
        .iter()
        .zip(&heads)
        .flat_map(|(p, h)| {
            h.tensors()
                .into_iter()
                .map(move |(s, t)| (format!("ramps.{p}.{s}"), t))
        })
        .collect();
    write_ramps(out, file, metas, tensors)?;
    let ramps_file = RampsFile::open(out, file)?;
    let ramps = Ramps::load(backbone, &ramps_file)?;

    // 4. Held-out inputs through backbone + fused ramp kernel (threshold 0: nothing exits, every
    // ramp reports its class and uncertainty), exactly as the runtime records them.
    let t0 = Instant::now();
    let be = backbone.backend();
    progress("held-out", 0, heldout);
    let (rows, held_labels) = super::record_outputs_and_answers(
        backbone,
        &ramps,
        &inputs.slice(train_n..n),
        cfg.batch_size,
        &mut |d, t| progress("held-out", d, t),
    )?;
    let outputs: Vec<Vec<(f32, bool)>> = (0..ramps.len())
        .map(|r| rows.iter().map(|row| row[r]).collect())
        .collect();
    let heldout_seconds = t0.elapsed().as_secs_f64();

    let mut label_counts = vec![0usize; classes];
    for &l in labels.iter().chain(&held_labels) {
        label_counts[l as usize] += 1;
    }
    let reports = ramps
        .iter()
        .zip(&outputs)
        .map(|(r, d)| {
            let k = points.iter().position(|p| *p == r.point).expect("trained");
            RampReport {
                point: r.point.clone(),
                head: match r.head {
                    crate::format::RampHead::Linear { .. } => "linear".into(),
                    crate::format::RampHead::DenseTanhLinear { .. } => "dense_tanh_linear".into(),
                },
                grid: r.grid,
                width: r.head.width(),
                classes: r.head.classes(),
                final_loss: heads[k].final_loss,
                train_agreement: train_agreements[k],
                heldout_agreement: agreement(d),
                curve: exit_curve(d, &REPORT_THRESHOLDS),
            }
        })
        .collect();
    Ok(BootstrapReport {
        model_sha256: file.sha256().to_string(),
        backend: be.device_id(),
        train_inputs: train_n,
        heldout_inputs: heldout,
        label_counts,
        seed: cfg.train.seed,
        epochs,
        features_seconds,
        training_seconds,
        heldout_seconds,
        ramps: reports,
    })
}

fn one() -> usize {
    1
}

/// The grid of each point: `asked` where given (checked against each point's output), else the
/// finest that fits ([`super::grid::auto_grid`]); always 1 for a transformer.
fn grids(file: &ModelFile, points: &[String], asked: Option<usize>) -> Result<Vec<usize>> {
    let cnn = match &file.meta().family {
        Family::Cnn(c) => c,
        Family::Bert(_) | Family::Llama(_) => {
            return match asked {
                None | Some(1) => Ok(vec![1; points.len()]),
                Some(g) => Err(Error::config(
                    "grid",
                    g,
                    "1 for a transformer (its ramps pool tokens)",
                )),
            };
        }
    };
    points
        .iter()
        .map(|p| match (cnn.image_at(p), asked) {
            (None, None | Some(1)) => Ok(1),
            (None, Some(g)) => Err(Error::Input(format!(
                "grid {g} asked, but the output at `{p}` is not an image (use grid 1)"
            ))),
            (Some((h, w, c)), None) => Ok(super::grid::auto_grid(h, w, c)),
            (Some((h, w, _)), Some(g)) if super::grid::fits(g, h, w) => Ok(g),
            (Some((h, w, _)), Some(g)) => Err(Error::Input(format!(
                "grid {g} does not fit the {h}x{w} output at `{p}` (1..={})",
                h.min(w)
            ))),
        })
        .collect()
}

//! Training a classifier head on a frozen backbone from labelled data (`apparate train-head`):
//! the backbone runs over every input once, the features its classifier would read are cached
//! (BERT: the pooled, and if the model says so L2-normalised, sentence vector; a CNN: the input
//! of its final linear layer, e.g. the globally pooled features), a softmax-regression head is
//! trained on a seeded, stratified part of them with the ramps' trainer
//! ([`crate::ramps::train::train_head`], [`HeadInit::Linear`]), scored on the held-out rest,
//! and written into a copy of the backbone's model file ([`crate::format::write_with_head`]).
//!
//! Labels are the distinct label strings **sorted** (byte order), so the class order does not
//! depend on the order of the data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::backbone::{Backbone, BatchInput};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::format::{ClassifierHead, ModelFile, Provenance, head_input_width, sha256_hex};
use crate::models::cnn::Op;
use crate::ramps::train::{HeadInit, TrainConfig, train_head};
use crate::rng::SplitMix;

/// Inputs of a labelled data set, in data order.
#[derive(Clone, Debug)]
pub enum LabelledInputs {
    /// One text per input (a text model).
    Texts(Vec<String>),
    /// Image files (an image model), decoded a batch at a time.
    Images(Vec<PathBuf>),
}

impl LabelledInputs {
    pub fn len(&self) -> usize {
        match self {
            LabelledInputs::Texts(t) => t.len(),
            LabelledInputs::Images(f) => f.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Inputs with one label string each.
#[derive(Clone, Debug)]
pub struct LabelledData {
    pub inputs: LabelledInputs,
    pub labels: Vec<String>,
    /// What the data is, for the report and the model's provenance (file names, no folders).
    pub description: String,
    /// sha256 over the data's bytes (texts and labels, or image files and labels).
    pub sha256: String,
}

impl LabelledData {
    /// The class names (distinct labels, sorted) and each input's class index.
    pub fn classes(&self) -> (Vec<String>, Vec<u32>) {
        let names: Vec<String> = self
            .labels
            .iter()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let ids = self
            .labels
            .iter()
            .map(|l| names.binary_search(l).expect("label is among the names") as u32)
            .collect();
        (names, ids)
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

fn read_utf8(path: &Path, what: &str) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| {
        Error::format(
            path,
            format!(
                "{what} must be UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// The lines of a file, each trimmed, refusing empty ones (they would shift every later line
/// against its label). Blank lines at the very end are ignored: nothing follows them to shift.
fn strict_lines(path: &Path, what: &str) -> Result<Vec<String>> {
    let text = read_utf8(path, what)?;
    let mut out = Vec::new();
    for (i, line) in text.trim_end().lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            return Err(Error::format(
                path,
                format!(
                    "line {} is empty: every line must be one {what} (remove the line, and its \
                     counterpart in the other file)",
                    i + 1
                ),
            ));
        }
        out.push(line.to_string());
    }
    if out.is_empty() {
        return Err(Error::format(path, format!("holds no {what}s")));
    }
    Ok(out)
}

fn digest(parts: &[&[u8]]) -> String {
    // Length-prefixed, so moving bytes between parts changes the digest.
    let mut all = Vec::new();
    for p in parts {
        all.extend_from_slice(&(p.len() as u64).to_le_bytes());
        all.extend_from_slice(p);
    }
    sha256_hex(&all)
}

/// Texts (one per line) and their labels (one per line, same order).
pub fn read_texts(texts: &Path, labels: &Path) -> Result<LabelledData> {
    let t = strict_lines(texts, "text")?;
    let l = strict_lines(labels, "label")?;
    if t.len() != l.len() {
        return Err(Error::Input(format!(
            "{} holds {} texts but {} holds {} labels: one label per text, line by line",
            texts.display(),
            t.len(),
            labels.display(),
            l.len()
        )));
    }
    let sha256 = digest(&[t.join("\n").as_bytes(), l.join("\n").as_bytes()]);
    Ok(LabelledData {
        description: format!("{} + {}", file_name(texts), file_name(labels)),
        inputs: LabelledInputs::Texts(t),
        labels: l,
        sha256,
    })
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

fn sorted_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| Error::io(dir, e)))
        .collect::<Result<_>>()?;
    v.sort();
    Ok(v)
}

/// Images in class sub-folders: `DIR/<label>/<image>.png|jpg|jpeg` (files in name order within a
/// class, classes in name order). Other files are ignored; an empty class folder is an error.
pub fn read_image_folders(dir: &Path) -> Result<LabelledData> {
    let mut files = Vec::new();
    let mut labels = Vec::new();
    for sub in sorted_dir(dir)?.into_iter().filter(|p| p.is_dir()) {
        let label = file_name(&sub);
        let images: Vec<PathBuf> = sorted_dir(&sub)?
            .into_iter()
            .filter(|p| is_image(p))
            .collect();
        if images.is_empty() {
            return Err(Error::Input(format!(
                "class folder {} holds no .png/.jpg/.jpeg images",
                sub.display()
            )));
        }
        labels.extend(std::iter::repeat_n(label, images.len()));
        files.extend(images);
    }
    if files.is_empty() {
        return Err(Error::Input(format!(
            "{} has no class sub-folders: give one folder per label with its images inside, or \
             a list of `file<TAB>label` lines with --labels",
            dir.display()
        )));
    }
    image_data(dir, files, labels)
}

/// Images listed in `list`: one `FILE<TAB>LABEL` line per image (or `FILE,LABEL`, split at the
/// last comma, when the line has no tab), `FILE` relative to `dir`.
pub fn read_image_list(dir: &Path, list: &Path) -> Result<LabelledData> {
    let lines = strict_lines(list, "`file<TAB>label` entry")?;
    let mut files = Vec::with_capacity(lines.len());
    let mut labels = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let (f, l) = line
            .split_once('\t')
            .or_else(|| line.rsplit_once(','))
            .map(|(f, l)| (f.trim(), l.trim()))
            .filter(|(f, l)| !f.is_empty() && !l.is_empty())
            .ok_or_else(|| {
                Error::format(
                    list,
                    format!(
                        "line {}: expected `file<TAB>label` (or `file,label`)",
                        i + 1
                    ),
                )
            })?;
        let p = dir.join(f);
        if !p.is_file() {
            return Err(Error::format(
                list,
                format!("line {}: {} is not a file", i + 1, p.display()),
            ));
        }
        files.push(p);
        labels.push(l.to_string());
    }
    image_data(dir, files, labels)
}

fn image_data(dir: &Path, files: Vec<PathBuf>, labels: Vec<String>) -> Result<LabelledData> {
    // The digest covers every image's bytes, its name relative to the folder, and its label.
    let mut parts: Vec<Vec<u8>> = Vec::with_capacity(files.len() * 3);
    for (f, l) in files.iter().zip(&labels) {
        let rel = f.strip_prefix(dir).unwrap_or(f).to_string_lossy();
        parts.push(rel.as_bytes().to_vec());
        parts.push(std::fs::read(f).map_err(|e| Error::io(f, e))?);
        parts.push(l.as_bytes().to_vec());
    }
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    Ok(LabelledData {
        description: format!("{} images under {}", files.len(), file_name(dir)),
        sha256: digest(&refs),
        inputs: LabelledInputs::Images(files),
        labels,
    })
}

/// Settings of [`train_and_write`].
#[derive(Clone, Debug)]
pub struct HeadTrainConfig {
    /// Fraction of each class held out to score the head (seeded, stratified). Default 0.2.
    pub holdout_fraction: f64,
    /// Inputs per backbone batch while computing features. Default 32.
    pub batch_size: usize,
    /// The trainer's settings; its seed also seeds the split. With `weight_decay: None` the
    /// decay is chosen from [`HeadTrainConfig::weight_decays`] on a validation split.
    pub train: TrainConfig,
    /// Candidate weight decays when `train.weight_decay` is `None`: each is trained on 80% of
    /// the training part (stratified, seeded) and scored on the other 20%; the best (the larger
    /// on ties: the simpler head) is then trained on the whole training part. The held-out part
    /// is never looked at. Default [`WEIGHT_DECAYS`].
    pub weight_decays: Vec<f32>,
}

/// The default decay candidates. The trainer standardises features, so the decay acts on
/// standardised weights; these span from barely regularised to strongly (on MiniLM's sentence
/// vectors the ramps' default 1e-4 fits the training part far better than the held-out part).
pub const WEIGHT_DECAYS: [f32; 7] = [1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0];

impl Default for HeadTrainConfig {
    fn default() -> Self {
        HeadTrainConfig {
            holdout_fraction: 0.2,
            batch_size: 32,
            train: TrainConfig::default(),
            weight_decays: WEIGHT_DECAYS.to_vec(),
        }
    }
}

/// One candidate weight decay scored on the validation split.
#[derive(Clone, Debug, Serialize)]
pub struct DecayScore {
    pub weight_decay: f32,
    /// Accuracy on the validation split (part of the training inputs).
    pub validation_accuracy: f64,
}

/// One class's counts in the report.
#[derive(Clone, Debug, Serialize)]
pub struct ClassReport {
    pub label: String,
    pub train: usize,
    pub held_out: usize,
    /// Held-out inputs of this class the head gets right.
    pub held_out_correct: usize,
}

/// What [`train_and_write`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct HeadReport {
    /// The backbone's file name and sha256.
    pub backbone: String,
    pub backbone_sha256: String,
    /// The data (file names) and the digest of its bytes.
    pub data: String,
    pub data_sha256: String,
    /// Class names in the head's row order (the distinct labels, sorted).
    pub labels: Vec<String>,
    /// Width of the features the head reads.
    pub features: usize,
    pub train_inputs: usize,
    pub held_out_inputs: usize,
    pub holdout_fraction: f64,
    pub seed: u64,
    pub epochs: usize,
    pub learning_rate: f32,
    /// The weight decay of the written head (given, or chosen on the validation split).
    pub weight_decay: f32,
    /// The candidates tried and their validation accuracy (empty when the decay was given).
    pub weight_decay_search: Vec<DecayScore>,
    /// Accuracy of the written head on the held-out inputs.
    pub held_out_accuracy: f64,
    /// Accuracy on its own training inputs (a large gap to held-out says it over-fits).
    pub train_accuracy: f64,
    /// Always answering the most common training label, scored on the held-out inputs.
    pub majority_label: String,
    pub majority_accuracy: f64,
    pub per_class: Vec<ClassReport>,
    /// Mean training cross-entropy after the last epoch.
    pub final_loss: f32,
    pub features_seconds: f64,
    pub training_seconds: f64,
    /// Which backend computed the features.
    pub backend: String,
    /// Indices (0-based, in data order: line numbers - 1 for texts) of the held-out inputs.
    pub held_out_indices: Vec<usize>,
}

/// The seeded, stratified split: `(train, held_out)` indices, each sorted. Each class gives
/// `round(count * holdout_fraction)` inputs to the held-out part, but always keeps at least one
/// for training and gives at least one when it has two or more.
pub fn split(labels: &[u32], holdout_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut by_class: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, &l) in labels.iter().enumerate() {
        by_class.entry(l).or_default().push(i);
    }
    // Its own stream, so changing the trainer's use of the seed cannot move the split.
    let mut rng = SplitMix::new(seed ^ SPLIT_STREAM);
    let (mut train, mut held) = (Vec::new(), Vec::new());
    for idx in by_class.values_mut() {
        for i in (1..idx.len()).rev() {
            idx.swap(i, rng.below(i + 1));
        }
        let n = idx.len();
        let k = if n < 2 {
            0
        } else {
            ((n as f64 * holdout_fraction).round() as usize).clamp(1, n - 1)
        };
        held.extend_from_slice(&idx[..k]);
        train.extend_from_slice(&idx[k..]);
    }
    train.sort_unstable();
    held.sort_unstable();
    (train, held)
}

/// Mixed into the split's seed: the split and the trainer's shuffling draw different streams
/// from the same `--seed`.
const SPLIT_STREAM: u64 = 0x5eed_5917;

/// The features a head on `backbone` reads, `[inputs, width]` in data order, computed
/// `batch_size` inputs at a time. `file` is the backbone's model file (a CNN's last block is
/// run here up to, not through, its final linear layer, whose weights come from the file).
pub fn features<B: Backend>(
    backbone: &Backbone<B>,
    file: &ModelFile,
    inputs: &LabelledInputs,
    batch_size: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<f32>> {
    let width = head_input_width(file)?;
    let n = inputs.len();
    let batch_size = batch_size.max(1);
    let mut out = vec![0.0f32; n * width];
    progress(0, n);
    match (backbone, inputs) {
        (Backbone::Text { encoder, .. }, LabelledInputs::Texts(texts)) => {
            // Batches of similar length pad less; each input's vector does not depend on its
            // batch (padding is masked), so the order is free.
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by_key(|&i| texts[i].len());
            let mut done = 0;
            for chunk in order.chunks(batch_size) {
                let refs: Vec<&str> = chunk.iter().map(|&i| texts[i].as_str()).collect();
                let BatchInput::Text(enc) = backbone.prepare_texts(&refs)? else {
                    unreachable!("a text model prepares text batches")
                };
                let e = encoder.forward(&enc)?;
                for (row, &i) in e.embeddings.chunks(width).zip(chunk) {
                    out[i * width..(i + 1) * width].copy_from_slice(row);
                }
                done += chunk.len();
                progress(done, n);
            }
        }
        (Backbone::Image(cnn), LabelledInputs::Images(files)) => {
            let be = cnn.backend();
            let cfg = cnn.config();
            let input = &cfg.input;
            let last = cfg.blocks.len() - 1;
            let ops = &cfg.blocks[last].ops;
            let prefix = &ops[..ops.len() - 1];
            // The last block's weights before its final linear layer, loaded once.
            let mut weights = BTreeMap::new();
            for op in prefix {
                if let Op::Conv { name, .. } | Op::Linear { name, .. } = op {
                    let w = be.load_weight(&file.finite_tensor(&format!("{name}.weight"))?)?;
                    let b = be.load_weight(&file.finite_tensor(&format!("{name}.bias"))?)?;
                    weights.insert(name.clone(), (w, b));
                }
            }
            for (k, chunk) in files.chunks(batch_size).enumerate() {
                let mut pixels =
                    Vec::with_capacity(chunk.len() * input.height * input.width * input.channels);
                for f in chunk {
                    pixels.extend(crate::vision::load_image(f, input)?);
                }
                let shape = [chunk.len(), input.height, input.width, input.channels];
                let mut x = be.upload(&pixels, &shape)?;
                for b in 0..last {
                    x = cnn.block(b, x)?;
                }
                for op in prefix {
                    x = apply(be, op, x, &weights)?;
                }
                let v = be.download(&x)?;
                if v.len() != chunk.len() * width {
                    return Err(Error::Input(format!(
                        "the CNN's last block gives {} values per image before its final linear \
                         layer, which reads {width}",
                        v.len() / chunk.len()
                    )));
                }
                let start = k * batch_size * width;
                out[start..start + v.len()].copy_from_slice(&v);
                progress((k * batch_size + chunk.len()).min(n), n);
            }
        }
        (Backbone::Text { .. }, LabelledInputs::Images(_)) => {
            return Err(Error::Input(
                "this is a text model: give texts (one per line) and labels, not images".into(),
            ));
        }
        (Backbone::Image(_), LabelledInputs::Texts(_)) => {
            return Err(Error::Input(
                "this is an image model: give a folder of images, not texts".into(),
            ));
        }
    }
    Ok(out)
}

/// One operation of a CNN block on the backend (the ones that can come before a block's final
/// linear layer: a block ending in a linear layer has no residual).
fn apply<B: Backend>(
    be: &B,
    op: &Op,
    x: B::Tensor,
    weights: &BTreeMap<String, (B::Tensor, B::Tensor)>,
) -> Result<B::Tensor> {
    let param = |name: &str| {
        weights
            .get(name)
            .ok_or_else(|| Error::Input(format!("no parameters named `{name}`")))
    };
    match op {
        Op::Conv { name, act, .. } => {
            let (w, b) = param(name)?;
            let geo = op.conv_geometry().expect("a convolution");
            be.conv2d(&x, w, Some(b), &geo, None, *act)
        }
        Op::Pool(p) => be.pool2d(&x, p),
        Op::GlobalAvgPool => be.global_avg_pool(&x),
        Op::Flatten => {
            let s = be.shape(&x).to_vec();
            be.reshape(x, &[s[0], s[1..].iter().product()])
        }
        Op::Linear { name, act, .. } => {
            let (w, b) = param(name)?;
            be.linear(&x, w, Some(b), *act)
        }
    }
}

/// Trains a head for `backbone` (loaded from `file`) on `data` and writes the model with it to
/// `out`. `progress(phase, done, total)` reports the feature pass (`features`, in inputs) and
/// the training (`training`, in epochs).
pub fn train_and_write<B: Backend>(
    backbone: &Backbone<B>,
    file: &ModelFile,
    data: &LabelledData,
    out: &Path,
    cfg: &HeadTrainConfig,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<HeadReport> {
    if !(cfg.holdout_fraction > 0.0 && cfg.holdout_fraction < 1.0) {
        return Err(Error::Config {
            knob: "holdout_fraction".into(),
            value: cfg.holdout_fraction.to_string(),
            range: "(0, 1)".into(),
        });
    }
    if data.inputs.len() != data.labels.len() {
        return Err(Error::Input(format!(
            "{} inputs but {} labels",
            data.inputs.len(),
            data.labels.len()
        )));
    }
    let (names, ids) = data.classes();
    if names.len() < 2 {
        return Err(Error::Input(format!(
            "every input is labelled `{}`: a classifier needs at least two classes",
            names.first().map_or("", String::as_str)
        )));
    }
    let (train_idx, held_idx) = split(&ids, cfg.holdout_fraction, cfg.train.seed);
    if held_idx.is_empty() {
        return Err(Error::Input(format!(
            "{} inputs leave none to hold out: every class has a single input",
            ids.len()
        )));
    }
    let width = head_input_width(file)?;

    let t0 = Instant::now();
    let feats = features(backbone, file, &data.inputs, cfg.batch_size, &mut |d, t| {
        progress("features", d, t)
    })?;
    let features_seconds = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let rows = |idx: &[usize]| -> Vec<f32> {
        idx.iter()
            .flat_map(|&i| &feats[i * width..(i + 1) * width])
            .copied()
            .collect()
    };
    let train_x = rows(&train_idx);
    let train_y: Vec<u32> = train_idx.iter().map(|&i| ids[i]).collect();
    let epochs = cfg.train.epochs;
    let classes = names.len();
    let fit = |x: &[f32], y: &[u32], wd: f32, progress: &mut dyn FnMut(usize)| {
        let tc = TrainConfig {
            weight_decay: Some(wd),
            ..cfg.train.clone()
        };
        train_head(x, y, width, classes, HeadInit::Linear, &tc, |e, _| {
            progress(e)
        })
        .map_err(|e| Error::Input(format!("training the head: {e}")))
    };
    let mut weight_decay_search = Vec::new();
    let weight_decay = match cfg.train.weight_decay {
        Some(wd) => wd,
        None => {
            if cfg.weight_decays.is_empty() {
                return Err(Error::Input(
                    "no weight decay given and no candidates to choose one from".into(),
                ));
            }
            // Positions within the training part; the validation split uses its own seed so
            // it is not the held-out split again.
            let (fit_pos, val_pos) = split(&train_y, 0.2, cfg.train.seed.wrapping_add(1));
            let pick = |pos: &[usize]| -> (Vec<f32>, Vec<u32>) {
                (
                    pos.iter()
                        .flat_map(|&p| &train_x[p * width..(p + 1) * width])
                        .copied()
                        .collect(),
                    pos.iter().map(|&p| train_y[p]).collect(),
                )
            };
            let (fx, fy) = pick(&fit_pos);
            let (vx, vy) = pick(&val_pos);
            let total = cfg.weight_decays.len() * epochs;
            for (k, &wd) in cfg.weight_decays.iter().enumerate() {
                let h = fit(&fx, &fy, wd, &mut |e| {
                    progress("choosing decay", k * epochs + e, total)
                })?;
                let right = h
                    .predict(&vx)
                    .iter()
                    .zip(&vy)
                    .filter(|((c, _), y)| c == *y)
                    .count();
                weight_decay_search.push(DecayScore {
                    weight_decay: wd,
                    validation_accuracy: right as f64 / vy.len().max(1) as f64,
                });
            }
            weight_decay_search
                .iter()
                .max_by(|a, b| {
                    a.validation_accuracy
                        .total_cmp(&b.validation_accuracy)
                        .then(a.weight_decay.total_cmp(&b.weight_decay))
                })
                .expect("at least one candidate")
                .weight_decay
        }
    };
    progress("training", 0, epochs);
    let head = fit(&train_x, &train_y, weight_decay, &mut |e| {
        progress("training", e, epochs)
    })?;
    let training_seconds = t1.elapsed().as_secs_f64();

    let predicted: Vec<u32> = head.predict(&feats).into_iter().map(|(c, _)| c).collect();
    let correct = |idx: &[usize]| idx.iter().filter(|&&i| predicted[i] == ids[i]).count();
    let mut per_class: Vec<ClassReport> = names
        .iter()
        .map(|l| ClassReport {
            label: l.clone(),
            train: 0,
            held_out: 0,
            held_out_correct: 0,
        })
        .collect();
    for &i in &train_idx {
        per_class[ids[i] as usize].train += 1;
    }
    for &i in &held_idx {
        let c = &mut per_class[ids[i] as usize];
        c.held_out += 1;
        c.held_out_correct += usize::from(predicted[i] == ids[i]);
    }
    // The most common training label (first in label order on ties).
    let majority = (0..names.len())
        .max_by_key(|&k| (per_class[k].train, std::cmp::Reverse(k)))
        .expect("at least two classes");

    let tensors = head.tensors();
    let values = |k: usize| -> Vec<f32> {
        tensors[k]
            .1
            .bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let classifier = ClassifierHead {
        labels: names.clone(),
        weight: values(0),
        bias: values(1),
        provenance: Provenance {
            source: format!(
                "head: softmax regression by apparate train-head on {} ({} train inputs, seed {})",
                data.description,
                train_idx.len(),
                cfg.train.seed
            ),
            sha256: data.sha256.clone(),
        },
    };
    crate::format::write_with_head(file, out, &classifier)?;

    let held = held_idx.len() as f64;
    Ok(HeadReport {
        backbone: file_name(file.path()),
        backbone_sha256: file.sha256().to_string(),
        data: data.description.clone(),
        data_sha256: data.sha256.clone(),
        labels: names.clone(),
        features: width,
        train_inputs: train_idx.len(),
        held_out_inputs: held_idx.len(),
        holdout_fraction: cfg.holdout_fraction,
        seed: cfg.train.seed,
        epochs,
        learning_rate: cfg.train.learning_rate,
        weight_decay,
        weight_decay_search,
        held_out_accuracy: correct(&held_idx) as f64 / held,
        train_accuracy: correct(&train_idx) as f64 / train_idx.len() as f64,
        majority_label: names[majority].clone(),
        majority_accuracy: per_class[majority].held_out as f64 / held,
        per_class,
        final_loss: head.final_loss,
        features_seconds,
        training_seconds,
        backend: backbone.backend().name().to_string(),
        held_out_indices: held_idx,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_stratified_disjoint_complete_and_seeded() {
        // 50 of class 0, 30 of class 1, 1 of class 2, interleaved.
        let labels: Vec<u32> = (0..81)
            .map(|i| match i {
                80 => 2,
                _ if i % 8 < 5 => 0,
                _ => 1,
            })
            .collect();
        let (train, held) = split(&labels, 0.2, 7);
        let count = |idx: &[usize], c: u32| idx.iter().filter(|&&i| labels[i] == c).count();
        assert_eq!(
            (count(&held, 0), count(&held, 1), count(&held, 2)),
            (10, 6, 0)
        );
        assert_eq!(count(&train, 2), 1, "a class of one trains, never held out");
        let mut all: Vec<usize> = train.iter().chain(&held).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..81).collect::<Vec<_>>());
        assert_eq!(split(&labels, 0.2, 7), (train, held.clone()));
        assert_ne!(
            split(&labels, 0.2, 8).1,
            held,
            "another seed, another split"
        );
    }

    #[test]
    fn classes_are_the_sorted_distinct_labels() {
        let d = LabelledData {
            inputs: LabelledInputs::Texts(vec!["a".into(); 4]),
            labels: ["sports", "business", "sports", "tech"]
                .map(String::from)
                .to_vec(),
            description: String::new(),
            sha256: String::new(),
        };
        let (names, ids) = d.classes();
        assert_eq!(names, ["business", "sports", "tech"]);
        assert_eq!(ids, [1, 0, 1, 2]);
    }
}

//! Training one ramp head on cached features (host, f32): softmax regression or the 2-layer
//! `dense + tanh -> linear` head, minibatch Adam with weight decay, seeded shuffling. The labels
//! are the original model's own predictions, so "accuracy" here is agreement with the model.

pub use super::curve::{CurvePoint, REPORT_THRESHOLDS, agreement, exit_curve, judged};
use crate::format::{OwnedTensor, RampHead};
use crate::rng::SplitMix;
use crate::tensor::DType;

/// Settings of [`train_head`]. Defaults suit a few hundred to a few thousand examples with
/// features of width 16..1024 (our workloads' bootstrap sets).
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Passes over the training features. Default 60.
    pub epochs: usize,
    /// Examples per Adam step. Default 64.
    pub batch_size: usize,
    /// Adam step size. Default 3e-3.
    pub learning_rate: f32,
    /// L2 penalty on the weight matrices (not the biases). Default `None`: 1e-4 for softmax
    /// regression, 1e-2 for the 2-layer head (chosen on our workloads' held-out exit curves:
    /// the 2-layer head over-fits a few thousand examples and grows over-confident with less,
    /// the linear head exits less at equal agreement with more).
    pub weight_decay: Option<f32>,
    /// Seed of the shuffling and of random initialisation. Default 0.
    pub seed: u64,
}

/// Default weight decay of softmax-regression heads (see [`TrainConfig::weight_decay`]).
pub const LINEAR_WEIGHT_DECAY: f32 = 1e-4;
/// Default weight decay of 2-layer heads.
pub const DENSE_WEIGHT_DECAY: f32 = 1e-2;

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 60,
            batch_size: 64,
            learning_rate: 3e-3,
            weight_decay: None,
            seed: 0,
        }
    }
}

/// A trained head: its description and tensors (named by suffix, as in a ramps file).
#[derive(Clone, Debug)]
pub struct TrainedHead {
    pub head: RampHead,
    params: Params,
    /// Mean cross-entropy on the training set after the last epoch.
    pub final_loss: f32,
}

#[derive(Clone, Debug)]
struct Params {
    /// `(weight [width, width], bias [width])` of the dense + tanh layer, if any.
    dense: Option<(Vec<f32>, Vec<f32>)>,
    out_w: Vec<f32>,
    out_b: Vec<f32>,
}

impl TrainedHead {
    /// The tensors to store, `(suffix, tensor)` in [`RampHead::tensors`] order.
    pub fn tensors(&self) -> Vec<(&'static str, OwnedTensor)> {
        let p = &self.params;
        let mut v: Vec<&[f32]> = Vec::new();
        if let Some((w, b)) = &p.dense {
            v.push(w);
            v.push(b);
        }
        v.push(&p.out_w);
        v.push(&p.out_b);
        self.head
            .tensors()
            .into_iter()
            .zip(v)
            .map(|((name, shape), values)| (name, OwnedTensor::from_f32(values, shape, DType::F32)))
            .collect()
    }

    /// `(class, 1 - max p)` for each row of `features` [n, width].
    pub fn predict(&self, features: &[f32]) -> Vec<(u32, f32)> {
        let width = self.head.width();
        let n = features.len() / width;
        let logits = forward(&self.params, features, n, width, self.head.classes()).1;
        logits
            .chunks(self.head.classes())
            .map(|row| {
                let mut p = row.to_vec();
                let class = argmax(&p);
                softmax(&mut p);
                (class as u32, 1.0 - p[class])
            })
            .collect()
    }
}

impl TrainedHead {
    /// A head from stored tensors (a ramps file's `(suffix, values)` in [`RampHead::tensors`]
    /// order): the host copy the live loops score shadow samples with.
    pub fn from_tensors(head: RampHead, values: Vec<Vec<f32>>) -> Result<TrainedHead, String> {
        let shapes = head.tensors();
        if values.len() != shapes.len() {
            return Err(format!(
                "{} tensors for a head of {}",
                values.len(),
                shapes.len()
            ));
        }
        for ((name, shape), v) in shapes.iter().zip(&values) {
            if v.len() != shape.iter().product::<usize>() {
                return Err(format!(
                    "tensor `{name}` has {} values, not {shape:?}",
                    v.len()
                ));
            }
        }
        let mut it = values.into_iter();
        let dense = match head {
            RampHead::Linear { .. } => None,
            RampHead::DenseTanhLinear { .. } => {
                Some((it.next().unwrap_or_default(), it.next().unwrap_or_default()))
            }
        };
        let (out_w, out_b) = (it.next().unwrap_or_default(), it.next().unwrap_or_default());
        Ok(TrainedHead {
            head,
            params: Params {
                dense,
                out_w,
                out_b,
            },
            final_loss: f32::NAN,
        })
    }

    /// What the output layer reads for `features` [n, width]: the features themselves, or
    /// `tanh(dense)` of them for a 2-layer head.
    pub fn hidden(&self, features: &[f32]) -> Vec<f32> {
        let width = self.head.width();
        match &self.params.dense {
            None => features.to_vec(),
            Some((w, b)) => {
                let n = features.len() / width;
                let mut h = matmul(features, w, n, width, width, false, true);
                for row in h.chunks_mut(width) {
                    row.iter_mut()
                        .zip(b)
                        .for_each(|(v, b)| *v = (*v + b).tanh());
                }
                h
            }
        }
    }

    /// Retrains the output layer on `hidden` (from [`TrainedHead::hidden`]) with `labels` (the
    /// model's answers), keeping a 2-layer head's dense layer: a few milliseconds where a full
    /// retraining of MiniLM-sized heads takes seconds. Only the classes seen in `labels` are
    /// trained (an ImageNet model's answers on a stream use a few dozen of its 1,000 classes,
    /// and the cost grows with the classes); the others get zero weights and a bias far below
    /// every trained one, so the head never answers them. At least two classes are needed.
    pub fn retrain_output(
        &self,
        hidden: &[f32],
        labels: &[u32],
        cfg: &TrainConfig,
    ) -> Result<TrainedHead, String> {
        let width = self.head.width();
        let classes = self.head.classes();
        let mut seen: Vec<u32> = labels.to_vec();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() < 2 {
            return Err(format!(
                "{} distinct answers: nothing to separate",
                seen.len()
            ));
        }
        if let Some(&bad) = seen.iter().find(|&&c| c as usize >= classes) {
            return Err(format!("answer {bad} outside the head's {classes} classes"));
        }
        let compact: Vec<u32> = labels
            .iter()
            .map(|l| seen.binary_search(l).expect("seen") as u32)
            .collect();
        let t = train_head(
            hidden,
            &compact,
            width,
            seen.len(),
            HeadInit::Linear,
            cfg,
            |_, _| {},
        )?;
        let floor = t.params.out_b.iter().cloned().fold(f32::INFINITY, f32::min) - 30.0;
        let mut out_w = vec![0.0; classes * width];
        let mut out_b = vec![floor; classes];
        for (k, &c) in seen.iter().enumerate() {
            out_w[c as usize * width..(c as usize + 1) * width]
                .copy_from_slice(&t.params.out_w[k * width..(k + 1) * width]);
            out_b[c as usize] = t.params.out_b[k];
        }
        Ok(TrainedHead {
            head: self.head.clone(),
            params: Params {
                dense: self.params.dense.clone(),
                out_w,
                out_b,
            },
            final_loss: t.final_loss,
        })
    }

    /// `(class, 1 - max p)` for each row of `hidden` (from [`TrainedHead::hidden`]).
    pub fn predict_hidden(&self, hidden: &[f32]) -> Vec<(u32, f32)> {
        let width = self.head.width();
        let classes = self.head.classes();
        let n = hidden.len() / width;
        let mut logits = matmul(hidden, &self.params.out_w, n, width, classes, false, true);
        logits
            .chunks_mut(classes)
            .map(|row| {
                row.iter_mut()
                    .zip(&self.params.out_b)
                    .for_each(|(v, b)| *v += b);
                let class = argmax(row);
                softmax(row);
                (class as u32, 1.0 - row[class])
            })
            .collect()
    }
}

/// What a head starts from.
pub enum HeadInit<'a> {
    /// Softmax regression from zero weights.
    Linear,
    /// The 2-layer head; its dense layer starts from these `(weight [w, w], bias [w])` (the
    /// model's pooler) or, with `None`, from seeded random values.
    DenseTanh(Option<(&'a [f32], &'a [f32])>),
}

/// Trains a head on `features` [n, width] with `labels` in `0..classes`. Reports progress per
/// epoch through `progress(epoch, loss)`.
pub fn train_head(
    features: &[f32],
    labels: &[u32],
    width: usize,
    classes: usize,
    init: HeadInit<'_>,
    cfg: &TrainConfig,
    mut progress: impl FnMut(usize, f32),
) -> Result<TrainedHead, String> {
    let n = labels.len();
    if n == 0 || width == 0 || classes == 0 {
        return Err(format!(
            "nothing to train: {n} examples, width {width}, {classes} classes"
        ));
    }
    if features.len() != n * width {
        return Err(format!(
            "{} feature values for {n} examples of width {width}",
            features.len()
        ));
    }
    if let Some(bad) = labels.iter().find(|&&l| l as usize >= classes) {
        return Err(format!("label {bad} outside 0..{classes}"));
    }
    if let Some(i) = features.iter().position(|v| !v.is_finite()) {
        return Err(format!(
            "feature {} of example {} is not finite",
            i % width,
            i / width
        ));
    }
    if cfg.batch_size == 0 || cfg.learning_rate.is_nan() || cfg.learning_rate <= 0.0 {
        return Err("batch size and learning rate must be positive".into());
    }
    let mut rng = SplitMix::new(cfg.seed);
    // Heads train on standardised features (well conditioned for Adam whatever the feature
    // scales, e.g. CNN channel means) and the scaling is folded back into the first layer at
    // the end. A head whose dense layer starts from the model's pooler keeps raw features:
    // the pooler expects them.
    let standardise = !matches!(init, HeadInit::DenseTanh(Some(_)));
    let weight_decay = cfg.weight_decay.unwrap_or(match init {
        HeadInit::Linear => LINEAR_WEIGHT_DECAY,
        HeadInit::DenseTanh(_) => DENSE_WEIGHT_DECAY,
    });
    let (linear, mut params) = match init {
        HeadInit::Linear => (
            true,
            Params {
                dense: None,
                out_w: vec![0.0; classes * width],
                out_b: vec![0.0; classes],
            },
        ),
        HeadInit::DenseTanh(pooler) => {
            let dense = match pooler {
                Some((w, b)) if w.len() == width * width && b.len() == width => {
                    (w.to_vec(), b.to_vec())
                }
                Some(_) => return Err(format!("pooler weights are not [{width}, {width}]")),
                None => {
                    let scale = (3.0 / width as f32).sqrt();
                    let w = (0..width * width).map(|_| rng.uniform() * scale).collect();
                    (w, vec![0.0; width])
                }
            };
            (
                false,
                Params {
                    dense: Some(dense),
                    out_w: vec![0.0; classes * width],
                    out_b: vec![0.0; classes],
                },
            )
        }
    };
    let (mean, inv_std) = if standardise {
        standardisation(features, n, width)
    } else {
        (vec![0.0; width], vec![1.0; width])
    };
    let x: Vec<f32> = features
        .chunks(width)
        .flat_map(|row| {
            row.iter()
                .zip(&mean)
                .zip(&inv_std)
                .map(|((v, m), s)| (v - m) * s)
        })
        .collect();

    let mut adam = Adam::new(&params, cfg.learning_rate);
    let mut order: Vec<usize> = (0..n).collect();
    let mut final_loss = f32::NAN;
    for epoch in 0..cfg.epochs {
        // Fisher-Yates with the seeded generator.
        for i in (1..n).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let mut loss_sum = 0.0f64;
        for chunk in order.chunks(cfg.batch_size) {
            let xb: Vec<f32> = chunk
                .iter()
                .flat_map(|&i| &x[i * width..(i + 1) * width])
                .copied()
                .collect();
            let yb: Vec<u32> = chunk.iter().map(|&i| labels[i]).collect();
            let (loss, grads) = loss_and_grads(&params, &xb, &yb, width, classes, weight_decay);
            loss_sum += loss as f64 * chunk.len() as f64;
            adam.step(&mut params, &grads);
        }
        final_loss = (loss_sum / n as f64) as f32;
        progress(epoch + 1, final_loss);
    }
    if standardise {
        // W' = W diag(s), b' = b - W' m on the first layer: the head then reads raw features.
        let (w, b) = match &mut params.dense {
            Some((w, b)) => (w, b),
            None => (&mut params.out_w, &mut params.out_b),
        };
        for (row, bias) in w.chunks_mut(width).zip(b.iter_mut()) {
            let mut shift = 0.0;
            for j in 0..width {
                row[j] *= inv_std[j];
                shift += row[j] * mean[j];
            }
            *bias -= shift;
        }
    }
    let head = if linear {
        RampHead::Linear { width, classes }
    } else {
        RampHead::DenseTanhLinear { width, classes }
    };
    Ok(TrainedHead {
        head,
        params,
        final_loss,
    })
}

/// Per-feature mean and 1/std (1 where a feature is constant).
fn standardisation(x: &[f32], n: usize, width: usize) -> (Vec<f32>, Vec<f32>) {
    let mut mean = vec![0.0f64; width];
    let mut sq = vec![0.0f64; width];
    for row in x.chunks(width) {
        for j in 0..width {
            mean[j] += row[j] as f64;
            sq[j] += (row[j] as f64).powi(2);
        }
    }
    let mean: Vec<f64> = mean.iter().map(|m| m / n as f64).collect();
    let inv_std = sq
        .iter()
        .zip(&mean)
        .map(|(s, m)| {
            let var = (s / n as f64 - m * m).max(0.0);
            if var > 1e-12 {
                (1.0 / var.sqrt()) as f32
            } else {
                1.0
            }
        })
        .collect();
    (mean.into_iter().map(|m| m as f32).collect(), inv_std)
}

/// `(hidden [n, width] or empty, logits [n, classes])`.
fn forward(p: &Params, x: &[f32], n: usize, width: usize, classes: usize) -> (Vec<f32>, Vec<f32>) {
    let hidden = p.dense.as_ref().map(|(w, b)| {
        let mut h = matmul(x, w, n, width, width, false, true);
        for row in h.chunks_mut(width) {
            row.iter_mut()
                .zip(b)
                .for_each(|(v, b)| *v = (*v + b).tanh());
        }
        h
    });
    let feat = hidden.as_deref().unwrap_or(x);
    let mut logits = matmul(feat, &p.out_w, n, width, classes, false, true);
    for row in logits.chunks_mut(classes) {
        row.iter_mut().zip(&p.out_b).for_each(|(v, b)| *v += b);
    }
    (hidden.unwrap_or_default(), logits)
}

/// Mean cross-entropy (+ weight decay) of a minibatch and its gradients, laid out as `Params`.
fn loss_and_grads(
    p: &Params,
    x: &[f32],
    y: &[u32],
    width: usize,
    classes: usize,
    weight_decay: f32,
) -> (f32, Params) {
    let n = y.len();
    let (hidden, logits) = forward(p, x, n, width, classes);
    let mut g = logits;
    let mut loss = 0.0f32;
    for (row, &label) in g.chunks_mut(classes).zip(y) {
        softmax(row);
        loss -= row[label as usize].max(1e-30).ln();
        row[label as usize] -= 1.0;
        row.iter_mut().for_each(|v| *v /= n as f32);
    }
    let loss = loss / n as f32;
    let feat: &[f32] = if p.dense.is_some() { &hidden } else { x };
    // dW_out = G^T feat, db_out = column sums of G.
    let mut out_w = matmul(&g, feat, classes, n, width, true, false);
    decay(&mut out_w, &p.out_w, weight_decay);
    let out_b = column_sums(&g, classes);
    let dense = p.dense.as_ref().map(|(w1, _)| {
        // dH = G W_out; through tanh: dZ = dH (1 - h^2).
        let mut dz = matmul(&g, &p.out_w, n, classes, width, false, false);
        dz.iter_mut()
            .zip(&hidden)
            .for_each(|(d, h)| *d *= 1.0 - h * h);
        let mut dw = matmul(&dz, x, width, n, width, true, false);
        decay(&mut dw, w1, weight_decay);
        (dw, column_sums(&dz, width))
    });
    (
        loss,
        Params {
            dense,
            out_w,
            out_b,
        },
    )
}

fn decay(grad: &mut [f32], w: &[f32], wd: f32) {
    grad.iter_mut().zip(w).for_each(|(g, w)| *g += wd * w);
}

fn column_sums(m: &[f32], cols: usize) -> Vec<f32> {
    let mut s = vec![0.0; cols];
    for row in m.chunks(cols) {
        s.iter_mut().zip(row).for_each(|(a, b)| *a += b);
    }
    s
}

/// `op(A) op(B)` with `op(A)` [m, k] and `op(B)` [k, n], row-major storage; `ta`/`tb` read the
/// stored matrix transposed (A stored [k, m], B stored [n, k]).
fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Vec<f32> {
    let mut out = vec![0.0f32; m * n];
    if m == 0 || n == 0 || k == 0 {
        return out;
    }
    assert!(a.len() >= m * k && b.len() >= k * n, "matmul operand sizes");
    let (a_cs, a_rs) = if ta { (m as isize, 1) } else { (1, k as isize) };
    let (b_cs, b_rs) = if tb { (k as isize, 1) } else { (1, n as isize) };
    // SAFETY: the strides describe matrices inside `a` ([m, k] or its stored transpose), `b`
    // ([k, n] or its stored transpose) and `out` ([m, n] row-major), whose sizes are checked.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    out
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(0, |best, (k, x)| if *x > v[best] { k } else { best })
}

fn softmax(v: &mut [f32]) {
    let max = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut z = 0.0;
    for x in v.iter_mut() {
        *x = (*x - max).exp();
        z += *x;
    }
    v.iter_mut().for_each(|x| *x /= z);
}

/// Adam (Kingma & Ba) over every tensor of `Params`.
struct Adam {
    lr: f32,
    t: i32,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

const BETA1: f32 = 0.9;
const BETA2: f32 = 0.999;
const EPS: f32 = 1e-8;

fn slots(p: &mut Params) -> Vec<&mut Vec<f32>> {
    let mut s = Vec::new();
    if let Some((w, b)) = &mut p.dense {
        s.push(w);
        s.push(b);
    }
    s.push(&mut p.out_w);
    s.push(&mut p.out_b);
    s
}

impl Adam {
    fn new(p: &Params, lr: f32) -> Adam {
        let mut p = p.clone();
        let zeros: Vec<Vec<f32>> = slots(&mut p).iter().map(|s| vec![0.0; s.len()]).collect();
        Adam {
            lr,
            t: 0,
            m: zeros.clone(),
            v: zeros,
        }
    }

    fn step(&mut self, p: &mut Params, g: &Params) {
        self.t += 1;
        let c1 = 1.0 - BETA1.powi(self.t);
        let c2 = 1.0 - BETA2.powi(self.t);
        let mut g = g.clone();
        for (((w, g), m), v) in slots(p)
            .into_iter()
            .zip(slots(&mut g))
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            for i in 0..w.len() {
                m[i] = BETA1 * m[i] + (1.0 - BETA1) * g[i];
                v[i] = BETA2 * v[i] + (1.0 - BETA2) * g[i] * g[i];
                w[i] -= self.lr * (m[i] / c1) / ((v[i] / c2).sqrt() + EPS);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gaussian-ish blobs around `classes` random centres.
    fn blobs(n: usize, width: usize, classes: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
        let mut rng = SplitMix::new(seed);
        let centres: Vec<f32> = (0..classes * width).map(|_| rng.uniform() * 3.0).collect();
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..n {
            let c = i % classes;
            y.push(c as u32);
            for j in 0..width {
                let noise: f32 = (0..4).map(|_| rng.uniform()).sum::<f32>() * 0.5;
                // A large offset and scale on feature 0: standardisation must cope.
                let v = centres[c * width + j] + noise;
                x.push(if j == 0 { 1000.0 + 50.0 * v } else { v });
            }
        }
        (x, y)
    }

    #[test]
    fn matmul_matches_naive_in_every_layout() {
        let (m, k, n) = (3, 5, 4);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32).sin()).collect();
        let naive: Vec<f32> = (0..m * n)
            .map(|ij| (0..k).map(|p| a[ij / n * k + p] * b[p * n + ij % n]).sum())
            .collect();
        let t = |v: &[f32], r: usize, c: usize| -> Vec<f32> {
            (0..r * c).map(|i| v[(i % r) * c + i / r]).collect()
        };
        let (at, bt) = (t(&a, m, k), t(&b, k, n));
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let aa = if ta { &at } else { &a };
            let bb = if tb { &bt } else { &b };
            let got = matmul(aa, bb, m, k, n, ta, tb);
            for (g, w) in got.iter().zip(&naive) {
                assert!((g - w).abs() < 1e-4, "{ta} {tb}: {got:?} vs {naive:?}");
            }
        }
    }

    #[test]
    fn both_heads_learn_separable_classes_and_are_deterministic() {
        let (x, y) = blobs(600, 12, 4, 7);
        let cfg = TrainConfig {
            epochs: 30,
            ..TrainConfig::default()
        };
        for init in [HeadInit::Linear, HeadInit::DenseTanh(None)] {
            let kind = matches!(init, HeadInit::Linear);
            let a = train_head(&x, &y, 12, 4, init, &cfg, |_, _| {}).unwrap();
            let acc = agreement(&judged(&a.predict(&x), &y));
            assert!(acc > 0.95, "linear={kind}: training agreement {acc}");
            let init = if kind {
                HeadInit::Linear
            } else {
                HeadInit::DenseTanh(None)
            };
            let b = train_head(&x, &y, 12, 4, init, &cfg, |_, _| {}).unwrap();
            assert_eq!(a.params.out_w, b.params.out_w, "same seed, same weights");
        }
    }

    #[test]
    fn dense_head_starts_from_the_given_pooler() {
        let (x, y) = blobs(64, 8, 2, 1);
        let w: Vec<f32> = (0..64)
            .map(|i| if i % 9 == 0 { 1.0 } else { 0.0 })
            .collect();
        let b = vec![0.0; 8];
        let cfg = TrainConfig {
            epochs: 0,
            ..TrainConfig::default()
        };
        let h = train_head(
            &x,
            &y,
            8,
            2,
            HeadInit::DenseTanh(Some((&w, &b))),
            &cfg,
            |_, _| {},
        )
        .unwrap();
        assert_eq!(h.params.dense.as_ref().unwrap().0, w);
        assert_eq!(h.tensors().len(), 4);
    }

    #[test]
    fn bad_training_input_is_an_error() {
        let cfg = TrainConfig::default();
        let e = |x: &[f32], y: &[u32]| {
            train_head(x, y, 2, 2, HeadInit::Linear, &cfg, |_, _| {}).unwrap_err()
        };
        assert!(e(&[], &[]).contains("nothing to train"));
        assert!(e(&[1.0, 2.0], &[5]).contains("label 5"));
        assert!(e(&[1.0, f32::NAN], &[0]).contains("not finite"));
        assert!(e(&[1.0], &[0]).contains("feature values"));
    }

    #[test]
    fn exit_curve_counts_exits_and_mistakes() {
        let d = judged(&[(0, 0.05), (1, 0.05), (1, 0.5), (2, 0.01)], &[0, 0, 1, 2]);
        let c = exit_curve(&d, &[0.02, 0.1, 0.9]);
        assert_eq!(c[0].exit_rate, 0.25);
        assert_eq!(c[0].exited_agreement, 1.0);
        assert_eq!(c[1].exit_rate, 0.75);
        assert!((c[1].exited_agreement - 2.0 / 3.0).abs() < 1e-6);
        assert_eq!(c[1].overall_agreement, 0.75);
        assert_eq!(c[2].exit_rate, 1.0);
        assert_eq!(agreement(&d), 0.75);
    }
}

//! Running a case of the table on a backend: its inputs drawn from its seed, uploaded once,
//! the op run (for a check or in a timed loop), and the comparison helpers.

use super::{Op, OpCase};
use apparate::backend::{Backend, BatchShape, RampDecision, RampInput, RampWeights};
use apparate::rng::SplitMix;
use apparate::tensor::{DType, TensorView};

/// Random values rounded to `dt`, so the CPU reference sees exactly what the device stores.
pub fn rand(rng: &mut SplitMix, n: usize, scale: f32, dt: DType) -> Vec<f32> {
    let v: Vec<f32> = (0..n).map(|_| rng.uniform() * scale).collect();
    round_to(&v, dt)
}

/// `v` as `dt` stores it.
pub fn round_to(v: &[f32], dt: DType) -> Vec<f32> {
    let bytes = dt.encode(v);
    TensorView {
        name: "",
        dtype: dt,
        shape: &[v.len()],
        bytes: &bytes,
    }
    .to_f32()
    .into_owned()
}

/// A case's inputs on the host: tensors (values, shape) in the op's argument order, plus what
/// is not a tensor.
pub struct HostInputs {
    pub tensors: Vec<(Vec<f32>, Vec<usize>)>,
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    pub shape: BatchShape,
}

/// Draws a case's inputs (same seed, same values).
pub fn host_inputs(case: &OpCase) -> HostInputs {
    let dt = case.dtype;
    let mut rng = SplitMix::new(case.seed);
    let mut t = Vec::new();
    let mut put = |rng: &mut SplitMix, shape: Vec<usize>, scale: f32| {
        let n = shape.iter().product();
        t.push((rand(rng, n, scale, dt), shape));
    };
    let mut ids = Vec::new();
    let mut type_ids = Vec::new();
    let mut shape = BatchShape {
        seq: 0,
        lengths: vec![],
    };
    match &case.op {
        Op::Linear { m, n, k, .. } => {
            put(&mut rng, vec![*m, *k], 1.0);
            put(&mut rng, vec![*n, *k], 0.5);
            put(&mut rng, vec![*n], 0.5);
        }
        Op::AddLayerNorm { rows, cols } => {
            put(&mut rng, vec![*rows, *cols], 2.0);
            put(&mut rng, vec![*rows, *cols], 2.0);
            put(&mut rng, vec![*cols], 1.0);
            put(&mut rng, vec![*cols], 1.0);
        }
        Op::Attention {
            seq,
            heads,
            head_dim,
            lengths,
        } => {
            shape = BatchShape {
                seq: *seq,
                lengths: lengths.clone(),
            };
            put(&mut rng, vec![shape.rows(), 3 * heads * head_dim], 1.5);
        }
        Op::Embed {
            batch,
            seq,
            width,
            bad_id,
        } => {
            let (vocab, types, positions) = (50, 2, 40);
            shape = BatchShape {
                seq: *seq,
                lengths: (0..*batch).map(|i| seq - i.min(seq - 1)).collect(),
            };
            ids = (0..shape.rows()).map(|_| rng.below(vocab) as u32).collect();
            type_ids = (0..shape.rows()).map(|_| rng.below(types) as u32).collect();
            if *bad_id {
                ids[0] = vocab as u32;
            }
            put(&mut rng, vec![vocab, *width], 1.0);
            put(&mut rng, vec![positions, *width], 0.5);
            put(&mut rng, vec![types, *width], 0.5);
            put(&mut rng, vec![*width], 1.0);
            put(&mut rng, vec![*width], 1.0);
        }
        Op::Pool {
            seq,
            width,
            lengths,
            ..
        } => {
            shape = BatchShape {
                seq: *seq,
                lengths: lengths.clone(),
            };
            put(&mut rng, vec![shape.rows(), *width], 1.0);
        }
        Op::L2Normalize { rows, cols } | Op::Softmax { rows, cols } => {
            put(&mut rng, vec![*rows, *cols], 4.0);
        }
        Op::Conv2d {
            x, cout, k, geo, ..
        } => {
            let (oh, ow) = geo.output_size(x[1], x[2], *k, *k).unwrap_or((0, 0));
            put(&mut rng, x.to_vec(), 1.0);
            let cg = x[3] / geo.groups.max(1);
            put(&mut rng, vec![*cout, *k, *k, cg], 0.5);
            put(&mut rng, vec![*cout], 0.5);
            put(&mut rng, vec![x[0], oh, ow, *cout], 1.0);
        }
        Op::Pool2d { x, .. } | Op::GlobalAvgPool { x } => put(&mut rng, x.to_vec(), 1.0),
        Op::RampExit {
            positions,
            width,
            classes,
            lengths,
            ..
        } => {
            put(&mut rng, vec![lengths.len() * positions, *width], 2.0);
            put(&mut rng, vec![*width, *width], 0.5);
            put(&mut rng, vec![*width], 0.5);
            put(&mut rng, vec![*classes, *width], 1.0);
            put(&mut rng, vec![*classes], 0.5);
            shape = BatchShape {
                seq: *positions,
                lengths: lengths.clone(),
            };
        }
    }
    HostInputs {
        tensors: t,
        ids,
        type_ids,
        shape,
    }
}

/// A case's inputs on one backend.
pub struct Prepared<B: Backend> {
    pub host: HostInputs,
    pub tensors: Vec<B::Tensor>,
    /// The ramp's threshold ([1]), set by [`Prepared::set_threshold`].
    pub threshold: Option<B::Tensor>,
}

pub fn prepare<B: Backend>(be: &B, host: HostInputs) -> apparate::Result<Prepared<B>> {
    let tensors = host
        .tensors
        .iter()
        .map(|(v, s)| be.upload(v, s))
        .collect::<apparate::Result<Vec<_>>>()?;
    Ok(Prepared {
        host,
        tensors,
        threshold: None,
    })
}

impl<B: Backend> Prepared<B> {
    pub fn set_threshold(&mut self, be: &B, t: f32) -> apparate::Result<()> {
        self.threshold = Some(be.upload(&[t], &[1])?);
        Ok(())
    }
}

/// What an op returned.
#[derive(Debug, PartialEq)]
pub enum Output {
    /// A tensor's shape and (when downloaded) its values.
    Values(Vec<usize>, Vec<f32>),
    Decisions(Vec<RampDecision>),
}

/// Runs the case's op once on its prepared inputs. `download`: bring the result to the host
/// (a timed loop leaves it on the device).
pub fn run<B: Backend>(
    be: &B,
    case: &OpCase,
    p: &Prepared<B>,
    download: bool,
) -> apparate::Result<Output> {
    let t = &p.tensors;
    let values = |y: B::Tensor| -> apparate::Result<Output> {
        let v = if download {
            be.download(&y)?
        } else {
            Vec::new()
        };
        Ok(Output::Values(be.shape(&y).to_vec(), v))
    };
    match &case.op {
        Op::Linear { act, bias, .. } => {
            values(be.linear(&t[0], &t[1], bias.then_some(&t[2]), *act)?)
        }
        Op::AddLayerNorm { .. } => values(be.add_layernorm(&t[0], &t[1], &t[2], &t[3], 1e-5)?),
        Op::Attention { heads, .. } => values(be.attention(&t[0], &p.host.shape, *heads)?),
        Op::Embed { .. } => values(be.embed(
            &p.host.ids,
            &p.host.type_ids,
            &p.host.shape,
            &t[0],
            &t[1],
            &t[2],
            &t[3],
            &t[4],
            1e-12,
        )?),
        Op::Pool { kind, .. } => values(be.pool(&t[0], &p.host.shape, *kind)?),
        Op::L2Normalize { .. } => values(be.l2_normalize(&t[0])?),
        Op::Softmax { .. } => values(be.softmax(&t[0])?),
        Op::Conv2d {
            geo,
            bias,
            residual,
            act,
            ..
        } => values(be.conv2d(
            &t[0],
            &t[1],
            bias.then_some(&t[2]),
            geo,
            residual.then_some(&t[3]),
            *act,
        )?),
        Op::Pool2d { p: w, .. } => values(be.pool2d(&t[0], w)?),
        Op::GlobalAvgPool { .. } => values(be.global_avg_pool(&t[0])?),
        Op::RampExit { pooling, dense, .. } => {
            let input = RampInput {
                x: &t[0],
                positions: p.host.shape.seq,
                lengths: &p.host.shape.lengths,
                pooling: *pooling,
            };
            let head = RampWeights {
                dense: dense.then_some((&t[1], &t[2])),
                out: (&t[3], &t[4]),
            };
            let threshold = p
                .threshold
                .as_ref()
                .expect("set_threshold before a ramp case");
            Ok(Output::Decisions(be.ramp_exit(&input, &head, threshold)?))
        }
    }
}

/// A threshold that splits `probe`'s uncertainties (some inputs exit, some do not), as `dt`
/// stores it: the midpoint of the widest gap between neighbouring uncertainties whose midpoint
/// survives rounding to `dt` strictly inside the gap (a 16-bit threshold cannot land in every
/// gap), so a backend's uncertainty that differs by rounding does not flip an exit. One input:
/// a threshold above it.
pub fn threshold_between(probe: &[RampDecision], dt: DType) -> f32 {
    let mut us: Vec<f32> = probe.iter().map(|d| d.uncertainty).collect();
    us.sort_by(f32::total_cmp);
    let inside = us
        .windows(2)
        .map(|p| (p[0], p[1], round_to(&[(p[0] + p[1]) / 2.0], dt)[0]))
        .filter(|&(a, b, t)| a < t && t < b)
        .max_by(|x, y| (x.1 - x.0).total_cmp(&(y.1 - y.0)));
    match inside {
        Some((_, _, t)) => t,
        None => round_to(&[us.last().copied().unwrap_or(0.0) + 0.25], dt)[0],
    }
}

/// Relative L2 error of `got` against `want` (absolute when `want` is all zeros).
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

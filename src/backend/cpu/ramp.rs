//! The CPU twin of `kernels/ramp.cu`: pool, ramp head, softmax and exit check per input.

use super::team::Exec;

use super::softmax::softmax_in_place;
use crate::backend::{Pooling, RampDecision};

#[allow(clippy::too_many_arguments)]
pub(crate) fn ramp_exit(
    x: &[f32],
    positions: usize,
    lengths: &[usize],
    pooling: Pooling,
    dense: Option<(&[f32], &[f32])>,
    out: (&[f32], &[f32]),
    width: usize,
    classes: usize,
    threshold: f32,
    par: Exec<'_>,
) -> Vec<RampDecision> {
    par.map(lengths.len(), |b| {
        let len = lengths[b];
        let len = if pooling == Pooling::Cls { 1 } else { len };
        let mut feat = vec![0.0f32; width];
        for p in 0..len {
            let row = &x[(b * positions + p) * width..][..width];
            feat.iter_mut().zip(row).for_each(|(f, v)| *f += v);
        }
        feat.iter_mut().for_each(|f| *f /= len as f32);
        if let Some((w, bias)) = dense {
            feat = (0..width)
                .map(|j| {
                    let dot: f32 = w[j * width..][..width]
                        .iter()
                        .zip(&feat)
                        .map(|(a, b)| a * b)
                        .sum();
                    (dot + bias[j]).tanh()
                })
                .collect();
        }
        let mut p: Vec<f32> = (0..classes)
            .map(|k| {
                out.0[k * width..][..width]
                    .iter()
                    .zip(&feat)
                    .map(|(a, b)| a * b)
                    .sum::<f32>()
                    + out.1[k]
            })
            .collect();
        // The first class with the highest score (the kernel breaks ties the same way).
        let class = p
            .iter()
            .enumerate()
            .fold(0, |best, (k, v)| if *v > p[best] { k } else { best });
        softmax_in_place(&mut p);
        let uncertainty = 1.0 - p[class];
        RampDecision {
            class: class as u32,
            uncertainty,
            exit: uncertainty < threshold,
        }
    })
}

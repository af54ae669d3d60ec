//! Embedding gather + sum + LayerNorm, fused per token row.

use super::buffers;
use super::team::Exec;

use super::norm::layernorm_row;
use super::simd::multiversion;
use crate::backend::BatchShape;

#[allow(clippy::too_many_arguments)]
pub(crate) fn embed(
    ids: &[u32],
    type_ids: &[u32],
    shape: &BatchShape,
    word: &[f32],
    position: &[f32],
    token_type: &[f32],
    gamma: &[f32],
    beta: &[f32],
    width: usize,
    eps: f32,
    par: Exec<'_>,
) -> Vec<f32> {
    // Every row is written whole.
    let mut out = buffers::take(shape.rows() * width);
    par.for_chunks(&mut out, width, |r, o| {
        let p = r % shape.seq;
        let w = &word[ids[r] as usize * width..][..width];
        let pe = &position[p * width..][..width];
        let t = &token_type[type_ids[r] as usize * width..][..width];
        embed_row(o, w, pe, t, gamma, beta, eps);
    });
    out
}

#[inline(always)]
fn embed_row_body(
    o: &mut [f32],
    w: &[f32],
    pe: &[f32],
    t: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    for (((o, w), p), t) in o.iter_mut().zip(w).zip(pe).zip(t) {
        *o = w + p + t;
    }
    layernorm_row(o, gamma, beta, eps);
}

multiversion!(fn embed_row(o: &mut [f32], w: &[f32], pe: &[f32], t: &[f32], gamma: &[f32], beta: &[f32], eps: f32) => embed_row_body);

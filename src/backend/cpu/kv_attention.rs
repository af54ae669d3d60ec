//! Causal attention over the paged key/value cache on the CPU: the step's keys and values are
//! written to their slots first (a prefill chunk's rows attend to each other through the
//! cache), then every (row, query head) pair in parallel scores its sequence's positions
//! `0..=pos`, takes the softmax and sums the values.

use super::simd::{self, multiversion};
use super::softmax::softmax_in_place;
use super::team::Exec;
use crate::backend::decoder::{Heads, KvPlan};

/// Writes the key and value parts of each `qkv` row into slot `plan.slots[row]`.
pub(crate) fn store(qkv: &[f32], k: &mut [f32], v: &mut [f32], plan: &KvPlan, h: Heads) {
    let (w, kvw) = (h.qkv_width(), h.kv_width());
    let kq = h.heads * h.head_dim;
    for (row, &slot) in qkv.chunks_exact(w).zip(&plan.slots) {
        let s = slot as usize * kvw;
        k[s..s + kvw].copy_from_slice(&row[kq..kq + kvw]);
        v[s..s + kvw].copy_from_slice(&row[kq + kvw..kq + 2 * kvw]);
    }
}

/// One query head of one row: `out` (head_dim values) = softmax(q K^T / sqrt d) V over the
/// slots of positions `0..=pos`.
#[inline(always)]
fn head_body(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    slots: &[usize],
    kv_off: usize,
    kvw: usize,
    out: &mut [f32],
) {
    let d = q.len();
    let scale = 1.0 / (d as f32).sqrt();
    let mut scores: Vec<f32> = slots
        .iter()
        .map(|&s| simd::dot(q, &k[s * kvw + kv_off..s * kvw + kv_off + d]) * scale)
        .collect();
    softmax_in_place(&mut scores);
    out.iter_mut().for_each(|o| *o = 0.0);
    for (&p, &s) in scores.iter().zip(slots) {
        let vv = &v[s * kvw + kv_off..s * kvw + kv_off + d];
        for (o, x) in out.iter_mut().zip(vv) {
            *o += p * x;
        }
    }
}

multiversion!(fn head(q: &[f32], k: &[f32], v: &[f32], slots: &[usize], kv_off: usize, kvw: usize, out: &mut [f32]) => head_body);

/// The attention of every row (after [`store`]): `[rows, heads * head_dim]`.
pub(crate) fn attend(
    qkv: &[f32],
    k: &[f32],
    v: &[f32],
    plan: &KvPlan,
    h: Heads,
    exec: Exec<'_>,
) -> Vec<f32> {
    let (w, kvw, d) = (h.qkv_width(), h.kv_width(), h.head_dim);
    let group = h.heads / h.kv_heads;
    let bs = plan.block_size();
    let mut out = vec![0f32; plan.rows() * h.heads * d];
    exec.for_chunks(&mut out, h.heads * d, |r, o| {
        let pos = plan.positions[r] as usize;
        let table = &plan.tables[plan.starts[r] as usize..];
        let slots: Vec<usize> = (0..=pos)
            .map(|p| table[p / bs] as usize * bs + p % bs)
            .collect();
        let row = &qkv[r * w..(r + 1) * w];
        for (hd, oh) in o.chunks_exact_mut(d).enumerate() {
            let q = &row[hd * d..(hd + 1) * d];
            head(q, k, v, &slots, (hd / group) * d, kvw, oh);
        }
    });
    out
}

//! The decoder ops ([`DecoderBackend`]) on the CPU: quantized weights stay as blocks and the
//! products run on them, with f32 activations ([`qmatmul`], the default) or activations
//! quantized to 8-bit blocks once per row as llama.cpp does ([`qmatvec`],
//! [`CpuBackend::with_q8_activations`]); the row ops are plain loops; the attention is in
//! `kv_attention.rs`.

use std::sync::Arc;

use super::qmatmul;
use super::qmatvec::{self, Q8Activations};
use super::team::Exec;
use super::{CpuBackend, CpuTensor, kv_attention};
use crate::backend::decoder::{
    DecoderBackend, Heads, KvLayer, KvPlan, NormOut, PlanInfo, QInfo, zeroed_f32,
};
use crate::error::{Error, Result};

/// A block-quantized weight in host memory, as the file stores it.
#[derive(Clone, Debug)]
pub struct CpuQTensor {
    info: QInfo,
    bytes: Arc<Vec<u8>>,
}

impl PlanInfo for KvPlan {
    fn rows(&self) -> usize {
        KvPlan::rows(self)
    }
    fn cache_slots(&self) -> usize {
        KvPlan::cache_slots(self)
    }
}

/// Weight rows per task of a quantized product: enough tasks for every worker to get several
/// (so an uneven split costs little), few enough that each reads a run of whole rows.
fn rows_per_task(rows: usize, threads: usize) -> usize {
    rows.div_ceil(threads * 4).clamp(16, 1024)
}

/// `h = x + r` (when given) and `h / rms(h) * gamma`, row by row.
fn rms_rows(
    x: &[f32],
    r: Option<&[f32]>,
    gamma: &[f32],
    eps: f32,
    exec: Exec<'_>,
) -> (Vec<f32>, Vec<f32>) {
    let cols = gamma.len();
    let h: Vec<f32> = match r {
        Some(r) => x.iter().zip(r).map(|(a, b)| a + b).collect(),
        None => x.to_vec(),
    };
    let mut y = vec![0f32; h.len()];
    exec.for_chunks(&mut y, cols, |i, out| {
        let row = &h[i * cols..(i + 1) * cols];
        let ms = super::simd::dot(row, row) / cols as f32;
        let s = 1.0 / (ms + eps).sqrt();
        for ((o, v), g) in out.iter_mut().zip(row).zip(gamma) {
            *o = v * s * g;
        }
    });
    (h, y)
}

impl DecoderBackend for CpuBackend {
    type QTensor = CpuQTensor;
    type Plan = KvPlan;

    fn qinfo(&self, w: &CpuQTensor) -> QInfo {
        w.info
    }

    fn value_bytes(&self) -> usize {
        4
    }

    /// The zeroed host memory is the tensor: no staging copy that would touch every page.
    fn alloc_kv_layer(&self, slots: usize, kv_width: usize) -> Result<KvLayer<CpuTensor>> {
        let t = || -> Result<CpuTensor> {
            Ok(CpuTensor::new(
                vec![slots, kv_width],
                zeroed_f32(slots, kv_width)?,
            ))
        };
        Ok(KvLayer { k: t()?, v: t()? })
    }

    fn run_load_quantized(&self, info: QInfo, bytes: &[u8]) -> Result<CpuQTensor> {
        Ok(CpuQTensor {
            info,
            bytes: Arc::new(bytes.to_vec()),
        })
    }

    fn run_upload_plan(&self, plan: &KvPlan) -> Result<KvPlan> {
        Ok(plan.clone())
    }

    fn run_embed_quantized(&self, ids: &[u32], table: &CpuQTensor) -> Result<CpuTensor> {
        let (cols, rb) = (table.info.cols, table.info.row_bytes());
        let mut out = vec![0f32; ids.len() * cols];
        for (o, &id) in out.chunks_exact_mut(cols).zip(ids) {
            let at = id as usize * rb;
            crate::quant::dequantize_row(table.info.ty, &table.bytes[at..at + rb], o)
                .map_err(|e| Error::device("cpu", "embed_quantized", e))?;
        }
        Ok(CpuTensor::new(vec![ids.len(), cols], out))
    }

    fn run_qlinear(&self, x: &CpuTensor, w: &CpuQTensor) -> Result<CpuTensor> {
        let QInfo { ty, rows, cols } = w.info;
        let m = x.shape[0];
        let rb = w.info.row_bytes();
        let chunk = rows_per_task(rows, self.threads);
        let tasks = rows.div_ceil(chunk);
        let q8 = self.q8_activations;
        let exec = self.exec(m * rows * cols);
        let parts = {
            let xs: Vec<Q8Activations> = if q8 {
                exec.map(m, |i| {
                    Q8Activations::quantize(&x.data[i * cols..(i + 1) * cols])
                })
            } else {
                Vec::new()
            };
            exec.map(tasks, |t| {
                let (r0, r1) = (t * chunk, ((t + 1) * chunk).min(rows));
                let mut out = vec![0f32; m * (r1 - r0)];
                let wb = &w.bytes[r0 * rb..r1 * rb];
                if q8 {
                    qmatvec::matmul(ty, wb, &xs, &mut out)
                } else {
                    qmatmul::matmul(ty, wb, &x.data, cols, &mut out)
                }
                .map(|_| out)
            })
        };
        let mut y = vec![0f32; m * rows];
        for (t, part) in parts.into_iter().enumerate() {
            let part = part.map_err(|e| Error::device("cpu", "qlinear", e))?;
            let (r0, n) = (t * chunk, part.len() / m);
            for (i, p) in part.chunks_exact(n).enumerate() {
                y[i * rows + r0..i * rows + r0 + n].copy_from_slice(p);
            }
        }
        Ok(CpuTensor::new(vec![m, rows], y))
    }

    fn run_rms_norm(
        &self,
        x: &CpuTensor,
        residual: Option<&CpuTensor>,
        gamma: &CpuTensor,
        eps: f32,
    ) -> Result<NormOut<CpuTensor>> {
        let (h, y) = rms_rows(
            &x.data,
            residual.map(|r| r.data.as_slice()),
            &gamma.data,
            eps,
            self.exec(x.data.len() * 4),
        );
        let h = residual.map(|_| CpuTensor::new(x.shape.clone(), h));
        Ok((h, CpuTensor::new(x.shape.clone(), y)))
    }

    fn run_rope(
        &self,
        x: &mut CpuTensor,
        plan: &KvPlan,
        rotated_heads: usize,
        head_dim: usize,
        base: f32,
    ) -> Result<()> {
        let cols = x.shape[1];
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| base.powf(-2.0 * i as f32 / head_dim as f32))
            .collect();
        let positions = &plan.positions;
        let exec = self.exec(x.data.len() * 4);
        {
            exec.for_chunks(x.data_mut(), cols, |r, row| {
                let pos = positions[r] as f32;
                let turns: Vec<(f32, f32)> = inv_freq.iter().map(|f| (pos * f).sin_cos()).collect();
                for head in row[..rotated_heads * head_dim].chunks_exact_mut(head_dim) {
                    for (i, &(s, c)) in turns.iter().enumerate() {
                        let (a, b) = (head[2 * i], head[2 * i + 1]);
                        head[2 * i] = a * c - b * s;
                        head[2 * i + 1] = a * s + b * c;
                    }
                }
            })
        }
        Ok(())
    }

    fn run_kv_attention(
        &self,
        qkv: &CpuTensor,
        cache: &mut KvLayer<CpuTensor>,
        plan: &KvPlan,
        heads: Heads,
    ) -> Result<CpuTensor> {
        kv_attention::store(
            &qkv.data,
            cache.k.data_mut(),
            cache.v.data_mut(),
            plan,
            heads,
        );
        let context: usize = plan.positions.iter().map(|&p| p as usize + 1).sum();
        let work = 2 * context * heads.heads * heads.head_dim;
        let (k, v) = (&cache.k.data, &cache.v.data);
        let out = kv_attention::attend(&qkv.data, k, v, plan, heads, self.exec(work));
        Ok(CpuTensor::new(
            vec![plan.rows(), heads.heads * heads.head_dim],
            out,
        ))
    }

    fn run_silu_mul(&self, x: &CpuTensor) -> Result<CpuTensor> {
        let (m, f) = (x.shape[0], x.shape[1] / 2);
        let mut y = vec![0f32; m * f];
        {
            self.exec(m * f * 8).for_chunks(&mut y, f, |i, out| {
                let (g, u) = x.data[i * 2 * f..(i + 1) * 2 * f].split_at(f);
                for ((o, g), u) in out.iter_mut().zip(g).zip(u) {
                    *o = g / (1.0 + super::simd::exp(-g)) * u;
                }
            })
        }
        Ok(CpuTensor::new(vec![m, f], y))
    }

    fn run_select_rows(&self, x: &CpuTensor, rows: &[u32]) -> Result<CpuTensor> {
        let cols = x.shape[1];
        let mut y = Vec::with_capacity(rows.len() * cols);
        for &r in rows {
            y.extend_from_slice(&x.data[r as usize * cols..(r as usize + 1) * cols]);
        }
        Ok(CpuTensor::new(vec![rows.len(), cols], y))
    }

    fn run_argmax(&self, x: &CpuTensor) -> Result<Vec<u32>> {
        let cols = x.shape[1];
        Ok(x.data
            .chunks_exact(cols)
            .map(|row| {
                let mut best: Option<(usize, f32)> = None;
                for (i, &v) in row.iter().enumerate() {
                    if !v.is_nan() && best.is_none_or(|(_, b)| v > b) {
                        best = Some((i, v));
                    }
                }
                best.map_or(0, |(i, _)| i as u32)
            })
            .collect())
    }
}

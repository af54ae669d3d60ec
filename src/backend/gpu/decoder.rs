//! The decoder ops ([`DecoderBackend`]) on a GPU device: quantized weights uploaded as the
//! file's blocks, the step's plan uploaded once as index buffers, and each op a launch of its
//! kernel (`rmsnorm.cu`, `rope.cu`, `quant.cu`, `kv_attention.cu`, `swiglu.cu`,
//! `sampling.cu`, `gather_rows` in `elementwise.cu`).

use super::GpuBackend;
use crate::backend::decoder::{DecoderBackend, Heads, KvLayer, KvPlan, NormOut, PlanInfo, QInfo};
use crate::backend::device::Device;
use crate::error::Result;

/// A block-quantized weight in device memory, as the file stores it.
pub struct GpuQTensor<B> {
    pub(super) buf: B,
    pub(super) info: QInfo,
}

/// A [`KvPlan`] in device memory: per row its position, slot and table start (i32), and the
/// block tables.
pub struct GpuPlan<B> {
    pub(super) positions: B,
    pub(super) slots: B,
    pub(super) starts: B,
    pub(super) tables: B,
    pub(super) rows: usize,
    pub(super) block_size: usize,
    /// [`KvPlan::keys_bound`]: what the flash kernel cuts into chunks.
    pub(super) keys_bound: usize,
    cache_slots: usize,
}

impl<B> PlanInfo for GpuPlan<B> {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cache_slots(&self) -> usize {
        self.cache_slots
    }
}

impl<D: Device> DecoderBackend for GpuBackend<D> {
    type QTensor = GpuQTensor<D::Buf>;
    type Plan = GpuPlan<D::Buf>;

    fn qinfo(&self, w: &Self::QTensor) -> QInfo {
        w.info
    }

    fn value_bytes(&self) -> usize {
        self.dtype.size()
    }

    fn run_load_quantized(&self, info: QInfo, bytes: &[u8]) -> Result<Self::QTensor> {
        Ok(GpuQTensor {
            buf: self.dev.upload(bytes)?,
            info,
        })
    }

    fn run_upload_plan(&self, plan: &KvPlan) -> Result<Self::Plan> {
        let ints = |what: &str, v: &[u32]| {
            // An empty table list still gets a buffer: kernels take its address.
            let v: Vec<usize> = if v.is_empty() {
                vec![0]
            } else {
                v.iter().map(|&x| x as usize).collect()
            };
            self.ints(what, v.into_iter())
        };
        Ok(GpuPlan {
            positions: ints("positions", &plan.positions)?,
            slots: ints("slots", &plan.slots)?,
            starts: ints("table starts", &plan.starts)?,
            tables: ints("block tables", &plan.tables)?,
            rows: plan.rows(),
            block_size: plan.block_size(),
            keys_bound: plan.keys_bound(),
            cache_slots: plan.cache_slots(),
        })
    }

    fn run_embed_quantized(&self, ids: &[u32], table: &Self::QTensor) -> Result<Self::Tensor> {
        self.launch_qembed(ids, table)
    }

    fn run_qlinear(&self, x: &Self::Tensor, w: &Self::QTensor) -> Result<Self::Tensor> {
        self.launch_qmatmul(x, w)
    }

    fn run_rms_norm(
        &self,
        x: &Self::Tensor,
        residual: Option<&Self::Tensor>,
        gamma: &Self::Tensor,
        eps: f32,
    ) -> Result<NormOut<Self::Tensor>> {
        self.launch_rms_norm(x, residual, gamma, eps)
    }

    fn run_rope(
        &self,
        x: &mut Self::Tensor,
        plan: &Self::Plan,
        rotated_heads: usize,
        head_dim: usize,
        base: f32,
    ) -> Result<()> {
        self.launch_rope(x, plan, rotated_heads, head_dim, base)
    }

    fn run_kv_attention(
        &self,
        qkv: &Self::Tensor,
        cache: &mut KvLayer<Self::Tensor>,
        plan: &Self::Plan,
        heads: Heads,
    ) -> Result<Self::Tensor> {
        self.launch_kv_attention(qkv, cache, plan, heads)
    }

    fn run_silu_mul(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        self.launch_silu_mul(x)
    }

    fn run_select_rows(&self, x: &Self::Tensor, rows: &[u32]) -> Result<Self::Tensor> {
        self.launch_gather_rows(x, rows)
    }

    fn run_argmax(&self, x: &Self::Tensor) -> Result<Vec<u32>> {
        self.launch_argmax(x)
    }
}

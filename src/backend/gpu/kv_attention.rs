//! Launchers of `kernels/kv_attention.cu`: the step's keys and values stored into their cache
//! slots, then the attention of every (row, query head) pair over its sequence's cache, one
//! warp each, on the same stream (so the store is complete before any row reads the cache).

use super::decoder::GpuPlan;
use super::{GpuBackend, GpuTensor, params};
use crate::backend::decoder::{Heads, KvLayer};
use crate::backend::device::{Device, KernelArg, LaunchConfig};
use crate::error::{Error, Result};

impl<D: Device> GpuBackend<D> {
    pub(super) fn launch_kv_attention(
        &self,
        qkv: &GpuTensor<D::Buf>,
        cache: &KvLayer<GpuTensor<D::Buf>>,
        plan: &GpuPlan<D::Buf>,
        h: Heads,
    ) -> Result<GpuTensor<D::Buf>> {
        if h.head_dim > params::KV_MAX_HEAD_DIM as usize {
            return Err(Error::kernel(
                self.dev.name(),
                self.kernel("kv_attention"),
                format!(
                    "head dimension {} is above the kernel's {}",
                    h.head_dim,
                    params::KV_MAX_HEAD_DIM
                ),
            ));
        }
        let rows = plan.rows;
        let addr = |b: &D::Buf| KernelArg::Ptr(self.dev.address(b));
        self.launch(
            &self.kernel("kv_store"),
            self.elementwise_cfg(rows * h.kv_width()),
            &[
                self.ptr(qkv)?,
                self.ptr(&cache.k)?,
                self.ptr(&cache.v)?,
                addr(&plan.slots),
                self.u32("rows", rows)?,
                self.u32("qkv width", h.qkv_width())?,
                self.u32("query width", h.heads * h.head_dim)?,
                self.u32("kv width", h.kv_width())?,
            ],
        )?;
        let out = self.alloc(vec![rows, h.heads * h.head_dim])?;
        let pairs = rows * h.heads;
        self.launch(
            &self.kernel("kv_attention"),
            LaunchConfig::linear(
                self.grid("pairs", pairs.div_ceil(params::KV_WARPS as usize))?,
                32 * params::KV_WARPS,
                0,
            ),
            &[
                self.ptr(qkv)?,
                self.ptr(&cache.k)?,
                self.ptr(&cache.v)?,
                addr(&plan.positions),
                addr(&plan.starts),
                addr(&plan.tables),
                self.ptr(&out)?,
                self.u32("rows", rows)?,
                self.u32("heads", h.heads)?,
                self.u32("kv heads", h.kv_heads)?,
                self.u32("head_dim", h.head_dim)?,
                self.u32("block_size", plan.block_size)?,
            ],
        )?;
        Ok(out)
    }
}

//! Launchers of `kernels/kv_attention.cu`: the step's keys and values stored into their cache
//! slots, then the attention of every (row, query head) pair over its sequence's cache, on the
//! same stream (so the store is complete before any row reads the cache). The attention is the
//! split-KV flash kernel ([`AttentionKernel::Flash`], where the head fits its 16-byte vectors)
//! or the simple one (one warp per pair; the parity reference and the fallback).

use super::decoder::GpuPlan;
use super::{AttentionKernel, GpuBackend, GpuTensor, params};
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
        if pairs == 0 {
            return Ok(out);
        }
        if self.kv_flash_fits(qkv, cache, &out, h) {
            self.launch_kv_flash(qkv, cache, plan, h, &out)?;
            return Ok(out);
        }
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

    /// Whether the flash kernel is chosen and takes this head: a whole number of 16-byte
    /// vectors, at most 32 of them (a lane group fits in a warp), every tensor 16-byte aligned.
    fn kv_flash_fits(
        &self,
        qkv: &GpuTensor<D::Buf>,
        cache: &KvLayer<GpuTensor<D::Buf>>,
        out: &GpuTensor<D::Buf>,
        h: Heads,
    ) -> bool {
        let per_vec = 16 / self.dtype.size();
        self.attention == AttentionKernel::Flash
            && h.head_dim.is_multiple_of(per_vec)
            && h.head_dim / per_vec <= 32
            && [qkv, &cache.k, &cache.v, out]
                .iter()
                .all(|t| self.dev.address(&t.buf).is_multiple_of(16))
    }

    /// `kv_flash` over the chunks [`KvSplit::chunks`] gives, then `kv_flash_combine` when
    /// there is more than one.
    fn launch_kv_flash(
        &self,
        qkv: &GpuTensor<D::Buf>,
        cache: &KvLayer<GpuTensor<D::Buf>>,
        plan: &GpuPlan<D::Buf>,
        h: Heads,
        out: &GpuTensor<D::Buf>,
    ) -> Result<()> {
        let pairs = plan.rows * h.heads;
        // A block per (row, key/value head, chunk): the query heads sharing it go in turn.
        let kv_pairs = plan.rows * h.kv_heads;
        let (chunk, splits) = self.kv_split.chunks(kv_pairs, plan.keys_bound);
        let group = (h.head_dim / (16 / self.dtype.size())).next_power_of_two();
        // f32 (maximum, sum, weighted sum) per (pair, chunk); with one chunk the kernel writes
        // the output and never touches it (a null pointer, no allocation).
        let partial = match splits {
            1 => None,
            _ => Some(self.dev.alloc(pairs * splits * (2 + h.head_dim) * 4)?),
        };
        let addr = |b: &D::Buf| KernelArg::Ptr(self.dev.address(b));
        let partial_arg = partial.as_ref().map_or(KernelArg::Ptr(0), addr);
        self.launch(
            &self.kernel("kv_flash"),
            LaunchConfig {
                grid: [
                    self.grid("rows x key/value heads", kv_pairs)?,
                    self.grid("key chunks", splits)?,
                    1,
                ],
                block: [32 * params::KV_FLASH_WARPS, 1, 1],
                shared_bytes: 0,
            },
            &[
                self.ptr(qkv)?,
                self.ptr(&cache.k)?,
                self.ptr(&cache.v)?,
                addr(&plan.positions),
                addr(&plan.starts),
                addr(&plan.tables),
                self.ptr(out)?,
                partial_arg,
                self.u32("heads", h.heads)?,
                self.u32("kv heads", h.kv_heads)?,
                self.u32("head_dim", h.head_dim)?,
                self.u32("block_size", plan.block_size)?,
                self.u32("lane group", group)?,
                self.u32("chunk", chunk)?,
            ],
        )?;
        if partial.is_none() {
            return Ok(());
        }
        self.launch(
            &self.kernel("kv_flash_combine"),
            LaunchConfig::linear(
                self.grid("pairs", pairs.div_ceil(params::KV_WARPS as usize))?,
                32 * params::KV_WARPS,
                0,
            ),
            &[
                partial_arg,
                self.ptr(out)?,
                self.u32("pairs", pairs)?,
                self.u32("chunks", splits)?,
                self.u32("head_dim", h.head_dim)?,
            ],
        )
    }
}

/// How the flash kernel cuts a row's keys into chunks, one block each (grid.y): enough blocks
/// to fill the GPU when a decode step has few rows, and chunks long enough that the
/// combination of their partial results stays a small part of the work. Chunks cover the
/// step's [`KvPlan::keys_bound`](crate::backend::decoder::KvPlan::keys_bound) (its longest
/// block table), not its longest row, so a sequence's steps launch alike until its table grows;
/// chunks past a row's position are empty and cost a block that returns at once.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct KvSplit {
    /// Blocks a launch aims for (rows x key/value heads x chunks). Default 512: about four
    /// 128-thread blocks per SM on an H200's 132 SMs, one wave with room for the tail.
    pub target_blocks: usize,
    /// Fewest keys in a chunk. Default 64: two passes of a block's warps over 16-byte vectors
    /// at head dimension 64 in f16 (4 warps x 4 keys x 2 unrolled), so a chunk's partial
    /// result (2 + head_dim floats written and read back) is small beside its keys.
    pub min_chunk: usize,
    /// Most keys in a chunk. Default 256: the query heads that share a key/value head read
    /// the block's chunk in turn, and 256 keys and values of head dimension 128 in f16 (128
    /// KiB) still fit an SM's L1 for the second and later heads. Below `min_chunk` it is
    /// `min_chunk`.
    pub max_chunk: usize,
}

impl Default for KvSplit {
    fn default() -> KvSplit {
        KvSplit {
            target_blocks: 512,
            min_chunk: 64,
            max_chunk: 256,
        }
    }
}

impl KvSplit {
    /// (keys per chunk, chunks) for `pairs` (row, key/value head) pairs whose rows attend over
    /// at most `longest` keys: about `target_blocks / pairs` chunks, of `min_chunk` to
    /// `max_chunk` keys, at most 65535 of them (the grid's y limit; longer chunks then).
    pub fn chunks(&self, pairs: usize, longest: usize) -> (usize, usize) {
        let longest = longest.max(1);
        let want = self
            .target_blocks
            .div_ceil(pairs.max(1))
            .clamp(1, u16::MAX as usize);
        let min = self.min_chunk.max(1);
        let chunk = longest
            .div_ceil(want)
            .clamp(min, self.max_chunk.max(min))
            .max(longest.div_ceil(u16::MAX as usize));
        (chunk, longest.div_ceil(chunk))
    }
}

#[cfg(test)]
mod tests {
    use super::KvSplit;

    #[test]
    fn chunks_cover_the_longest_row_within_the_limits() {
        let s = KvSplit::default();
        // A decode step of one row, 4 key/value heads, 4096 keys: 64 chunks of 64 (256
        // blocks; min_chunk keeps them from being shorter).
        assert_eq!(s.chunks(4, 4096), (64, 64));
        // 32 rows: 128 pairs want 4 chunks of 1024, capped at 256.
        assert_eq!(s.chunks(128, 4096), (256, 16));
        // Few keys: one chunk of at least min_chunk; 8 pairs x 64 chunks of 64.
        assert_eq!(s.chunks(4, 10), (64, 1));
        assert_eq!(s.chunks(8, 4096), (64, 64));
        for pairs in [1, 3, 32, 100, 513, 100_000] {
            for longest in [0, 1, 7, 64, 65, 1000, 4097, 1 << 20, 1 << 31] {
                for (min_chunk, max_chunk) in [(0, 0), (1, 4), (5, 5), (64, 256), (300, 256)] {
                    let k = KvSplit {
                        target_blocks: 512,
                        min_chunk,
                        max_chunk,
                    };
                    let (chunk, n) = k.chunks(pairs, longest);
                    let what = format!("{pairs} pairs, {longest} keys, {min_chunk}..{max_chunk}");
                    assert!(chunk >= min_chunk.max(1) && n >= 1, "{what}");
                    assert!(
                        chunk * n >= longest && chunk * (n - 1) < longest.max(1),
                        "{what}"
                    );
                    assert!(n <= u16::MAX as usize, "{what}: {n} chunks");
                    // Within max_chunk unless the grid's limit needs longer ones.
                    let cap = max_chunk.max(min_chunk).max(1);
                    if (longest as u64) < cap as u64 * u16::MAX as u64 {
                        assert!(chunk <= cap, "{what}: chunk {chunk}");
                    }
                }
            }
        }
    }
}

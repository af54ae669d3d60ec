//! The paged key/value cache of a decoder: per layer one key and one value tensor of
//! `blocks * block_size` slots, handed out to sequences a block at a time. A sequence holds a
//! table of its blocks ([`SeqCache`]); growing it takes free blocks, and when none are left the
//! growth is refused with [`Error::CacheFull`] (nothing running is evicted). Releasing a
//! sequence returns its blocks at once.

use crate::backend::decoder::{DecoderBackend, KvLayer};
use crate::error::{Error, Result};

/// Size of the cache.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct KvCacheConfig {
    /// Positions per block. Default 16: small enough that a sequence wastes at most 15 slots,
    /// large enough that block tables stay short.
    pub block_size: usize,
    /// Bytes the cache may take on its backend (keys and values of every layer). Default
    /// 256 MiB: for SmolLM2-135M in f32 (30 layers, 3 key/value heads of 64) that is 5,824
    /// positions, e.g. 45 sequences of 128 tokens.
    pub budget_bytes: usize,
}

impl Default for KvCacheConfig {
    fn default() -> Self {
        KvCacheConfig {
            block_size: 16,
            budget_bytes: 256 << 20,
        }
    }
}

/// One sequence's share of the cache: its blocks, in position order, and how many positions
/// they hold so far.
#[derive(Debug, Default)]
pub struct SeqCache {
    table: Vec<u32>,
    len: usize,
}

impl SeqCache {
    pub fn table(&self) -> &[u32] {
        &self.table
    }
    /// Positions written so far.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

pub struct KvCache<B: DecoderBackend> {
    pub(crate) layers: Vec<KvLayer<B::Tensor>>,
    block_size: usize,
    blocks: usize,
    free: Vec<u32>,
}

impl<B: DecoderBackend> KvCache<B> {
    /// A cache for `layers` layers of `kv_width` values per position, as large as the budget
    /// allows (at least one block).
    pub fn new(be: &B, layers: usize, kv_width: usize, cfg: KvCacheConfig) -> Result<KvCache<B>> {
        if cfg.block_size == 0 || cfg.block_size > 1024 {
            return Err(Error::config("kv block_size", cfg.block_size, "1..=1024"));
        }
        let per_block = layers * 2 * cfg.block_size * kv_width * be.value_bytes();
        let blocks = cfg.budget_bytes / per_block.max(1);
        if blocks == 0 {
            return Err(Error::config(
                "kv budget_bytes",
                cfg.budget_bytes,
                format!("at least one block ({per_block} bytes)"),
            ));
        }
        let slots = blocks * cfg.block_size;
        let layers = (0..layers)
            .map(|_| be.alloc_kv_layer(slots, kv_width))
            .collect::<Result<_>>()?;
        Ok(KvCache {
            layers,
            block_size: cfg.block_size,
            blocks,
            // Popped from the end: block 0 first.
            free: (0..blocks as u32).rev().collect(),
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn blocks(&self) -> usize {
        self.blocks
    }
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }
    /// Positions the whole cache holds.
    pub fn capacity(&self) -> usize {
        self.blocks * self.block_size
    }

    /// Blocks a sequence of `len` positions takes.
    pub fn blocks_for(&self, len: usize) -> usize {
        len.div_ceil(self.block_size)
    }

    /// Grows `seq` to hold `len` positions, taking blocks from the free list; refused (and
    /// nothing taken) when there are not enough.
    pub fn reserve(&mut self, seq: &mut SeqCache, len: usize) -> Result<()> {
        let need = self.blocks_for(len).saturating_sub(seq.table.len());
        if need > self.free.len() {
            return Err(Error::CacheFull(format!(
                "{len} positions need {need} more blocks of {} but {} of {} are free",
                self.block_size,
                self.free.len(),
                self.blocks
            )));
        }
        for _ in 0..need {
            seq.table.push(self.free.pop().expect("counted above"));
        }
        Ok(())
    }

    /// Records that `seq` now holds `len` positions (after a step wrote them).
    pub(crate) fn set_len(&self, seq: &mut SeqCache, len: usize) {
        debug_assert!(self.blocks_for(len) <= seq.table.len());
        seq.len = len;
    }

    /// Returns every block of `seq` to the free list.
    pub fn release(&mut self, seq: &mut SeqCache) {
        self.free.append(&mut seq.table);
        seq.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{CpuBackend, CpuConfig};

    /// A budget beyond what any machine has is an error that names the allocation, not an
    /// abort of the process; a small one gives whole blocks.
    #[test]
    fn a_budget_beyond_memory_is_an_error() {
        let be = CpuBackend::new(CpuConfig {
            threads: Some(1),
            ..Default::default()
        })
        .unwrap();
        let huge = KvCacheConfig {
            budget_bytes: usize::MAX,
            ..KvCacheConfig::default()
        };
        let err = KvCache::new(&be, 30, 192, huge).err().expect("refused");
        assert!(err.to_string().contains("cannot allocate"), "{err}");
        let small = KvCacheConfig {
            budget_bytes: 1 << 20,
            ..KvCacheConfig::default()
        };
        let c = KvCache::new(&be, 2, 8, small).unwrap();
        assert_eq!(c.blocks(), (1 << 20) / (2 * 2 * 16 * 8 * 4));
        assert!(crate::backend::decoder::zeroed_f32(usize::MAX, 2).is_err());
    }
}

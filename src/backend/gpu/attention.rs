//! Launcher of `kernels/attention.cu`: fused QK^T, mask, softmax and PV. The simple kernel: one
//! warp per query row, `ATTN_WARPS` rows per block, the scores of each row in shared memory. The
//! flash kernel (f16/bf16, by [`AttentionKernel`]): tensor cores over shared tiles of K and V.

use super::{GpuBackend, GpuTensor, params};
use crate::backend::device::{Device, KernelArg, LaunchConfig};
use crate::backend::op_check::AttentionCall;
use crate::error::Result;
use crate::tensor::DType;

impl<D: Device> GpuBackend<D> {
    pub(super) fn launch_attention(
        &self,
        c: AttentionCall<'_, GpuTensor<D::Buf>>,
    ) -> Result<GpuTensor<D::Buf>> {
        let out = self.alloc(vec![c.rows, c.width])?;
        if c.rows == 0 {
            return Ok(out);
        }
        let warps = params::ATTN_WARPS as usize;
        let seq = c.shape.seq;
        let lengths = self.ints("length", c.shape.lengths.iter().copied())?;
        let args = [
            self.ptr(c.qkv)?,
            KernelArg::Ptr(self.dev.address(&lengths)),
            self.ptr(&out)?,
            self.u32("seq", seq)?,
            self.u32("width", c.width)?,
            self.u32("heads", c.heads)?,
            KernelArg::F32(1.0 / ((c.width / c.heads) as f32).sqrt()),
        ];
        let d = c.width / c.heads;
        // d in {32, 64, 128} makes every row of qkv and out 16-byte aligned when qkv is.
        if self.attention == AttentionKernel::Flash
            && self.dtype != DType::F32
            && matches!(d, 32 | 64 | 128)
            && self.dev.address(&c.qkv.buf).is_multiple_of(16)
        {
            let pairs = c.shape.batch() * c.heads;
            let (form, bq) = if self.flash_wide(pairs, seq, d) {
                ("attention_flash_wide", 2 * params::ATTN_FLASH_BQ)
            } else {
                ("attention_flash", params::ATTN_FLASH_BQ)
            };
            let cfg = LaunchConfig {
                grid: [
                    self.grid("inputs x heads", pairs)?,
                    self.grid("query blocks", seq.div_ceil(bq as usize))?,
                    1,
                ],
                block: [params::ATTN_FLASH_THREADS, 1, 1],
                shared_bytes: super::shared_memory::flash(bq, d as u32),
            };
            self.launch(&self.kernel(&format!("{form}_d{d}")), cfg, &args)?;
            return Ok(out);
        }
        // The simple kernel keeps a row of scores per warp in shared memory: seq is bounded.
        let smem = self.shared_bytes("attention", warps.saturating_mul(seq), || {
            format!("attention over {seq} positions")
        })?;
        let cfg = LaunchConfig {
            grid: [
                self.grid("inputs x heads", c.shape.batch() * c.heads)?,
                self.grid("query blocks", seq.div_ceil(warps))?,
                1,
            ],
            block: [params::ATTN_WARPS * 32, 1, 1],
            shared_bytes: smem,
        };
        self.launch(&self.kernel("attention"), cfg, &args)?;
        Ok(out)
    }

    /// Whether the flash attention of `pairs` (inputs x heads) over `seq` positions with head
    /// size `d` takes the wide block (128 query rows): never above d = 64 (its registers
    /// would spill), else by [`FlashTile`], and for `Auto` where its blocks number at least
    /// `ATTN_FLASH_WIDE_MIN_BLOCKS` per multiprocessor (the count the GEMMs fill,
    /// [`GpuBackend::with_gemm_fill_tiles`]).
    fn flash_wide(&self, pairs: usize, seq: usize, d: usize) -> bool {
        if d > 64 {
            return false;
        }
        match self.flash_tile {
            FlashTile::Narrow => false,
            FlashTile::Wide => true,
            FlashTile::Auto => {
                let blocks = pairs * seq.div_ceil(2 * params::ATTN_FLASH_BQ as usize);
                blocks
                    >= (params::ATTN_FLASH_WIDE_MIN_BLOCKS as usize).saturating_mul(self.gemm_fill)
            }
        }
    }
}

/// The block of the encoders' flash attention (kernels/attention.cu). The default is the
/// narrow block, the one measured on a GPU; the wide one is compiled and emulated, not run on
/// a GPU yet.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum FlashTile {
    /// The wide block where its blocks fill the GPU (at least `ATTN_FLASH_WIDE_MIN_BLOCKS` per
    /// multiprocessor: long sequences, or many inputs) and the head size allows, else the
    /// narrow one.
    Auto,
    /// 64 query rows per block, 16 per warp (`attention_flash_*`).
    #[default]
    Narrow,
    /// 128 query rows per block, two 16-row blocks per warp sharing each K and V fragment read
    /// from shared memory (`attention_flash_wide_*`); head sizes 32 and 64 (at 128 its
    /// registers would spill: the narrow block runs there).
    Wide,
}

kernel_switch!(FlashTile, "APPARATE_GPU_FLASH_TILE", "flash attention block", default Narrow, {
    "auto" => Auto,
    "narrow" => Narrow,
    "wide" => Wide,
});

/// The attention kernels of a [`GpuBackend`]: the encoders' (f16/bf16; f32 always runs the
/// simple kernel) and the decoder's over its paged key/value cache (every dtype).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// One warp per query row (encoders) or per (row, head) pair (decoder), scalar f32
    /// arithmetic, K and V read from global memory per row: the parity reference for the flash
    /// kernels and their fallback.
    Simple,
    /// Encoders: tensor-core scores and weighted sums over shared-memory tiles of K and V with
    /// an online softmax (kernels/attention.cu); needs a head dimension of 32, 64 or 128.
    /// Decoder: split-KV ("flash-decoding", kernels/kv_attention.cu): a row's keys in chunks
    /// across blocks, read as 16-byte vectors, the chunks combined by a second kernel; needs a
    /// head dimension that is a whole number of 16-byte vectors, at most 32 of them. Other
    /// heads run the simple kernels.
    Flash,
}

kernel_switch!(AttentionKernel, "APPARATE_GPU_ATTENTION", "attention kernel", default Flash, {
    "simple" => Simple,
    "flash" => Flash,
});

#[cfg(test)]
mod tests {
    use super::FlashTile;
    use crate::backend::emu::{EmuConfig, EmuDevice};
    use crate::backend::gpu::GpuBackend;
    use crate::tensor::DType;

    #[test]
    fn flash_tiles_by_name() {
        assert_eq!("wide".parse(), Ok(FlashTile::Wide));
        assert_eq!("narrow".parse(), Ok(FlashTile::Narrow));
        assert_eq!("auto".parse(), Ok(FlashTile::Auto));
        let e = "Wide".parse::<FlashTile>().unwrap_err();
        assert!(
            e.contains("`Wide`") && e.contains("auto, narrow, wide"),
            "{e}"
        );
    }

    /// The shapes docs/architecture.md names: on 132 multiprocessors the wide block (128
    /// query rows) needs 264 blocks of (input, head, 128 queries).
    #[test]
    fn auto_takes_the_wide_block_where_its_blocks_fill_the_gpu() {
        let dev = EmuDevice::new(EmuConfig {
            multiprocessors: Some(132),
            ..Default::default()
        })
        .unwrap();
        let be = GpuBackend::new(dev, DType::F16).with_flash_tile(FlashTile::Auto);
        // MiniLM's 12 heads at 128 tokens: from batch 22.
        assert!(!be.flash_wide(21 * 12, 128, 32));
        assert!(be.flash_wide(22 * 12, 128, 32));
        // BERT-base's 12 heads at 512 tokens: from batch 6.
        assert!(!be.flash_wide(5 * 12, 512, 64));
        assert!(be.flash_wide(6 * 12, 512, 64));
        let wide = be.clone().with_flash_tile(FlashTile::Wide);
        assert!(wide.flash_wide(1, 1, 64));
        // Head size 128: the narrow block, whatever is asked for.
        assert!(!wide.flash_wide(1, 1, 128));
        assert!(!be.flash_wide(1 << 20, 4096, 128));
        assert!(
            !be.with_flash_tile(FlashTile::Narrow)
                .flash_wide(1 << 20, 4096, 32)
        );
    }
}

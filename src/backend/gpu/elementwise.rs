//! Launchers of `kernels/elementwise.cu`: casts between storage dtypes and the plain copy that
//! the kernel benchmarks use as their memory-bandwidth yardstick. Device-level (no tensors):
//! they work on raw buffers of any device.

use super::params;
use crate::backend::device::{Device, KernelArg, LaunchConfig};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// A grid-stride launch over `n` elements (every grid-stride kernel's: im2col, grouped
/// convolution, pooling, casts, copies), its grid capped at `ELEMENTWISE_MAX_BLOCKS`.
pub(super) fn cfg(n: usize) -> LaunchConfig {
    let blocks = n
        .div_ceil(params::ELEMENTWISE_THREADS as usize)
        .clamp(1, params::ELEMENTWISE_MAX_BLOCKS as usize);
    LaunchConfig::linear(blocks as u32, params::ELEMENTWISE_THREADS, 0)
}

/// The most threads a grid-stride launch has (its stride): `ELEMENTWISE_MAX_BLOCKS` blocks of
/// `ELEMENTWISE_THREADS`. A kernel's 32-bit index must stay below 2^32 after its last step.
pub(super) fn max_grid_threads() -> usize {
    (params::ELEMENTWISE_MAX_BLOCKS * params::ELEMENTWISE_THREADS) as usize
}

fn count<D: Device>(dev: &D, what: &str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| {
        Error::device(
            dev.name(),
            format!("{what} = {n}"),
            "does not fit the kernels' 32-bit sizes",
        )
    })
}

fn fits<D: Device>(dev: &D, buf: &D::Buf, bytes: usize, what: &str) -> Result<()> {
    if dev.len(buf) < bytes {
        return Err(Error::device(
            dev.name(),
            what,
            format!("a buffer of {} bytes, {bytes} needed", dev.len(buf)),
        ));
    }
    Ok(())
}

/// Copies the first `words` u32 of `src` into `dst` (`copy_u32`).
pub fn copy_words<D: Device>(dev: &D, src: &D::Buf, dst: &D::Buf, words: usize) -> Result<()> {
    fits(dev, src, words * 4, "copy source")?;
    fits(dev, dst, words * 4, "copy destination")?;
    let args = [
        KernelArg::Ptr(dev.address(src)),
        KernelArg::Ptr(dev.address(dst)),
        KernelArg::U32(count(dev, "words", words)?),
    ];
    // SAFETY: copy_u32(const uint32_t*, uint32_t*, uint32_t n) on two live buffers of this
    // device holding at least `words` u32 each (checked above).
    unsafe { dev.launch("copy_u32", cfg(words), &args) }
}

/// Copies the first `vectors` 16-byte vectors of `src` into `dst` (`copy_vec16`, four per
/// thread): the benchmarks' bandwidth yardstick. Both buffers 16-byte aligned (every device
/// allocation is).
pub fn copy_vectors<D: Device>(dev: &D, src: &D::Buf, dst: &D::Buf, vectors: usize) -> Result<()> {
    fits(dev, src, vectors * 16, "copy source")?;
    fits(dev, dst, vectors * 16, "copy destination")?;
    for (what, b) in [("copy source", src), ("copy destination", dst)] {
        if !dev.address(b).is_multiple_of(16) {
            return Err(Error::device(dev.name(), what, "not 16-byte aligned"));
        }
    }
    // The kernel's unrolled index i + 3 * stride must not wrap: stride is at most
    // ELEMENTWISE_MAX_BLOCKS * ELEMENTWISE_THREADS = 2^28.
    if vectors > u32::MAX as usize - 4 * max_grid_threads() {
        return Err(Error::device(
            dev.name(),
            format!("vectors = {vectors}"),
            "too many for copy_vec16's 32-bit indices",
        ));
    }
    let blocks = vectors
        .div_ceil(4 * params::ELEMENTWISE_THREADS as usize)
        .clamp(1, params::ELEMENTWISE_MAX_BLOCKS as usize);
    let args = [
        KernelArg::Ptr(dev.address(src)),
        KernelArg::Ptr(dev.address(dst)),
        KernelArg::U32(count(dev, "vectors", vectors)?),
    ];
    let cfg = LaunchConfig::linear(blocks as u32, params::ELEMENTWISE_THREADS, 0);
    // SAFETY: copy_vec16(const Vec16*, Vec16*, uint32_t n) on two live, 16-byte aligned
    // buffers of this device holding at least `vectors` 16-byte vectors each (checked above).
    unsafe { dev.launch("copy_vec16", cfg, &args) }
}

/// Converts `n` values of `from` in `src` to `to` in `dst` (`cast_<from>_<to>`; one side f32).
pub fn cast<D: Device>(
    dev: &D,
    src: &D::Buf,
    from: DType,
    dst: &D::Buf,
    to: DType,
    n: usize,
) -> Result<()> {
    if (from == DType::F32) == (to == DType::F32) {
        return Err(Error::device(
            dev.name(),
            format!("cast from {from} to {to}"),
            "one side must be f32 (there are no other cast kernels)",
        ));
    }
    fits(dev, src, n * from.size(), "cast source")?;
    fits(dev, dst, n * to.size(), "cast destination")?;
    let kernel = format!("cast_{}_{}", from.name(), to.name());
    let args = [
        KernelArg::Ptr(dev.address(src)),
        KernelArg::Ptr(dev.address(dst)),
        KernelArg::U32(count(dev, "values", n)?),
    ];
    // SAFETY: cast_X_Y(const X*, Y*, uint32_t n) on two live buffers holding at least `n`
    // values of their dtypes (checked above).
    unsafe { dev.launch(&kernel, cfg(n), &args) }
}

impl<D: Device> super::GpuBackend<D> {
    /// `y[i] = x[rows[i]]` (`gather_rows`).
    pub(super) fn launch_gather_rows(
        &self,
        x: &super::GpuTensor<D::Buf>,
        rows: &[u32],
    ) -> Result<super::GpuTensor<D::Buf>> {
        let cols = x.shape[1];
        let y = self.alloc(vec![rows.len(), cols])?;
        let idx = self.ints("rows", rows.iter().map(|&r| r as usize))?;
        self.launch(
            &self.kernel("gather_rows"),
            cfg(rows.len() * cols),
            &[
                self.ptr(x)?,
                KernelArg::Ptr(self.dev.address(&idx)),
                self.ptr(&y)?,
                self.u32("rows", rows.len())?,
                self.u32("cols", cols)?,
            ],
        )?;
        Ok(y)
    }
}

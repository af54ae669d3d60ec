//! Loops that run on the worker pool or inline on the calling thread.
//!
//! Handing an op to the rayon pool costs a cross-thread wake-up and wait: measured on the
//! 2-core development machine (Intel Xeon), a 64-channel global average pool over 7x7 pixels
//! took 19 us through the pool with 2 workers and 60 us with 1, against 3.5 us as a plain loop
//! on the caller (0.4-0.5 us through the backend's inline path). A
//! batch-1 CNN runs dozens of such ops, and a ramp is a few of them, so small ops (and every op
//! of a 1-thread backend) run inline; the [`gemm::Parallelism`] an op is given says which.

use gemm::Parallelism;
use rayon::prelude::*;

fn parallel(par: Parallelism) -> bool {
    !matches!(par, Parallelism::None)
}

/// `f(index, chunk)` over `out` in chunks of `size`.
pub(crate) fn for_chunks<T: Send>(
    out: &mut [T],
    size: usize,
    par: Parallelism,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    let size = size.max(1);
    if parallel(par) {
        out.par_chunks_mut(size)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        out.chunks_mut(size).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// `f(i)` for `i` in `0..n`.
pub(crate) fn for_indices(n: usize, par: Parallelism, f: impl Fn(usize) + Sync + Send) {
    if parallel(par) {
        (0..n).into_par_iter().for_each(f);
    } else {
        (0..n).for_each(f);
    }
}

/// `[f(0), .., f(n - 1)]`.
pub(crate) fn map_indices<R: Send>(
    n: usize,
    par: Parallelism,
    f: impl Fn(usize) -> R + Sync + Send,
) -> Vec<R> {
    if parallel(par) {
        (0..n).into_par_iter().map(f).collect()
    } else {
        (0..n).map(f).collect()
    }
}

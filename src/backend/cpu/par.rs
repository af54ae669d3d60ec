//! Loops that run on the backend's team or inline on the calling thread.
//!
//! Handing an op to other threads costs a cross-thread wake-up and wait: a batch-1 CNN runs
//! dozens of ops of a few microseconds each, and a ramp is a few of them, so small ops (and every
//! op of a 1-thread backend) run inline; the [`Exec`] an op is given says which. Every op of
//! the backend, GEMMs included, runs on one team of threads (`team.rs`), so no two thread pools
//! compete for the cores.

pub(crate) use super::team::Exec;

/// `f(index, chunk)` over `out` in chunks of `size`.
pub(crate) fn for_chunks<T: Send>(
    out: &mut [T],
    size: usize,
    exec: Exec<'_>,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    exec.for_chunks(out, size, f)
}

/// `f(i)` for `i` in `0..n`.
pub(crate) fn for_indices(n: usize, exec: Exec<'_>, f: impl Fn(usize) + Sync) {
    exec.for_each(n, &f)
}

/// `[f(0), .., f(n - 1)]`.
pub(crate) fn map_indices<R: Send>(
    n: usize,
    exec: Exec<'_>,
    f: impl Fn(usize) -> R + Sync,
) -> Vec<R> {
    exec.map(n, f)
}

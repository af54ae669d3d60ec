//! Recycled output buffers: the large `Vec<f32>`s of dropped [`super::CpuTensor`]s are kept and
//! handed to the next op that needs one of about the same size.
//!
//! Why: a forward pass allocates a fresh output for every op, and above glibc's mmap threshold
//! each such allocation is a new mapping: the kernel zeroes every page on first touch and unmaps
//! it again at the free. Measured on the 2-core EPYC, page faults, page clearing and `memset`
//! took 5-12% of an EfficientNet-Lite0 batch-8 forward (perf). A recycled buffer is already
//! mapped, and ops that overwrite every element ([`take`]) skip the zeroing too.

use std::sync::Mutex;

/// Buffers smaller than this (in values) are left to the allocator: they come from its free
/// lists, already mapped, and keeping them would only fragment the pool.
const MIN_POOLED: usize = 16 * 1024;
/// Kept buffers, at most: a forward pass has a few live activations at a time.
const MAX_BUFFERS: usize = 8;
/// Kept values in all, at most (256 MiB of f32): what an idle backend may hold on to.
const MAX_POOLED: usize = 64 << 20;

static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// A buffer of `len` values whose contents are unspecified (stale values of an earlier tensor,
/// or zeros): for ops that write every element.
pub(crate) fn take(len: usize) -> Vec<f32> {
    if len >= MIN_POOLED {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        // The smallest kept buffer that fits without wasting more than half of itself.
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len && b.capacity() / 2 <= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        if let Some(i) = best {
            let mut b = pool.swap_remove(i);
            drop(pool);
            b.resize(len, 0.0);
            return b;
        }
    }
    vec![0.0; len]
}

/// A buffer of `len` zeros.
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    let mut b = take(len);
    b.fill(0.0);
    b
}

/// Gives a buffer back for reuse (or frees it when the pool is full).
pub(crate) fn give(b: Vec<f32>) {
    if b.capacity() < MIN_POOLED {
        return;
    }
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let held: usize = pool.iter().map(|b| b.capacity()).sum();
    if pool.len() < MAX_BUFFERS && held + b.capacity() <= MAX_POOLED {
        pool.push(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_with_the_asked_length() {
        let big = MIN_POOLED * 3;
        let mut b = take(big);
        b.fill(7.0);
        give(b);
        // Other tests share the pool, so only what holds whatever they do is asserted.
        let again = take(big - 5);
        assert_eq!(again.len(), big - 5);
        let z = zeroed(big);
        assert!(z.len() == big && z.iter().all(|&v| v == 0.0));
        assert_eq!(take(10).len(), 10);
        give(again);
        give(z);
    }
}

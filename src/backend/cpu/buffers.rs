//! Recycled output buffers: the large `Vec<f32>`s of dropped [`super::CpuTensor`]s are kept and
//! handed to the next op that needs one of about the same size.
//!
//! Why: a forward pass allocates a fresh output for every op, and above glibc's mmap threshold
//! each such allocation is a new mapping: the kernel zeroes every page on first touch and unmaps
//! it again at the free. Measured on the 2-core EPYC, page faults, page clearing and `memset`
//! took 5-12% of an EfficientNet-Lite0 batch-8 forward (perf). A recycled buffer is already
//! mapped, and ops that overwrite every element ([`take`]) skip the zeroing too.

use std::sync::Mutex;

/// Buffers smaller than this (in values, 16 KiB) are left to the allocator. Larger ones are
/// kept even below glibc's mmap threshold: `vec![0.0; n]` from the heap is a `calloc`, which
/// zero-fills recycled memory, and at MiniLM-L6 batch 1 x 32 (activations of 48 KiB) that
/// `memset` was 1.4% of the forward, 4.6% when the two cores sat on different core complexes
/// (the lines it writes were last written by the other core); pooling from 16 KiB instead of
/// 64 KiB made that forward 4-9% faster in the second placement (docs/results.md).
const MIN_POOLED: usize = 4 * 1024;
/// Kept buffers, at most. Far more than a forward pass has live: the bound on values is the
/// one that matters, and a small count dropped a batch's large buffers whenever enough small
/// ones (a fused block's band buffers, say) came back after them. (128 since buffers from
/// 16 KiB are kept.)
const MAX_BUFFERS: usize = 128;
/// Kept values in all, at most (512 MiB of f32): what an idle process may hold on to (the pool
/// is one for the process, shared by its CPU backends). A batch
/// of 32 images through ResNet-50 cycles through about 200 MiB of activation buffers (the
/// largest 98 MiB each); a cap below that sends most of its ops to fresh mappings again.
const MAX_POOLED: usize = 128 << 20;

static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// A buffer of `len` values whose contents are unspecified (stale values of an earlier tensor,
/// or zeros): for ops that write every element.
pub(crate) fn take(len: usize) -> Vec<f32> {
    if len >= MIN_POOLED {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = pick(&pool, len) {
            // `remove`, not `swap_remove`: the pool is kept in the order buffers came back.
            let mut b = pool.remove(i);
            drop(pool);
            // Exactly: `resize` alone would grow a short buffer to twice its size.
            b.reserve_exact(len.saturating_sub(b.len()));
            b.resize(len, 0.0);
            return b;
        }
    }
    vec![0.0; len]
}

/// Which kept buffer serves a request for `len` values: the smallest that fits without
/// wasting more than half of itself; else the largest a little too small (a padded copy of an
/// activation asks for a few rows more than the activation), which is grown: glibc's realloc
/// of a large (mmapped) buffer is an mremap, so only the new tail is faulted in (a smaller one
/// from the heap may be copied).
fn pick(pool: &[Vec<f32>], len: usize) -> Option<usize> {
    // Sized by their length, not their capacity: a buffer's values up to its length are
    // initialized, so one at least `len` long is handed out without the zero-fill that growing
    // into the capacity costs (3% of a batch-1 EfficientNet-Lite0 forward was that memset).
    let cap = |i: &usize| pool[*i].len();
    (0..pool.len())
        .filter(|i| cap(i) >= len && cap(i) / 2 <= len)
        .min_by_key(cap)
        .or_else(|| {
            (0..pool.len())
                .filter(|i| cap(i) < len && cap(i) >= len / 4 * 3)
                .max_by_key(cap)
        })
}

/// A buffer of `len` zeros.
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    let mut b = take(len);
    b.fill(0.0);
    b
}

/// Gives a buffer back for reuse (see [`trim`]).
pub(crate) fn give(b: Vec<f32>) {
    if b.capacity() < MIN_POOLED || b.capacity() > MAX_POOLED {
        return;
    }
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    pool.push(b);
    trim(&mut pool, MAX_BUFFERS, MAX_POOLED);
}

/// Drops buffers until at most `count` holding at most `values` in all are left, the longest
/// kept first (`pool` is in the order buffers came back): a forward pass gives back and takes
/// the same sizes over and over, so what it has not taken for longest is what another model, or
/// another batch size, left behind. (Dropping the smallest first kept a batch-32 ResNet-50's
/// 98 MiB buffers through a later EfficientNet-Lite0, whose own buffers then never stayed.)
fn trim(pool: &mut Vec<Vec<f32>>, count: usize, values: usize) {
    let mut held: usize = pool.iter().map(|b| b.capacity()).sum();
    while pool.len() > count || held > values {
        held -= pool.remove(0).capacity();
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

    #[test]
    fn the_pool_keeps_the_latest_and_serves_the_closest_fit() {
        let bufs =
            |caps: &[usize]| -> Vec<Vec<f32>> { caps.iter().map(|&c| vec![0.0; c]).collect() };
        let pool = bufs(&[100, 400, 210, 2000]);
        // The smallest that wastes at most half: 210 for 200 (not 400).
        assert_eq!(pool[pick(&pool, 200).unwrap()].capacity(), 210);
        assert_eq!(pool[pick(&pool, 350).unwrap()].capacity(), 400);
        assert_eq!(pool[pick(&pool, 1000).unwrap()].capacity(), 2000);
        // 2000 would waste more than half of itself for 500, so the largest within 3/4 is
        // grown: 400.
        assert_eq!(pool[pick(&pool, 500).unwrap()].capacity(), 400);
        assert_eq!(pick(&pool, 600), None);
        assert_eq!(pick(&pool, 4000), None);
        assert_eq!(pick(&pool, 10), None);
        // Trimming drops the longest kept first, by count and by total.
        let mut p = bufs(&[100, 400, 210, 2000]);
        trim(&mut p, 3, usize::MAX);
        let caps: Vec<usize> = p.iter().map(|b| b.capacity()).collect();
        assert_eq!(caps, [400, 210, 2000]);
        trim(&mut p, 3, 2300);
        let caps: Vec<usize> = p.iter().map(|b| b.capacity()).collect();
        assert_eq!(caps, [210, 2000]);
    }
}

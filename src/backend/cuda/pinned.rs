//! Page-locked host memory for the asynchronous early release: a small ring of blocks made
//! when the device is created, each with an event this module owns.
//!
//! Why not cudarc's `PinnedHostSlice`: cudarc records the slice's event after a copy only when
//! its context manages multi-stream synchronisation (several streams *and* event tracking on).
//! The device turns event tracking off, so that event is never recorded, `as_slice` waits on
//! nothing and returns at once, and a reader would see the bytes from before the copy (on a
//! ramp: class 0, uncertainty 0, no exit). Here the copy is followed by `cuEventRecord` on a
//! block's own event, and a read waits on exactly that event. The ordering is compiled and
//! emulated, not run on a GPU; the bookkeeping ([`Ring`]) is plain Rust and unit-tested.
//!
//! A ramp check used to cost one `cuMemHostAlloc` (a slow, page-pinning call); now it takes a
//! block from the ring and gives it back when the caller drops it.

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::driver::result as dres;
use cudarc::driver::sys as dsys;
use cudarc::driver::{CudaContext, CudaStream};

use super::{Deferred, bind, drv};
use crate::error::Result;

/// Blocks made when the device is created.
pub(crate) const RING_BLOCKS: usize = 8;
/// Size of those blocks: a ramp's decisions take 12 bytes per input, so 64 KiB holds a batch
/// of 5461; a larger request replaces a free block with a bigger one.
pub(crate) const RING_BLOCK_BYTES: usize = 64 << 10;

/// What the ring needs to know about a block.
pub(crate) trait Block {
    fn size(&self) -> usize;
    /// Whether no copy into the block is still queued or running (so it may be handed out).
    fn idle(&self) -> bool;
}

/// A block handed out by a [`Ring`]; `pooled` says whether it goes back to the ring (a block
/// made while every pooled block was out is freed instead).
pub(crate) struct Lease<B> {
    pub(crate) block: B,
    pub(crate) pooled: bool,
}

/// A fixed number of reusable blocks. A block is out of the ring while a lease holds it, so it
/// cannot be handed to two callers; a block given back while a copy into it is still queued is
/// not handed out again until that copy has landed.
pub(crate) struct Ring<B> {
    state: Mutex<RingState<B>>,
    capacity: usize,
    min_block: usize,
}

struct RingState<B> {
    free: Vec<B>,
    /// Pooled blocks in existence (free or leased).
    pooled: usize,
}

impl<B: Block> Ring<B> {
    /// A ring of `capacity` blocks of `min_block` bytes, all made now by `make`.
    pub(crate) fn new(
        capacity: usize,
        min_block: usize,
        mut make: impl FnMut(usize) -> Result<B>,
    ) -> Result<Ring<B>> {
        let free = (0..capacity)
            .map(|_| make(min_block))
            .collect::<Result<Vec<_>>>()?;
        Ok(Ring {
            state: Mutex::new(RingState {
                pooled: free.len(),
                free,
            }),
            capacity,
            min_block,
        })
    }

    /// Size of a block made for a request of `bytes`.
    fn block_size(&self, bytes: usize) -> usize {
        bytes
            .checked_next_power_of_two()
            .unwrap_or(bytes)
            .max(self.min_block)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RingState<B>> {
        // The state is a list and a count, consistent after every statement: a panic elsewhere
        // while holding the lock leaves nothing half-done.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A block of at least `bytes` bytes: the smallest idle free one that fits; else a new
    /// pooled one while the ring is below capacity; else a bigger one in place of an idle free
    /// block that is too small; else (every block out or busy) a one-off block.
    pub(crate) fn take(
        &self,
        bytes: usize,
        mut make: impl FnMut(usize) -> Result<B>,
    ) -> Result<Lease<B>> {
        let size = self.block_size(bytes);
        let mut st = self.lock();
        // Among equal sizes the last given back (its memory is the likeliest to be cached).
        let best = (0..st.free.len())
            .rev()
            .filter(|&i| st.free[i].size() >= bytes && st.free[i].idle())
            .min_by_key(|&i| st.free[i].size());
        if let Some(i) = best {
            let block = st.free.swap_remove(i);
            return Ok(Lease {
                block,
                pooled: true,
            });
        }
        let replace = if st.pooled < self.capacity {
            st.pooled += 1;
            Some(None)
        } else {
            (0..st.free.len())
                .filter(|&i| st.free[i].idle())
                .min_by_key(|&i| st.free[i].size())
                .map(|i| Some(st.free.swap_remove(i)))
        };
        drop(st);
        match replace {
            Some(old) => {
                // Free the old block before pinning the new one, outside the lock: both are
                // slow driver calls.
                drop(old);
                make(size)
                    .map(|block| Lease {
                        block,
                        pooled: true,
                    })
                    .inspect_err(|_| self.lock().pooled -= 1)
            }
            None => make(size).map(|block| Lease {
                block,
                pooled: false,
            }),
        }
    }

    /// Takes a leased block back (a one-off block is dropped, which frees it).
    pub(crate) fn give(&self, lease: Lease<B>) {
        if lease.pooled {
            self.lock().free.push(lease.block);
        }
    }

    /// (free blocks, pooled blocks in existence).
    pub(crate) fn counts(&self) -> (usize, usize) {
        let st = self.lock();
        (st.free.len(), st.pooled)
    }
}

/// Page-locked host memory with the event of the last copy into it.
pub(crate) struct PinnedBlock {
    ptr: *mut u8,
    size: usize,
    /// Recorded on the device's stream right after each copy into the block.
    event: dsys::CUevent,
    /// Keeps the context alive (and current-able) for as long as the block exists.
    ctx: Arc<CudaContext>,
    deferred: Arc<Deferred>,
}

// SAFETY: the pointer is page-locked memory owned by this block alone; the event is a driver
// handle usable from any thread once the context is bound, which every use does first.
unsafe impl Send for PinnedBlock {}
unsafe impl Sync for PinnedBlock {}

impl PinnedBlock {
    /// `size` bytes of plain page-locked memory (not write-combined: the host reads it) and an
    /// event that blocks the waiting thread instead of spinning (the releaser waits on it).
    pub(crate) fn new(
        ctx: &Arc<CudaContext>,
        deferred: &Arc<Deferred>,
        size: usize,
    ) -> Result<PinnedBlock> {
        bind(ctx).map_err(drv("binding the context"))?;
        let flags = dsys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as u32
            | dsys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        let mut event: dsys::CUevent = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; the context is current.
        unsafe { dsys::cuEventCreate(&mut event, flags) }
            .result()
            .map_err(drv("creating the event of a pinned block"))?;
        // SAFETY: a plain allocation; the bytes are only read after a copy into them landed.
        let ptr = match unsafe { dres::malloc_host(size.max(1), 0) } {
            Ok(p) => p as *mut u8,
            Err(e) => {
                // SAFETY: created above, not used anywhere.
                let _ = unsafe { dres::event::destroy(event) };
                return Err(drv(format!("pinned host allocation of {size} bytes"))(e));
            }
        };
        Ok(PinnedBlock {
            ptr,
            size,
            event,
            ctx: ctx.clone(),
            deferred: deferred.clone(),
        })
    }

    /// Queues a copy of `len` bytes from `src` into the block on `stream`, then records the
    /// block's event after it. The caller has bound the context.
    ///
    /// # Safety
    /// `src` must be a device allocation of at least `len` bytes on `stream`'s context, and
    /// `len <= self.size()`.
    pub(crate) unsafe fn copy_from(&self, src: u64, len: usize, stream: &CudaStream) -> Result<()> {
        debug_assert!(len <= self.size);
        // SAFETY: per the contract; the block outlives the copy because dropping it waits on
        // the event recorded below.
        unsafe {
            dsys::cuMemcpyDtoHAsync_v2(self.ptr as *mut c_void, src, len, stream.cu_stream())
        }
        .result()
        .map_err(drv(format!("async download of {len} bytes")))?;
        // SAFETY: our event, the device's stream.
        unsafe { dres::event::record(self.event, stream.cu_stream()) }
            .map_err(drv("recording the event after an async download"))
    }

    /// Waits until the work recorded by the block's event has finished (the last run of a
    /// graph that copies out of it), then writes `bytes` at `offset`. The caller has bound the
    /// context.
    pub(crate) fn write(&self, offset: usize, bytes: &[u8]) -> Result<()> {
        if offset
            .checked_add(bytes.len())
            .is_none_or(|end| end > self.size)
        {
            return Err(crate::Error::device(
                "cuda",
                "staging a graph's upload",
                format!(
                    "{} bytes at offset {offset} of a {}-byte staging block",
                    bytes.len(),
                    self.size
                ),
            ));
        }
        // SAFETY: our event (one never recorded reports success at once).
        unsafe { dres::event::synchronize(self.event) }
            .map_err(drv("waiting for a graph's last run"))?;
        // SAFETY: in bounds (checked above); no copy out of the block is in flight.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(offset), bytes.len()) };
        Ok(())
    }

    /// Queues a copy of `len` bytes from the block at `offset` to device address `dst` (a
    /// graph's upload, captured). The caller has bound the context.
    ///
    /// # Safety
    /// `dst` must be a device allocation of at least `len` bytes that outlives every run of the
    /// copy, and `offset + len <= self.size()`.
    pub(crate) unsafe fn copy_to(
        &self,
        offset: usize,
        dst: u64,
        len: usize,
        stream: &CudaStream,
    ) -> Result<()> {
        debug_assert!(offset + len <= self.size);
        // SAFETY: per the contract.
        unsafe {
            dsys::cuMemcpyHtoDAsync_v2(
                dst,
                self.ptr.add(offset) as *const c_void,
                len,
                stream.cu_stream(),
            )
        }
        .result()
        .map_err(drv(format!("a graph's upload of {len} bytes")))
    }

    /// Waits for the work recorded by the block's event, binding the context itself; a failure
    /// is kept for the device's next call (this runs in drops).
    pub(crate) fn wait_quietly(&self) {
        let waited = bind(&self.ctx).and_then(|_| {
            // SAFETY: our event.
            unsafe { dres::event::synchronize(self.event) }
        });
        if let Err(e) = waited {
            self.deferred
                .record("waiting for a graph's last run (on drop)".to_string(), e);
        }
    }

    /// Records the block's event on `stream` (after a graph run that copies out of it). The
    /// caller has bound the context.
    pub(crate) fn record(&self, stream: &CudaStream) -> Result<()> {
        // SAFETY: our event, the device's stream.
        unsafe { dres::event::record(self.event, stream.cu_stream()) }
            .map_err(drv("recording the event after a graph run"))
    }

    /// Waits for the last copy into the block, then returns its first `len` bytes. The caller
    /// has bound the context.
    pub(crate) fn read(&self, len: usize) -> Result<Vec<u8>> {
        // SAFETY: our event.
        unsafe { dres::event::synchronize(self.event) }
            .map_err(drv("waiting for an async download"))?;
        // SAFETY: the copy has landed and no other copy can be queued while the caller holds
        // the block; `len <= size` is the caller's check.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr, len.min(self.size)) }.to_vec())
    }
}

impl Block for PinnedBlock {
    fn size(&self) -> usize {
        self.size
    }

    fn idle(&self) -> bool {
        if bind(&self.ctx).is_err() {
            return false;
        }
        // SAFETY: our event. An event never recorded reports success.
        !matches!(
            unsafe { dsys::cuEventQuery(self.event) },
            dsys::CUresult::CUDA_ERROR_NOT_READY
        )
    }
}

impl Drop for PinnedBlock {
    /// Runs on whichever thread drops the last holder (the releaser, say): binds the context
    /// itself, waits for a copy that may still be landing, and keeps any failure for the
    /// device's next call instead of cudarc's shared error slot.
    fn drop(&mut self) {
        let size = self.size;
        let what = |step: &str| format!("{step} of a {size}-byte pinned block (on drop)");
        if let Err(e) = bind(&self.ctx) {
            self.deferred.record(what("binding the context to free"), e);
            return; // leaking the block is better than freeing memory a copy may still write
        }
        // SAFETY: our event and our allocation, each released once.
        unsafe {
            if let Err(e) = dres::event::synchronize(self.event) {
                self.deferred.record(what("waiting for the last copy"), e);
                return;
            }
            if let Err(e) = dres::event::destroy(self.event) {
                self.deferred.record(what("destroying the event"), e);
            }
            if let Err(e) = dres::free_host(self.ptr as *mut c_void) {
                self.deferred.record(what("freeing"), e);
            }
        }
    }
}

/// Page-locked host memory of the `cuda` device ([`super::super::device::Device::Pinned`]): a
/// block leased from the device's ring, given back when this is dropped.
pub struct CudaPinned {
    lease: Option<Lease<PinnedBlock>>,
    ring: Arc<Ring<PinnedBlock>>,
    /// Bytes asked for (the block may be larger).
    len: usize,
    /// Whether a copy has been queued into it (reading before that would return stale bytes).
    queued: bool,
}

impl CudaPinned {
    pub(crate) fn new(lease: Lease<PinnedBlock>, ring: Arc<Ring<PinnedBlock>>, len: usize) -> Self {
        CudaPinned {
            lease: Some(lease),
            ring,
            len,
            queued: false,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn block(&self) -> &PinnedBlock {
        // Only `Drop` takes the lease.
        &self.lease.as_ref().expect("lease present until drop").block
    }

    pub(crate) fn mark_queued(&mut self) {
        self.queued = true;
    }

    pub(crate) fn queued(&self) -> bool {
        self.queued
    }
}

impl Drop for CudaPinned {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.ring.give(lease);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    /// A block whose identity and "copy in flight" flag the test controls.
    struct Fake {
        id: usize,
        size: usize,
        busy: Rc<Cell<bool>>,
    }

    impl Block for Fake {
        fn size(&self) -> usize {
            self.size
        }
        fn idle(&self) -> bool {
            !self.busy.get()
        }
    }

    struct Maker {
        next: usize,
    }

    impl Maker {
        fn make(&mut self, size: usize) -> Result<Fake> {
            self.next += 1;
            Ok(Fake {
                id: self.next,
                size,
                busy: Rc::new(Cell::new(false)),
            })
        }
    }

    #[test]
    fn blocks_are_made_once_and_reused() {
        let mut m = Maker { next: 0 };
        let ring = Ring::new(2, 64, |s| m.make(s)).unwrap();
        assert_eq!((m.next, ring.counts()), (2, (2, 2)));
        let a = ring.take(10, |s| m.make(s)).unwrap();
        let a_id = a.block.id;
        ring.give(a);
        let again = ring.take(64, |s| m.make(s)).unwrap();
        assert_eq!(again.block.id, a_id, "the block just given back is reused");
        assert!(again.pooled);
        assert_eq!(m.next, 2, "no allocation while a pooled block fits");
    }

    #[test]
    fn a_leased_block_is_never_handed_out_twice() {
        let mut m = Maker { next: 0 };
        let ring = Ring::new(3, 64, |s| m.make(s)).unwrap();
        let leases: Vec<_> = (0..5)
            .map(|_| ring.take(8, |s| m.make(s)).unwrap())
            .collect();
        let mut ids: Vec<usize> = leases.iter().map(|l| l.block.id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 5, "five live leases, five distinct blocks");
        // Capacity 3: the two beyond it are one-offs, dropped (freed) when given back.
        assert_eq!(leases.iter().filter(|l| l.pooled).count(), 3);
        for l in leases {
            ring.give(l);
        }
        assert_eq!(ring.counts(), (3, 3));
    }

    #[test]
    fn a_block_with_a_copy_in_flight_is_not_reused() {
        let mut m = Maker { next: 0 };
        let ring = Ring::new(1, 64, |s| m.make(s)).unwrap();
        let a = ring.take(8, |s| m.make(s)).unwrap();
        // Given back (its holder dropped) while the copy into it is still queued.
        a.block.busy.set(true);
        let (a_id, busy) = (a.block.id, a.block.busy.clone());
        ring.give(a);
        let b = ring.take(8, |s| m.make(s)).unwrap();
        assert_ne!(b.block.id, a_id);
        assert!(!b.pooled, "ring at capacity: a one-off block");
        busy.set(false);
        let c = ring.take(8, |s| m.make(s)).unwrap();
        assert_eq!(c.block.id, a_id, "reused once the copy has landed");
    }

    #[test]
    fn a_large_request_replaces_a_small_free_block() {
        let mut m = Maker { next: 0 };
        let ring = Ring::new(2, 64, |s| m.make(s)).unwrap();
        let big = ring.take(1000, |s| m.make(s)).unwrap();
        assert_eq!((big.block.size, big.pooled), (1024, true));
        assert_eq!(
            ring.counts(),
            (1, 2),
            "one small block went, the big one is pooled"
        );
        let big_id = big.block.id;
        ring.give(big);
        // The smallest fitting block is preferred for small requests.
        let small = ring.take(8, |s| m.make(s)).unwrap();
        assert_eq!(small.block.size, 64);
        let big = ring.take(1000, |s| m.make(s)).unwrap();
        assert_eq!(big.block.id, big_id);
    }

    #[test]
    fn a_failed_allocation_is_an_error_and_leaves_the_count_right() {
        let mut m = Maker { next: 0 };
        let ring = Ring::new(1, 64, |s| m.make(s)).unwrap();
        let held = ring.take(8, |s| m.make(s)).unwrap();
        ring.give(held);
        let fail = |_: usize| -> Result<Fake> {
            Err(crate::Error::device(
                "cuda",
                "pinned host allocation",
                "out of memory",
            ))
        };
        assert!(ring.take(1 << 20, fail).is_err());
        assert_eq!(
            ring.counts(),
            (0, 0),
            "the replaced block is gone, none made"
        );
        let again = ring.take(8, |s| m.make(s)).unwrap();
        assert!(again.pooled, "the ring may make a block again");
    }
}

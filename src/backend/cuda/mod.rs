//! `cuda`: a real GPU through cudarc (run-time loading), kernels compiled by NVRTC.
//!
//! Nothing here needs CUDA at build time: cudarc loads `libcuda` and `libnvrtc` when they are
//! first used, and panics if they are missing. So every entry point first asks the
//! non-panicking `is_culib_present()` probes and returns an error saying what is missing, and
//! every cudarc call runs under [`std::panic::catch_unwind`] so that a cudarc panic (a missing
//! symbol in an old library, say) comes back as an error too.
//!
//! - [`probe`](mod@probe): whether this machine can run the backend and what it has.
//! - [`nvrtc`]: the kernel sources compiled to PTX or cubins; architectures and options.
//! - `cache`: compiled modules on disk, keyed by the sha256 of what made them.
//! - `create`: a [`CudaDevice`] made (context, stream, memory pool, modules loaded).
//! - `pinned`: page-locked memory with its own events, for the early release.
//! - `errors`: driver, NVRTC and panic failures as crate errors; failures kept from drops.
//! - `cublas`: the cuBLAS GEMM, the kernel benchmarks' yardstick.
//! - `gpu_tests`: the tests that need a GPU (ignored without one).
//!
//! This file holds the device and its [`Device`] implementation: kernels launched by name on
//! one stream of the primary context.
//!
//! # cudarc 0.19 and event tracking (issue 12, defect 1)
//! The device turns cudarc's event tracking off (one stream orders everything; tracking would
//! create two events per allocation). With tracking off, cudarc 0.19 behaves differently in
//! these places, each handled here:
//! - `PinnedHostSlice`: its event is recorded after a copy only when the context manages
//!   multi-stream synchronisation, so `as_slice` waited on an unrecorded event and returned at
//!   once (stale bytes), and its drop freed the memory without waiting for a queued copy.
//!   `pinned` owns its blocks and events instead: record after the copy, wait before reading
//!   and before freeing.
//! - `CudaSlice` drop frees with `cuMemFreeAsync` without binding the context to the dropping
//!   thread (with tracking on, its event waits bind it as a side effect). [`CudaBuf`] owns its
//!   allocation and binds the context before freeing, on whatever thread drops it.
//! - Errors in drops go to one slot in the context (`record_err`), which the next
//!   `bind_to_thread` on *any* thread takes and returns as its own failure (so a free that
//!   failed on the releaser thread surfaced as a failed launch on the executor). Drops here
//!   keep their failures in `Deferred`, and every device call first reports a failure kept
//!   there or in cudarc's slot as what it is: an earlier operation, named, that failed.
//! - `new_stream` synchronises the context only with tracking on (harmless: nothing is queued
//!   when the device makes its stream).
//!
//! The ordering of copies and events is compiled and emulated, not run on a GPU.

mod cache;
mod create;
mod cublas;
mod errors;
#[cfg(test)]
mod gpu_tests;
pub mod nvrtc;
mod pinned;
pub mod probe;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::result as dres;
use cudarc::driver::sys as dsys;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, PushKernelArg};

use super::device::{
    ArgSlot, Device, GraphStep, KernelArg, LaunchConfig, TensorMap, TensorMapSpec, check_launch,
};
use crate::error::{Error, Result};

pub use super::entry_points::entry_points;
pub use cache::{cache_key, default_cache_dir};
pub use create::prebuild;
use errors::{Deferred, bind, check, describe, drv, guard, version_string};
pub use nvrtc::{
    Arch, Compiled, PtxAndCubin, Target, compile_every_source, compile_source,
    compile_source_ptx_and_cubin, nvrtc_options, nvrtc_supported_archs, nvrtc_version,
};
pub use pinned::CudaPinned;
pub use probe::{ProbeInfo, device_arch, probe, probe_device};

const BACKEND: &str = "cuda";

/// Oldest driver API version the backend accepts (CUDA 12.0, as `cuDriverGetVersion` writes it).
pub const MIN_DRIVER_VERSION: i32 = 12000;

/// NVRTC options every compilation gets (after `--gpu-architecture`).
pub const DEFAULT_OPTIONS: &[&str] = &["-std=c++17", "--device-as-default-execution-space"];

/// Settings of [`CudaDevice`].
#[derive(Clone, Debug)]
pub struct CudaConfig {
    /// Device ordinal.
    pub ordinal: usize,
    /// What NVRTC produces for the device's architecture (default: a cubin).
    pub target: Target,
    /// NVRTC options after [`DEFAULT_OPTIONS`].
    pub extra_options: Vec<String>,
    /// Module cache directory; `None`: [`default_cache_dir`].
    pub cache_dir: Option<std::path::PathBuf>,
    /// Whether to use the on-disk cache at all.
    pub use_cache: bool,
    /// Kernel sources (file names in `kernels/`, such as `gemm_wgmma.cu`) not to compile or
    /// load: their kernels are then absent, and launching one is an error that names it. For a
    /// machine whose NVRTC rejects a source the others do not need (the GPU check retries
    /// without the Hopper GEMMs). Default: `APPARATE_CUDA_SKIP_SOURCES`, comma-separated, else
    /// none; a name that is not a source is refused when the device is made.
    pub skip_sources: Vec<String>,
}

impl Default for CudaConfig {
    fn default() -> Self {
        CudaConfig {
            ordinal: 0,
            target: Target::Cubin,
            extra_options: Vec::new(),
            cache_dir: None,
            use_cache: true,
            skip_sources: std::env::var("APPARATE_CUDA_SKIP_SOURCES")
                .map(|v| {
                    v.split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// What every buffer of a device shares with it: the context, the stream its memory is
/// ordered on, and where failures in drops go.
struct Owner {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Stream-ordered allocation (`cuMemAllocAsync`) is available.
    async_alloc: bool,
    deferred: Arc<Deferred>,
    /// Held alone while the stream is captured into a graph. A free queued on a capturing
    /// stream would be captured (and refused: it is not the graph's allocation), so a buffer
    /// dropped meanwhile, on any thread, parks its address in `parked` until the capture ends.
    capture: std::sync::RwLock<()>,
    parked: Mutex<Vec<(u64, usize)>>,
}

impl Owner {
    /// Frees an allocation of this device, ordered after the work queued on its stream; a
    /// failure is kept for the device's next call (this runs in drops).
    fn free(&self, ptr: u64, len: usize) {
        let what = |step: &str| format!("{step} a {len}-byte buffer (on drop)");
        // The dropping thread may never have used the device (the releaser, a tokio worker).
        if let Err(e) = bind(&self.ctx) {
            self.deferred.record(what("binding the context to free"), e);
            return;
        }
        // SAFETY: allocated by `CudaDevice::alloc` on this stream, freed once. Stream order
        // puts the free after every launch already queued that uses the buffer.
        let freed = unsafe {
            if self.async_alloc {
                cudarc::driver::result::free_async(ptr, self.stream.cu_stream())
            } else {
                cudarc::driver::result::stream::synchronize(self.stream.cu_stream())
                    .and_then(|_| cudarc::driver::result::free_sync(ptr))
            }
        };
        if let Err(e) = freed {
            self.deferred.record(what("freeing"), e);
        }
    }

    /// Frees what was dropped during a capture.
    fn free_parked(&self) {
        let parked = std::mem::take(&mut *self.parked.lock().unwrap_or_else(|p| p.into_inner()));
        for (ptr, len) in parked {
            self.free(ptr, len);
        }
    }
}

/// Device memory, freed when dropped: stream-ordered (after the work already queued on the
/// device's stream), from whichever thread drops it.
pub struct CudaBuf {
    ptr: u64,
    len: usize,
    owner: Arc<Owner>,
}

impl fmt::Debug for CudaBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaBuf {{ ptr: {:#x}, len: {} }}", self.ptr, self.len)
    }
}

impl Drop for CudaBuf {
    fn drop(&mut self) {
        let o = &self.owner;
        // Not while a capture runs (the capturing thread holds the lock alone): parked, freed
        // when it ends. Holding the shared lock while freeing keeps a capture from starting
        // between the check and the free.
        match o.capture.try_read() {
            Ok(_not_capturing) => o.free(self.ptr, self.len),
            Err(std::sync::TryLockError::Poisoned(p)) => {
                let _g = p.into_inner();
                o.free(self.ptr, self.len)
            }
            Err(std::sync::TryLockError::WouldBlock) => o
                .parked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((self.ptr, self.len)),
        }
    }
}

struct Kernel {
    func: CudaFunction,
    /// Dynamic shared memory the function may use now (48 KiB minus its static shared memory
    /// until raised with `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`).
    max_dynamic_shared: AtomicU32,
}

/// How one kernel source was built when a [`CudaDevice`] was made.
#[derive(Clone, Debug)]
pub struct SourceBuild {
    /// The source, as in `kernels/` (`gemm.cu`).
    pub file: &'static str,
    /// Wall-clock seconds spent on it: NVRTC's compile, or reading the cached module.
    pub seconds: f64,
    /// Read from the on-disk cache rather than compiled.
    pub cached: bool,
}

/// A real GPU. Kernels run in order on one stream of the device's primary context.
pub struct CudaDevice {
    owner: Arc<Owner>,
    info: ProbeInfo,
    target: Target,
    kernels: HashMap<String, Kernel>,
    /// `CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`.
    max_shared_optin: u32,
    /// How each kernel source was built at creation (compiled, or read from the cache).
    builds: Vec<SourceBuild>,
    /// Page-locked blocks for [`Device::download_async`].
    ring: Arc<pinned::Ring<pinned::PinnedBlock>>,
    /// cuBLAS, created on first use (benchmarks only: the engine uses its own GEMM).
    blas: std::sync::OnceLock<std::result::Result<cudarc::cublas::CudaBlas, String>>,
    raise_lock: Mutex<()>,
}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (free, pooled) = self.ring.counts();
        write!(
            f,
            "CudaDevice {{ {}, {:?}, {} kernels, pinned blocks {free} free of {pooled} }}",
            self.info,
            self.target,
            self.kernels.len()
        )
    }
}

impl CudaDevice {
    /// What the probe found for this device.
    pub fn info(&self) -> &ProbeInfo {
        &self.info
    }

    /// What the modules were compiled to.
    pub fn target(&self) -> Target {
        self.target
    }

    /// How many kernel sources came from the on-disk cache.
    pub fn cached_sources(&self) -> usize {
        self.builds.iter().filter(|b| b.cached).count()
    }

    /// How each kernel source was built when the device was made, in source order (less those
    /// [`CudaConfig::skip_sources`] left out): NVRTC's
    /// time for it, or that it came from the on-disk cache. The sources compile in parallel,
    /// so a cold start takes about the slowest one's time (`apparate devices --compile`).
    pub fn source_builds(&self) -> &[SourceBuild] {
        &self.builds
    }

    /// True when the device has a kernel of this name.
    pub fn has_kernel(&self, name: &str) -> bool {
        self.kernels.contains_key(name)
    }

    /// Makes the device's context current on the calling thread. Every call of the device does
    /// this itself; a thread that hands raw handles to other CUDA libraries may want it.
    pub fn bind_to_thread(&self) -> Result<()> {
        bind(&self.owner.ctx).map_err(drv("binding the context"))
    }

    /// Start of every device call: reports a failure that a drop could only keep (ours or
    /// cudarc's) as an earlier operation's, then binds the context to this thread.
    fn enter(&self, what: &str) -> Result<()> {
        let earlier = |e: String| {
            Error::device(
                BACKEND,
                what,
                format!("an earlier operation failed where it could not report it: {e}"),
            )
        };
        if let Some(e) = self.owner.deferred.take() {
            return Err(earlier(e));
        }
        if let Err(e) = self.owner.ctx.check_err() {
            return Err(earlier(format!(
                "a CUDA call in a cudarc drop: {}",
                describe(e)
            )));
        }
        bind(&self.owner.ctx).map_err(drv(format!("{what}: binding the context")))
    }

    fn stream(&self) -> &Arc<CudaStream> {
        &self.owner.stream
    }

    /// A launch on the device's stream, without `enter` (the caller has bound the context
    /// and reported kept failures: a graph's capture does it once, before it begins).
    ///
    /// # Safety
    /// [`Device::launch`]'s contract.
    unsafe fn launch_on_stream(
        &self,
        kernel: &str,
        cfg: LaunchConfig,
        args: &[KernelArg],
    ) -> Result<()> {
        check_launch(BACKEND, kernel, &cfg)?;
        let k = self
            .kernels
            .get(kernel)
            .ok_or_else(|| Error::kernel(BACKEND, kernel, "no kernel of this name"))?;
        {
            // Raising is rare (once per kernel and size): only then take the lock, and check
            // again under it, so two threads raising the same kernel's limit cannot leave it
            // lower than what the atomic records.
            let raise = (cfg.shared_bytes > k.max_dynamic_shared.load(Ordering::Relaxed))
                .then(|| self.raise_lock.lock().unwrap_or_else(|p| p.into_inner()));
            if raise.is_some() && cfg.shared_bytes > k.max_dynamic_shared.load(Ordering::Relaxed) {
                if cfg.shared_bytes > self.max_shared_optin {
                    return Err(Error::kernel(
                        BACKEND,
                        kernel,
                        format!(
                            "{} bytes of dynamic shared memory, this device allows at most {}",
                            cfg.shared_bytes, self.max_shared_optin
                        ),
                    ));
                }
                k.func
                    .set_attribute(
                        dsys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        cfg.shared_bytes as i32,
                    )
                    .map_err(|e| {
                        Error::kernel(
                            BACKEND,
                            kernel,
                            format!(
                                "raising its dynamic shared memory to {} bytes: {}",
                                cfg.shared_bytes,
                                describe(e)
                            ),
                        )
                    })?;
                k.max_dynamic_shared
                    .fetch_max(cfg.shared_bytes, Ordering::Relaxed);
            }
            // The launch gets a pointer to each argument's slot (the driver reads as many
            // bytes as the parameter has).
            let values: Vec<ArgSlot> = args.iter().map(|a| a.slot()).collect();
            let mut builder = self.stream().launch_builder(&k.func);
            for v in &values {
                builder.arg(v);
            }
            let lc = cudarc::driver::LaunchConfig {
                grid_dim: (cfg.grid[0], cfg.grid[1], cfg.grid[2]),
                block_dim: (cfg.block[0], cfg.block[1], cfg.block[2]),
                shared_mem_bytes: cfg.shared_bytes,
            };
            // SAFETY: the argument count and types are the launcher's contract with the
            // kernel (as on the emulated device); the values outlive the call.
            unsafe { builder.launch(lc) }.map_err(|e| {
                Error::kernel(BACKEND, kernel, format!("launch {cfg:?}: {}", describe(e)))
            })?;
            Ok(())
        }
    }
}

// SAFETY: plain bytes; the driver reads as many of them as the kernel's parameter has.
unsafe impl cudarc::driver::DeviceRepr for ArgSlot {}

impl Device for CudaDevice {
    type Buf = CudaBuf;
    type Pinned = CudaPinned;

    /// Compute capability 9.0, whose kernels are compiled for sm_90a ([`ProbeInfo::arch`]).
    fn has_wgmma(&self) -> bool {
        self.info.has_wgmma()
    }

    fn multiprocessors(&self) -> Option<usize> {
        Some(self.info.multiprocessors)
    }

    /// `cuTensorMapEncodeTiled`: 16-bit elements (`UINT16`: the copies move bits, so one type
    /// serves f16 and bf16), boxes of 64 x `box_rows` in the 128-byte swizzle, zeros outside
    /// the matrix, L2 promotion to 256-byte lines.
    /// Called per GEMM launch: nothing is formatted unless something fails.
    fn tensor_map(&self, spec: &TensorMapSpec) -> Result<TensorMap> {
        const WHAT: &str = "a tensor map";
        let failed = |why: String| Error::device(BACKEND, format!("{WHAT} for {spec:?}"), why);
        spec.check().map_err(failed)?;
        if !self.has_wgmma() {
            return Err(failed(format!(
                "{} has no tensor memory accelerator (TMA)",
                self.info.arch()
            )));
        }
        guard(WHAT, || {
            self.enter(WHAT)?;
            let dims = [spec.cols, spec.rows];
            let strides = [spec.row_stride_bytes];
            let boxes = [TensorMapSpec::BOX_COLS, spec.box_rows];
            let element_strides = [1u32, 1];
            let mut map = dsys::CUtensorMap { opaque: [0; 16] };
            // SAFETY: every array has the rank's entries (strides: rank - 1); the map is
            // written by the call and the address is only recorded in it, not dereferenced.
            let rc = unsafe {
                dsys::cuTensorMapEncodeTiled(
                    &mut map,
                    dsys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT16,
                    2,
                    spec.address as *mut std::ffi::c_void,
                    dims.as_ptr(),
                    strides.as_ptr(),
                    boxes.as_ptr(),
                    element_strides.as_ptr(),
                    dsys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                    dsys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                    dsys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                    dsys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
                )
            };
            rc.result().map_err(|e| failed(describe(e)))?;
            Ok(TensorMap(map.opaque))
        })
    }

    fn alloc_pinned(&self, bytes: usize) -> Result<CudaPinned> {
        guard("pinned host memory", || {
            self.enter("pinned host memory")?;
            let (ctx, deferred) = (&self.owner.ctx, &self.owner.deferred);
            let lease = self
                .ring
                .take(bytes, |size| pinned::PinnedBlock::new(ctx, deferred, size))?;
            Ok(CudaPinned::new(lease, self.ring.clone(), bytes))
        })
    }

    fn download_async(&self, buf: &CudaBuf, dst: &mut CudaPinned) -> Result<()> {
        if dst.len() < buf.len {
            return Err(Error::device(
                BACKEND,
                "async download",
                format!("a {}-byte buffer into {} pinned bytes", buf.len, dst.len()),
            ));
        }
        guard("cuMemcpyDtoHAsync", || {
            self.enter("async download")?;
            // SAFETY: `buf` is an allocation of this device of `buf.len` bytes and the block
            // holds at least `dst.len() >= buf.len`. Nothing here waits.
            unsafe { dst.block().copy_from(buf.ptr, buf.len, self.stream()) }?;
            dst.mark_queued();
            Ok(())
        })
    }

    fn read_pinned(&self, p: &CudaPinned) -> Result<Vec<u8>> {
        if !p.queued() {
            return Err(Error::device(
                BACKEND,
                "reading pinned memory",
                "no copy was queued into it (download_async first)",
            ));
        }
        guard("cuEventSynchronize", || {
            self.enter("reading pinned memory")?;
            p.block().read(p.len())
        })
    }

    fn name(&self) -> &'static str {
        BACKEND
    }

    fn describe(&self) -> String {
        let i = self.info();
        format!(
            "cuda: {} (sm_{}{})",
            i.device_name, i.compute_capability.0, i.compute_capability.1
        )
    }

    fn alloc(&self, bytes: usize) -> Result<CudaBuf> {
        guard("cuMemAlloc", || {
            self.enter("allocating device memory")?;
            // A zero-byte request still gets a real (1-byte) allocation, as with the emulator.
            let size = bytes.max(1);
            // SAFETY: uninitialised device memory is what `alloc` promises; the context is
            // current.
            let ptr = unsafe {
                if self.owner.async_alloc {
                    cudarc::driver::result::malloc_async(self.stream().cu_stream(), size)
                } else {
                    cudarc::driver::result::malloc_sync(size)
                }
            }
            .map_err(|e| {
                let why = if e.0 == dsys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                    "out of memory".to_string()
                } else {
                    describe(e)
                };
                Error::device(BACKEND, format!("allocating {bytes} bytes"), why)
            })?;
            Ok(CudaBuf {
                ptr,
                len: bytes,
                owner: self.owner.clone(),
            })
        })
    }

    fn upload(&self, bytes: &[u8]) -> Result<CudaBuf> {
        let buf = self.alloc(bytes.len())?;
        if !bytes.is_empty() {
            guard("cuMemcpyHtoD", || {
                self.enter("upload")?;
                // SAFETY: the buffer holds bytes.len() bytes; a copy from pageable memory has
                // read `bytes` by the time it returns.
                unsafe {
                    cudarc::driver::result::memcpy_htod_async(
                        buf.ptr,
                        bytes,
                        self.stream().cu_stream(),
                    )
                }
                .map_err(drv(format!("upload of {} bytes", bytes.len())))
            })?;
        }
        Ok(buf)
    }

    fn download(&self, buf: &CudaBuf, out: &mut [u8]) -> Result<()> {
        if out.len() != buf.len {
            return Err(Error::device(
                BACKEND,
                "download",
                format!("a {}-byte buffer into {} bytes", buf.len, out.len()),
            ));
        }
        if out.is_empty() {
            return Ok(());
        }
        guard("cuMemcpyDtoH", || {
            self.enter("download")?;
            let what = || format!("download of {} bytes", buf.len);
            // SAFETY: same length; the stream synchronisation below completes the copy
            // before `out` is used.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(out, buf.ptr, self.stream().cu_stream())
            }
            .map_err(drv(what()))?;
            // SAFETY: the device's stream.
            unsafe { cudarc::driver::result::stream::synchronize(self.stream().cu_stream()) }
                .map_err(drv(what()))
        })
    }

    fn fill(&self, buf: &CudaBuf, byte: u8) -> Result<()> {
        guard("cuMemsetD8", || {
            self.enter("fill")?;
            // SAFETY: within the allocation, on the stream that owns it.
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    buf.ptr,
                    byte,
                    buf.len,
                    self.stream().cu_stream(),
                )
            }
            .map_err(drv(format!("fill of {} bytes", buf.len)))
        })
    }

    fn address(&self, buf: &CudaBuf) -> u64 {
        buf.ptr
    }

    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len
    }

    unsafe fn launch(&self, kernel: &str, cfg: LaunchConfig, args: &[KernelArg]) -> Result<()> {
        let what = format!("launch of `{kernel}`");
        guard(&what, || {
            self.enter(&what)?;
            // SAFETY: the caller's contract, passed on.
            unsafe { self.launch_on_stream(kernel, cfg, args) }
        })
    }

    fn synchronize(&self) -> Result<()> {
        guard("cuStreamSynchronize", || {
            self.enter("waiting for the stream")?;
            // SAFETY: the device's stream.
            unsafe { cudarc::driver::result::stream::synchronize(self.stream().cu_stream()) }
                .map_err(drv("waiting for the stream"))?;
            // A drop that failed while the stream ran.
            self.enter("waiting for the stream")
        })
    }

    type Event = cudarc::driver::CudaEvent;

    fn record_event(&self) -> Result<Self::Event> {
        guard("cuEventRecord", || {
            self.enter("recording an event")?;
            self.stream()
                .record_event(Some(dsys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(drv("recording an event"))
        })
    }

    fn wait_event(&self, event: &Self::Event) -> Result<()> {
        guard("cuEventSynchronize", || {
            self.enter("waiting for an event")?;
            event.synchronize().map_err(drv("waiting for an event"))
        })
    }

    fn elapsed_ms(&self, start: &Self::Event, end: &Self::Event) -> Result<f64> {
        guard("cuEventElapsedTime", || {
            self.enter("timing two events")?;
            start
                .elapsed_ms(end)
                .map(f64::from)
                .map_err(drv("timing two events"))
        })
    }

    type Graph = CudaGraphRun;

    /// Stream capture of the steps (thread-local mode), instantiated once; uploads copy out of
    /// a page-locked staging block. While the capture runs, the device's `capture` lock is held
    /// alone: buffers dropped meanwhile on any thread park their frees until it ends (a free
    /// queued on the capturing stream would be captured), and the caller keeps other threads'
    /// launches off the stream. Kept failures are reported once, before the capture begins.
    unsafe fn build_graph(
        &self,
        steps: &[GraphStep<'_, CudaBuf>],
        staging: usize,
    ) -> Result<CudaGraphRun> {
        guard("building a CUDA graph", || {
            self.enter("building a CUDA graph")?;
            let block = pinned::PinnedBlock::new(&self.owner.ctx, &self.owner.deferred, staging)?;
            let cu_stream = self.stream().cu_stream();
            let alone = self
                .owner
                .capture
                .write()
                .unwrap_or_else(|p| p.into_inner());
            // SAFETY: the device's stream, not capturing (captures hold `alone`).
            unsafe {
                dres::stream::begin_capture(
                    cu_stream,
                    dsys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
                )
            }
            .map_err(drv("beginning a stream capture"))?;
            let queued = steps.iter().try_for_each(|step| match *step {
                // SAFETY: `build_graph`'s contract is `launch`'s, for the graph's lifetime;
                // the context was bound by `enter` above.
                GraphStep::Launch { kernel, cfg, args } => unsafe {
                    self.launch_on_stream(kernel, cfg, args)
                },
                GraphStep::Upload { len: 0, .. } => Ok(()),
                GraphStep::Upload { dst, offset, len } => {
                    if offset + len > staging || len > dst.len {
                        return Err(Error::device(
                            BACKEND,
                            "building a CUDA graph",
                            format!(
                                "an upload of {len} bytes at staging offset {offset} (staging \
                                 {staging} bytes, destination {})",
                                dst.len
                            ),
                        ));
                    }
                    // SAFETY: in bounds of both (checked above); the destination outlives
                    // the graph (the contract).
                    unsafe { block.copy_to(offset, dst.ptr, len, self.stream()) }
                }
                GraphStep::Fill { dst, .. } if dst.len == 0 => Ok(()),
                // SAFETY: the whole of a buffer that outlives the graph.
                GraphStep::Fill { dst, byte } => {
                    unsafe { dres::memset_d8_async(dst.ptr, byte, dst.len, cu_stream) }
                        .map_err(drv("a graph's fill"))
                }
            });
            // End the capture whatever happened (straight through the driver: cudarc's
            // `end_capture` first takes any error kept in the context and would return it
            // without ending the capture), then free what was dropped meanwhile.
            // SAFETY: the stream this thread began capturing.
            let ended = unsafe { dres::stream::end_capture(cu_stream) };
            drop(alone);
            self.owner.free_parked();
            queued?;
            let graph = ended.map_err(drv("ending a stream capture"))?;
            // SAFETY: the graph the capture made, instantiated once.
            let exec =
                match unsafe { dres::graph::instantiate(graph, dsys::CUgraphInstantiate_flags(0)) }
                {
                    Ok(exec) => exec,
                    Err(e) => {
                        // SAFETY: ours, not instantiated.
                        let _ = unsafe { dres::graph::destroy(graph) };
                        return Err(drv("instantiating a CUDA graph")(e));
                    }
                };
            Ok(CudaGraphRun {
                exec: Mutex::new(GraphExec {
                    graph,
                    exec,
                    owner: self.owner.clone(),
                }),
                staging: block,
            })
        })
    }

    fn stage(&self, graph: &CudaGraphRun, offset: usize, bytes: &[u8]) -> Result<()> {
        guard("staging a graph's upload", || {
            self.enter("staging a graph's upload")?;
            graph.staging.write(offset, bytes)
        })
    }

    fn launch_graph(&self, graph: &CudaGraphRun) -> Result<()> {
        guard("cuGraphLaunch", || {
            self.enter("launching a CUDA graph")?;
            let g = graph.exec.lock().unwrap_or_else(|p| p.into_inner());
            // SAFETY: an instantiated graph of this context, the device's stream.
            unsafe { dres::graph::launch(g.exec, self.stream().cu_stream()) }
                .map_err(drv("launching a CUDA graph"))?;
            // `stage` waits on this before overwriting what the run copies. If it fails, the
            // error makes the caller drop the graph (its staging could be read too early).
            graph.staging.record(self.stream())
        })
    }
}

/// An instantiated CUDA graph and the page-locked block its uploads copy from.
pub struct CudaGraphRun {
    exec: Mutex<GraphExec>,
    staging: pinned::PinnedBlock,
}

impl Drop for CudaGraphRun {
    /// Waits for the graph's last run before its executable goes (then the staging block,
    /// which waits again, harmlessly): the block must outlive every copy out of it.
    fn drop(&mut self) {
        self.staging.wait_quietly();
    }
}

/// The driver's handles of a graph and its executable.
struct GraphExec {
    graph: dsys::CUgraph,
    exec: dsys::CUgraphExec,
    owner: Arc<Owner>,
}

// SAFETY: driver handles that must not be used from two threads at once: every use goes
// through the mutex in `CudaGraphRun` (launch) or happens on drop, when no other reference
// exists.
unsafe impl Send for GraphExec {}

impl Drop for GraphExec {
    fn drop(&mut self) {
        let o = &self.owner;
        if let Err(e) = bind(&o.ctx) {
            o.deferred
                .record("binding the context to destroy a CUDA graph".to_string(), e);
            return;
        }
        // SAFETY: ours, destroyed once (an executable still running is freed by the driver
        // when it completes).
        unsafe {
            if let Err(e) = dres::graph::exec_destroy(self.exec) {
                o.deferred
                    .record("destroying a CUDA graph's executable".to_string(), e);
            }
            if let Err(e) = dres::graph::destroy(self.graph) {
                o.deferred.record("destroying a CUDA graph".to_string(), e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn driver_present() -> bool {
        // SAFETY: only tries to open the library.
        unsafe { dsys::is_culib_present() }
    }

    /// Without a usable GPU, creating the device is an error that says what is missing (on a
    /// machine with one, the `gpu_` tests check the device itself).
    #[test]
    fn device_creation_says_what_is_missing() {
        if let Err(e) = CudaDevice::new(CudaConfig::default()) {
            let msg = e.to_string();
            assert!(msg.starts_with("backend `cuda`: "), "{msg}");
            if !driver_present() {
                assert!(msg.contains("no CUDA driver library"), "{msg}");
            }
        }
    }
}

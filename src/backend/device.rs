//! The device trait: the small surface that GPU op launchers are written against. Two devices
//! implement it: `emu` (the kernel sources compiled for the host, run as fibers) and `cuda`
//! (the same sources through NVRTC on a real GPU).

use crate::error::Result;

/// Grid, block and dynamic shared memory of one launch.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
}

impl LaunchConfig {
    /// A 1-D launch.
    pub fn linear(blocks: u32, threads: u32, shared_bytes: u32) -> LaunchConfig {
        LaunchConfig {
            grid: [blocks, 1, 1],
            block: [threads, 1, 1],
            shared_bytes,
        }
    }
    pub fn threads_per_block(&self) -> u64 {
        self.block.iter().map(|&b| b as u64).product()
    }
    pub fn blocks(&self) -> u64 {
        self.grid.iter().map(|&b| b as u64).product()
    }
}

/// One kernel argument. The launch passes each as a pointer to its value (`void**`).
#[derive(Copy, Clone, Debug, PartialEq)]
pub enum KernelArg {
    /// A device address (from [`Device::address`]) or 0 for "none".
    Ptr(u64),
    U32(u32),
    I32(i32),
    F32(f32),
    /// A tensor map ([`Device::tensor_map`]) passed by value, for a kernel parameter
    /// `const __grid_constant__ TmaMap` (kernels/common/tma.cuh).
    TensorMap(TensorMap),
}

/// The storage a launch points at for one argument: 128 bytes, 64-byte aligned (a tensor map's
/// size and alignment), the value in the low bytes (little-endian), which is how the kernel's
/// parameter type reads it.
#[repr(C, align(64))]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ArgSlot(pub [u64; 16]);

impl KernelArg {
    /// The argument in the slot a launch points at.
    pub fn slot(self) -> ArgSlot {
        let mut s = [0u64; 16];
        match self {
            KernelArg::Ptr(p) => s[0] = p,
            KernelArg::U32(v) => s[0] = v as u64,
            KernelArg::I32(v) => s[0] = v as u32 as u64,
            KernelArg::F32(v) => s[0] = v.to_bits() as u64,
            KernelArg::TensorMap(m) => s = m.0,
        }
        ArgSlot(s)
    }
}

/// An opaque 128-byte description of a 2-D copy for the tensor memory accelerator (TMA, sm_90):
/// on `cuda` what the driver's `cuTensorMapEncodeTiled` wrote, on `emu` the twin's own fields
/// (kernels/common/tma.cuh). Made by [`Device::tensor_map`] from a [`TensorMapSpec`].
#[repr(C, align(64))]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct TensorMap(pub [u64; 16]);

/// What a [`TensorMap`] describes: boxes of a row-major matrix of 16-bit elements (f16/bf16)
/// copied into shared memory in the 128-byte swizzle (a box row is 64 elements, 128 bytes:
/// 16-byte chunk c of row r lands at chunk c ^ (r % 8), the layout `wgmma` reads), elements
/// outside the matrix filled with zeros.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct TensorMapSpec {
    /// Device address of element (0, 0): 16-byte aligned.
    pub address: u64,
    /// Rows of the matrix (1 ..= 2^32).
    pub rows: u64,
    /// Elements per row, contiguous (1 ..= 2^32).
    pub cols: u64,
    /// Bytes from one row to the next: a multiple of 16, below 2^40.
    pub row_stride_bytes: u64,
    /// Rows of a box (1 ..= 256).
    pub box_rows: u32,
}

impl TensorMapSpec {
    /// Elements of a box row: one 128-byte swizzle row of 16-bit elements.
    pub const BOX_COLS: u32 = 64;

    /// The limits the driver documents for `cuTensorMapEncodeTiled` with this layout, checked
    /// on every device so the emulated one refuses what a GPU would.
    pub fn check(&self) -> std::result::Result<(), String> {
        let why = if !self.address.is_multiple_of(16) {
            "the address is not 16-byte aligned"
        } else if self.rows == 0 || self.rows > 1 << 32 || self.cols == 0 || self.cols > 1 << 32 {
            "rows and columns must be 1 ..= 2^32"
        } else if !self.row_stride_bytes.is_multiple_of(16) || self.row_stride_bytes >= 1 << 40 {
            "the row stride must be a multiple of 16 bytes below 2^40"
        } else if self.row_stride_bytes < self.cols * 2 {
            "the row stride is shorter than a row"
        } else if self.box_rows == 0 || self.box_rows > 256 {
            "a box has 1 ..= 256 rows"
        } else {
            return Ok(());
        };
        Err(format!("tensor map {self:?}: {why}"))
    }
}

/// Largest block (threads) and dynamic shared memory a launch may ask for; both devices refuse
/// more before launching (an H100/H200 allows 1024 threads and 227 KiB of shared memory).
pub const MAX_THREADS_PER_BLOCK: u64 = 1024;
pub const MAX_SHARED_BYTES: u32 = 227 * 1024;

pub trait Device: Send + Sync + 'static {
    /// Device memory. Dropping it frees it, ordered after the work already launched (so a
    /// buffer may be dropped while a launch that reads it is still queued).
    type Buf: Send + Sync;

    fn name(&self) -> &'static str;

    /// The device itself, e.g. `cuda: NVIDIA H200 (sm_90)` (see [`super::Backend::device_id`]).
    fn describe(&self) -> String;

    /// Uninitialised device memory of `bytes` bytes.
    fn alloc(&self, bytes: usize) -> Result<Self::Buf>;

    /// New device memory holding `bytes`.
    fn upload(&self, bytes: &[u8]) -> Result<Self::Buf>;

    /// Copies the whole buffer to the host (`out.len()` bytes).
    fn download(&self, buf: &Self::Buf, out: &mut [u8]) -> Result<()>;

    /// Sets every byte (used to poison outputs in tests).
    fn fill(&self, buf: &Self::Buf, byte: u8) -> Result<()>;

    /// The address a kernel sees for `buf`.
    fn address(&self, buf: &Self::Buf) -> u64;

    /// Size of `buf` in bytes.
    fn len(&self, buf: &Self::Buf) -> usize;

    /// Launches `kernel` (an `extern "C"` entry of `kernels/*.cu`) on the device's stream.
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number and type, every `Ptr` must be the
    /// address of a live buffer of this device (or 0 where the kernel accepts null), and the
    /// sizes passed must keep the kernel's accesses inside those buffers: a kernel trusts its
    /// arguments (on the emulated device it reads and writes host memory through them).
    unsafe fn launch(&self, kernel: &str, cfg: LaunchConfig, args: &[KernelArg]) -> Result<()>;

    /// Waits until everything launched so far has finished.
    fn synchronize(&self) -> Result<()>;

    /// Host memory the device copies into without the host waiting (page-locked on CUDA).
    type Pinned: Send + Sync + 'static;

    /// Host memory for [`Device::download_async`] of `bytes` bytes.
    fn alloc_pinned(&self, bytes: usize) -> Result<Self::Pinned>;

    /// Queues a copy of the whole of `buf` into `dst` on the device's stream and returns at
    /// once: the stream never waits for the host. [`Device::read_pinned`] waits for the copy.
    fn download_async(&self, buf: &Self::Buf, dst: &mut Self::Pinned) -> Result<()>;

    /// The bytes of `p` once every copy queued into it has landed (blocks until then).
    fn read_pinned(&self, p: &Self::Pinned) -> Result<Vec<u8>>;

    /// A marker of the device's stream, for timing and (later) early release.
    type Event: Send + Sync;

    /// Records an event at the current point of the device's stream (never blocks).
    fn record_event(&self) -> Result<Self::Event>;

    /// Blocks until the work recorded before `event` has finished.
    fn wait_event(&self, event: &Self::Event) -> Result<()>;

    /// Milliseconds between two recorded events (waits for both).
    fn elapsed_ms(&self, start: &Self::Event, end: &Self::Event) -> Result<f64>;

    /// A graph: a fixed sequence of launches, copies from a host staging area and fills, run
    /// by one call ([`Device::launch_graph`]) instead of one call each (a CUDA graph on `cuda`).
    /// Made by [`super::capture::GraphDevice`] from a recorded run.
    type Graph: Send + Sync;

    /// Builds a graph of `steps`, with `staging` bytes of host staging area for its uploads.
    /// No other thread may queue work on the device meanwhile (`GraphDevice` holds it off).
    ///
    /// # Safety
    /// Every `Launch` step must satisfy [`Device::launch`]'s contract for as long as the graph
    /// exists: the buffers its arguments point to must outlive the graph (`GraphDevice` keeps
    /// them with it). Upload and fill steps must name buffers that outlive it too.
    unsafe fn build_graph(
        &self,
        steps: &[GraphStep<'_, Self::Buf>],
        staging: usize,
    ) -> Result<Self::Graph>;

    /// Writes `bytes` into the graph's staging area at `offset`, after the graph's last launch
    /// has read it (waits for that launch if it has not).
    fn stage(&self, graph: &Self::Graph, offset: usize, bytes: &[u8]) -> Result<()>;

    /// Queues one run of the graph on the device's stream.
    fn launch_graph(&self, graph: &Self::Graph) -> Result<()>;

    /// Runs `f` (work on this device, no reads back) as one replayable unit named `key` where
    /// the device graphs runs ([`super::capture::GraphDevice`]); here, as it is.
    fn graphed<R>(&self, key: &str, f: &mut dyn FnMut() -> Result<R>) -> Result<R> {
        let _ = key;
        f()
    }

    /// What the device's graphs have done so far; `None` where it does not graph runs.
    fn graph_stats(&self) -> Option<super::capture::GraphStats> {
        None
    }

    /// Whether [`Device::graphed`] records and replays runs (a setting fixed when the device is
    /// made: cheap enough to ask per batch).
    fn graphs_enabled(&self) -> bool {
        false
    }

    /// Whether the warpgroup tensor-core instructions of Hopper (`wgmma`, sm_90a) run here, so
    /// the kernels built on them (`gemm_wgmma_*`) may be launched: a compute capability 9.0 GPU
    /// (whose kernels are compiled for sm_90a) and the emulated device (which has twins).
    fn has_wgmma(&self) -> bool {
        false
    }

    /// How many streaming multiprocessors the GPU has, when the device knows: the GEMMs size
    /// their tiles and persistent grids to it ([`crate::backend::gpu::GpuBackend::with_gemm_fill_tiles`]).
    /// `None` (the emulated device) leaves the default of an H100/H200.
    fn multiprocessors(&self) -> Option<usize> {
        None
    }

    /// A tensor map for the TMA copies of `spec`'s matrix (`cp.async.bulk.tensor`, sm_90), for
    /// the kernels built on them (`gemm_wgmma_tma_*`). The devices with [`Device::has_wgmma`]
    /// have TMA too; others refuse.
    fn tensor_map(&self, spec: &TensorMapSpec) -> Result<TensorMap> {
        Err(crate::error::Error::device(
            self.name(),
            format!("a tensor map for {spec:?}"),
            "this device has no tensor memory accelerator (TMA, compute capability 9.0)",
        ))
    }
}

/// One step of a [`Device::Graph`], in the order a run does them.
#[derive(Debug)]
pub enum GraphStep<'a, B> {
    Launch {
        kernel: &'a str,
        cfg: LaunchConfig,
        args: &'a [KernelArg],
    },
    /// Copies `len` bytes of the graph's host staging area, from `offset`, to the start of
    /// `dst`.
    Upload {
        dst: &'a B,
        offset: usize,
        len: usize,
    },
    /// Sets every byte of `dst`.
    Fill { dst: &'a B, byte: u8 },
}

/// Checks that a launch is within the limits every device shares.
pub(crate) fn check_launch(device: &'static str, kernel: &str, cfg: &LaunchConfig) -> Result<()> {
    let bad = |reason: String| crate::Error::kernel(device, kernel, format!("launch: {reason}"));
    let t = cfg.threads_per_block();
    if t == 0 || t > MAX_THREADS_PER_BLOCK {
        return Err(bad(format!(
            "{t} threads per block (1..={MAX_THREADS_PER_BLOCK})"
        )));
    }
    if cfg.blocks() == 0
        || cfg.grid[0] > i32::MAX as u32
        || cfg.grid[1] > 65535
        || cfg.grid[2] > 65535
    {
        return Err(bad(format!("grid {:?} is empty or too tall", cfg.grid)));
    }
    if cfg.shared_bytes > MAX_SHARED_BYTES {
        return Err(bad(format!(
            "{} bytes of dynamic shared memory (at most {MAX_SHARED_BYTES})",
            cfg.shared_bytes
        )));
    }
    Ok(())
}

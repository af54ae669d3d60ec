//! `emu`: an emulated CUDA device on the CPU. The very same `kernels/*.cu` sources are compiled
//! by the host C++ compiler (see `build.rs` and `kernels/emu/`); a launch runs its blocks in
//! parallel on the backend's thread pool, each block's threads as cooperative fibers with real
//! block and warp barriers. It exists so every kernel and GPU code path is tested on machines
//! with no GPU.

use std::alloc::Layout;
use std::ffi::{CString, c_char, c_void};
use std::sync::Arc;

use rayon::prelude::*;

use super::device::{
    ArgSlot, Device, GraphStep, KernelArg, LaunchConfig, TensorMap, TensorMapSpec, check_launch,
};
use crate::error::{Error, Result};

#[cfg(apparate_emu)]
unsafe extern "C" {
    fn apparate_emu_has_kernel(name: *const c_char) -> i32;
    fn apparate_emu_run(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        dyn_shared: u32,
        args: *mut *mut c_void,
        begin: u64,
        end: u64,
        seed: u64,
        err: *mut c_char,
        errlen: usize,
        counts: *mut BankTraffic,
    ) -> i32;
}

// Hosts that are not x86-64 build without the emulated device; these stand-ins are never
// reached because `EmuDevice::new` refuses to make one there.
#[cfg(not(apparate_emu))]
unsafe fn apparate_emu_has_kernel(_: *const c_char) -> i32 {
    0
}
#[cfg(not(apparate_emu))]
#[allow(clippy::too_many_arguments)]
unsafe fn apparate_emu_run(
    _: *const c_char,
    _: *const u32,
    _: *const u32,
    _: u32,
    _: *mut *mut c_void,
    _: u64,
    _: u64,
    _: u64,
    _: *mut c_char,
    _: usize,
    _: *mut BankTraffic,
) -> i32 {
    1
}

/// Settings of the emulated device.
#[derive(Clone, Debug, Default)]
pub struct EmuConfig {
    /// OS threads that run blocks in parallel (default: all cores, or `APPARATE_THREADS`).
    pub threads: Option<usize>,
    /// 0 (default): each block's threads run in order between barriers, deterministically.
    /// Otherwise the order is shuffled between barriers with this seed, and half the blocks run
    /// warp by warp (each warp through its warp operations up to a block barrier before the
    /// next), to expose missing barriers. `APPARATE_EMU_SEED` sets it from the environment.
    pub shuffle_seed: u64,
    /// The multiprocessors the device reports ([`Device::multiprocessors`]). Default `None`:
    /// it does not say, and the GEMMs size their grids for an H100/H200. Tests set it to play
    /// another GPU (an A100's 108, an H100 PCIe's 114).
    pub multiprocessors: Option<usize>,
}

/// Shared-memory wavefronts of one kind of access: `ideal` is the fewest the accesses could
/// take (one per phase of eight lanes of a 16-byte access), `actual` what their addresses
/// take when two chunks of a phase share a bank group. `actual > ideal` is a bank conflict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Wavefronts {
    pub ideal: u64,
    pub actual: u64,
}

impl Wavefronts {
    /// Wavefronts the conflicts add, as a share of the ideal (0 when there are none).
    pub fn excess(&self) -> f64 {
        if self.ideal == 0 {
            return 0.0;
        }
        (self.actual - self.ideal) as f64 / self.ideal as f64
    }
}

/// The shared-memory bank accounting of one kernel's launches on the emulated device, for the
/// instructions it sees whole (kernels/emu/emu.h): `ldmatrix` fragment loads and the shared
/// memory writes of `cp.async` copies. Addresses do not depend on the thread order, so the
/// counts are the same in every run of the same launches. Laid out as `ApparateEmuCounts`
/// (kernels/emu/emu.h), which a launch fills.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct BankTraffic {
    pub ldmatrix: Wavefronts,
    pub cp_async: Wavefronts,
    /// Warp-wide `mma.m16n8k16` issued: the work the wavefronts feed.
    pub mma: u64,
}

impl BankTraffic {
    fn add(&mut self, c: &BankTraffic) {
        for (a, b) in [
            (&mut self.ldmatrix, c.ldmatrix),
            (&mut self.cp_async, c.cp_async),
        ] {
            a.ideal += b.ideal;
            a.actual += b.actual;
        }
        self.mma += c.mma;
    }

    /// Shared-memory wavefronts (both kinds, as counted) per `mma.m16n8k16`. An H100/H200
    /// multiprocessor serves one wavefront per clock and its tensor cores one such multiply
    /// per clock at the datasheet rate, so above 1 shared memory caps the multiplies at that
    /// fraction of it. `None` where the kernel issued no multiply.
    pub fn wavefronts_per_mma(&self) -> Option<f64> {
        (self.mma > 0)
            .then(|| (self.ldmatrix.actual + self.cp_async.actual) as f64 / self.mma as f64)
    }
}

/// Device memory of the emulated device: a 256-byte aligned host allocation.
pub struct EmuBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the allocation is owned by the buffer; kernels write through raw pointers only while
// a launch that was handed the address runs, and launches are synchronous.
unsafe impl Send for EmuBuf {}
unsafe impl Sync for EmuBuf {}

const ALIGN: usize = 256;

impl EmuBuf {
    fn new(len: usize) -> Result<EmuBuf> {
        let layout = Layout::from_size_align(len.max(1), ALIGN)
            .map_err(|e| Error::device("emu", format!("allocation of {len} bytes"), e))?;
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            return Err(Error::device(
                "emu",
                format!("allocation of {len} bytes"),
                "out of host memory",
            ));
        }
        Ok(EmuBuf { ptr, len })
    }
}

impl Drop for EmuBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe {
            std::alloc::dealloc(
                self.ptr,
                Layout::from_size_align_unchecked(self.len.max(1), ALIGN),
            )
        }
    }
}

#[derive(Clone)]
pub struct EmuDevice {
    pool: Arc<rayon::ThreadPool>,
    seed: u64,
    multiprocessors: Option<usize>,
    /// Every operation on device memory holds this, like one in-order stream: a launch and a
    /// fill or copy from another thread never touch the same bytes at once.
    stream: Arc<std::sync::Mutex<()>>,
    /// Shared-memory bank accounting per kernel name, summed over launches.
    banks: Arc<std::sync::Mutex<std::collections::BTreeMap<String, BankTraffic>>>,
}

impl std::fmt::Debug for EmuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "EmuDevice {{ threads: {}, seed: {} }}",
            self.pool.current_num_threads(),
            self.seed
        )
    }
}

fn err(what: impl Into<String>, reason: impl std::fmt::Display) -> Error {
    Error::device("emu", what, reason)
}

impl EmuDevice {
    pub fn new(config: EmuConfig) -> Result<EmuDevice> {
        if cfg!(not(apparate_emu)) {
            return Err(err("start", "the emulated device needs an x86-64 host"));
        }
        // The same range and environment variable as the CPU backend's threads.
        let threads = crate::backend::CpuConfig {
            threads: config.threads,
            ..Default::default()
        }
        .resolve_threads()?;
        let seed = match config.shuffle_seed {
            0 => std::env::var("APPARATE_EMU_SEED")
                .ok()
                .map(|v| {
                    v.parse().map_err(|_| {
                        Error::config("APPARATE_EMU_SEED", format!("`{v}`"), "the u64 numbers")
                    })
                })
                .transpose()?
                .unwrap_or(0),
            s => s,
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("apparate-emu-{i}"))
            .build()
            .map_err(|e| err(format!("starting {threads} threads"), e))?;
        Ok(EmuDevice {
            pool: Arc::new(pool),
            seed,
            multiprocessors: config.multiprocessors,
            stream: Arc::new(std::sync::Mutex::new(())),
            banks: Arc::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.stream.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Each kernel's shared-memory bank accounting since this device was made (kernels that
    /// issued no ldmatrix or cp.async are absent): what a GPU run cannot show without a
    /// profiler, checked here on every launch the tests make.
    pub fn bank_traffic(&self) -> std::collections::BTreeMap<String, BankTraffic> {
        self.banks.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// True when the emulated device has a kernel of this name.
    pub fn has_kernel(&self, name: &str) -> bool {
        CString::new(name).is_ok_and(|c| unsafe { apparate_emu_has_kernel(c.as_ptr()) } != 0)
    }

    /// Runs blocks [begin, end) of a launch on this thread; their bank accounting.
    fn run_blocks(
        &self,
        kernel: &str,
        cname: &CString,
        cfg: &LaunchConfig,
        args: &[KernelArg],
        begin: u64,
        end: u64,
    ) -> Result<BankTraffic> {
        // Each chunk gets its own copy of the argument values: a kernel receives `void**`
        // pointing at them, as with cuLaunchKernel.
        let mut values: Vec<ArgSlot> = args.iter().map(|a| a.slot()).collect();
        let mut ptrs: Vec<*mut c_void> = values
            .iter_mut()
            .map(|v| v as *mut ArgSlot as *mut c_void)
            .collect();
        let mut msg = vec![0 as c_char; 512];
        let mut counts = BankTraffic::default();
        // SAFETY: names and arrays outlive the call; every argument is a 128-byte slot whose
        // low bytes hold the value (little-endian), as the kernel's parameter types read them;
        // `counts` has the layout of ApparateEmuCounts.
        let rc = unsafe {
            apparate_emu_run(
                cname.as_ptr(),
                cfg.grid.as_ptr(),
                cfg.block.as_ptr(),
                cfg.shared_bytes,
                ptrs.as_mut_ptr(),
                begin,
                end,
                self.seed,
                msg.as_mut_ptr(),
                msg.len(),
                &mut counts,
            )
        };
        if rc != 0 {
            let text: Vec<u8> = msg
                .iter()
                .take_while(|&&c| c != 0)
                .map(|&c| c as u8)
                .collect();
            return Err(Error::kernel(
                "emu",
                kernel,
                String::from_utf8_lossy(&text).into_owned(),
            ));
        }
        Ok(counts)
    }
}

/// The last word of an emulated tensor map (`kMapMark` in kernels/emu/mbarrier.cpp).
const EMU_TENSOR_MAP_MARK: u64 = 0x5041_4d54_4150_5041;

impl Device for EmuDevice {
    type Buf = EmuBuf;

    fn name(&self) -> &'static str {
        "emu"
    }

    /// The wgmma twins of kernels/common/wgmma.cuh.
    fn has_wgmma(&self) -> bool {
        true
    }

    fn multiprocessors(&self) -> Option<usize> {
        self.multiprocessors
    }

    /// The TMA twin's own fields (kernels/common/tma.cuh, `TmaMap`): address, columns, rows,
    /// row stride, box columns and rows, element bytes, swizzle bytes, and a mark in the last
    /// word that the twin checks.
    fn tensor_map(&self, spec: &TensorMapSpec) -> Result<TensorMap> {
        spec.check()
            .map_err(|why| Error::device("emu", format!("a tensor map for {spec:?}"), why))?;
        let mut v = [0u64; 16];
        v[0] = spec.address;
        v[1] = spec.cols;
        v[2] = spec.rows;
        v[3] = spec.row_stride_bytes;
        v[4] = TensorMapSpec::BOX_COLS as u64;
        v[5] = spec.box_rows as u64;
        v[6] = 2;
        v[7] = 128;
        v[15] = EMU_TENSOR_MAP_MARK;
        Ok(TensorMap(v))
    }

    fn describe(&self) -> String {
        format!(
            "emu: {}, {} threads",
            crate::backend::cpu::host_cpu_name(),
            self.pool.current_num_threads()
        )
    }

    fn alloc(&self, bytes: usize) -> Result<EmuBuf> {
        EmuBuf::new(bytes)
    }

    fn upload(&self, bytes: &[u8]) -> Result<EmuBuf> {
        let b = EmuBuf::new(bytes.len())?;
        // SAFETY: b holds at least bytes.len() bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), b.ptr, bytes.len()) };
        Ok(b)
    }

    fn download(&self, buf: &EmuBuf, out: &mut [u8]) -> Result<()> {
        let _stream = self.lock();
        if out.len() != buf.len {
            return Err(err(
                "download",
                format!("a {}-byte buffer into {} bytes", buf.len, out.len()),
            ));
        }
        // SAFETY: same length, distinct allocations.
        unsafe { std::ptr::copy_nonoverlapping(buf.ptr, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    fn fill(&self, buf: &EmuBuf, byte: u8) -> Result<()> {
        let _stream = self.lock();
        // SAFETY: within the allocation.
        unsafe { std::ptr::write_bytes(buf.ptr, byte, buf.len) };
        Ok(())
    }

    fn address(&self, buf: &EmuBuf) -> u64 {
        buf.ptr as u64
    }

    fn len(&self, buf: &EmuBuf) -> usize {
        buf.len
    }

    unsafe fn launch(&self, kernel: &str, cfg: LaunchConfig, args: &[KernelArg]) -> Result<()> {
        check_launch("emu", kernel, &cfg)?;
        let _stream = self.lock();
        let cname = CString::new(kernel)
            .map_err(|_| Error::kernel("emu", kernel, "a kernel name cannot hold a NUL byte"))?;
        if !self.has_kernel(kernel) {
            return Err(Error::kernel("emu", kernel, "no kernel of this name"));
        }
        let blocks = cfg.blocks();
        let workers = self.pool.current_num_threads() as u64;
        // A few chunks per worker balance uneven blocks without much scheduling overhead.
        let chunk = blocks.div_ceil(workers * 4).max(1);
        let chunks: Vec<(u64, u64)> = (0..blocks)
            .step_by(chunk as usize)
            .map(|b| (b, (b + chunk).min(blocks)))
            .collect();
        let result: Result<BankTraffic> = self.pool.install(|| {
            chunks
                .par_iter()
                .map(|&(begin, end)| self.run_blocks(kernel, &cname, &cfg, args, begin, end))
                .try_reduce(BankTraffic::default, |mut a, b| {
                    a.add(&b);
                    Ok(a)
                })
        });
        let counts = result?;
        if counts != BankTraffic::default() {
            let mut all = self.banks.lock().unwrap_or_else(|p| p.into_inner());
            match all.get_mut(kernel) {
                Some(t) => t.add(&counts),
                None => {
                    all.insert(kernel.to_string(), counts);
                }
            }
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// Launches and copies are synchronous here, so pinned memory is plain memory.
    type Pinned = Vec<u8>;

    fn alloc_pinned(&self, bytes: usize) -> Result<Vec<u8>> {
        Ok(vec![0; bytes])
    }

    fn download_async(&self, buf: &EmuBuf, dst: &mut Vec<u8>) -> Result<()> {
        if dst.len() < buf.len {
            return Err(err(
                "async download",
                format!("a {}-byte buffer into {} bytes", buf.len, dst.len()),
            ));
        }
        let n = buf.len;
        self.download(buf, &mut dst[..n])
    }

    fn read_pinned(&self, p: &Vec<u8>) -> Result<Vec<u8>> {
        Ok(p.clone())
    }

    /// Launches are synchronous, so an event is just the time it was recorded.
    type Event = std::time::Instant;

    fn record_event(&self) -> Result<std::time::Instant> {
        Ok(std::time::Instant::now())
    }

    fn wait_event(&self, _: &std::time::Instant) -> Result<()> {
        Ok(())
    }

    fn elapsed_ms(&self, start: &std::time::Instant, end: &std::time::Instant) -> Result<f64> {
        Ok(end.saturating_duration_since(*start).as_secs_f64() * 1e3)
    }

    type Graph = EmuGraph;

    unsafe fn build_graph(
        &self,
        steps: &[GraphStep<'_, EmuBuf>],
        staging: usize,
    ) -> Result<EmuGraph> {
        let steps = steps
            .iter()
            .map(|s| match *s {
                GraphStep::Launch { kernel, cfg, args } => {
                    if self.has_kernel(kernel) {
                        Ok(EmuStep::Launch(kernel.to_string(), cfg, args.to_vec()))
                    } else {
                        Err(Error::kernel("emu", kernel, "no kernel of this name"))
                    }
                }
                GraphStep::Upload { dst, offset, len } => {
                    if offset + len > staging || len > dst.len {
                        return Err(err(
                            "building a graph",
                            format!("an upload of {len} bytes at staging offset {offset} (staging {staging} bytes, destination {})", dst.len),
                        ));
                    }
                    Ok(EmuStep::Upload(dst.ptr, offset, len))
                }
                GraphStep::Fill { dst, byte } => Ok(EmuStep::Fill(dst.ptr, dst.len, byte)),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(EmuGraph {
            steps,
            staging: std::sync::Mutex::new(vec![0; staging]),
        })
    }

    fn stage(&self, graph: &EmuGraph, offset: usize, bytes: &[u8]) -> Result<()> {
        let mut staging = graph.staging.lock().unwrap_or_else(|p| p.into_inner());
        let end = offset
            .checked_add(bytes.len())
            .filter(|&e| e <= staging.len());
        let Some(end) = end else {
            return Err(err(
                "staging a graph's upload",
                format!(
                    "{} bytes at offset {offset} of a {}-byte staging area",
                    bytes.len(),
                    staging.len()
                ),
            ));
        };
        staging[offset..end].copy_from_slice(bytes);
        Ok(())
    }

    fn launch_graph(&self, graph: &EmuGraph) -> Result<()> {
        let staging = graph.staging.lock().unwrap_or_else(|p| p.into_inner());
        for step in &graph.steps {
            match step {
                // SAFETY: `build_graph`'s contract: the arguments were valid for the launch
                // and their buffers outlive the graph.
                EmuStep::Launch(kernel, cfg, args) => unsafe { self.launch(kernel, *cfg, args) }?,
                EmuStep::Upload(dst, offset, len) => {
                    let _stream = self.lock();
                    // SAFETY: checked against both sizes when built; the destination outlives
                    // the graph.
                    unsafe {
                        std::ptr::copy_nonoverlapping(staging[*offset..].as_ptr(), *dst, *len)
                    };
                }
                EmuStep::Fill(dst, len, byte) => {
                    let _stream = self.lock();
                    // SAFETY: the whole of a buffer that outlives the graph.
                    unsafe { std::ptr::write_bytes(*dst, *byte, *len) };
                }
            }
        }
        Ok(())
    }
}

/// A graph of the emulated device: its steps, replayed in order by `launch_graph`.
pub struct EmuGraph {
    steps: Vec<EmuStep>,
    staging: std::sync::Mutex<Vec<u8>>,
}

enum EmuStep {
    Launch(String, LaunchConfig, Vec<KernelArg>),
    /// (destination, staging offset, bytes)
    Upload(*mut u8, usize, usize),
    /// (destination, bytes, value)
    Fill(*mut u8, usize, u8),
}

// SAFETY: the raw pointers are device (host) memory that outlives the graph (`build_graph`'s
// contract); launches and copies through them take the device's stream lock.
unsafe impl Send for EmuGraph {}
unsafe impl Sync for EmuGraph {}

//! `cuda`: a real GPU through cudarc (run-time loading), kernels compiled by NVRTC.
//!
//! Nothing here needs CUDA at build time: cudarc loads `libcuda` and `libnvrtc` when they are
//! first used, and panics if they are missing. So every entry point first asks the
//! non-panicking `is_culib_present()` probes and returns [`Error::Backend`] saying what is
//! missing, and every cudarc call runs under [`std::panic::catch_unwind`] so that a cudarc
//! panic (a missing symbol in an old library, say) comes back as an error too.
//!
//! - [`probe`] says whether this machine can run the backend (driver library, driver version,
//!   a device, NVRTC) and what it has.
//! - [`compile_source`], [`compile_ptx`] and [`compile_cubin`] run NVRTC over the kernel
//!   sources embedded in the binary ([`super::kernel_sources`]), with the shared headers as
//!   NVRTC in-memory headers.
//! - [`CudaDevice`] implements [`Device`]: at creation it compiles every kernel source for the
//!   device's own architecture (a cubin by default: PTX from a newer NVRTC does not load on an
//!   older driver, a cubin does within one CUDA major version), caches the result on disk
//!   keyed by the sha256 of (NVRTC version, source, headers, options), loads the modules and
//!   launches kernels by name on one stream.

use std::collections::HashMap;
use std::ffi::{CString, c_char, c_int};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use cudarc::driver::result::DriverError;
use cudarc::driver::sys as dsys;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, PushKernelArg};
use cudarc::nvrtc::sys as nsys;
use sha2::{Digest, Sha256};

use super::device::{Device, KernelArg, LaunchConfig, check_launch};
use super::kernel_sources::{HEADERS, SOURCES};
use crate::error::{Error, Result};

const BACKEND: &str = "cuda";

/// Oldest driver API version the backend accepts (CUDA 12.0, as `cuDriverGetVersion` writes it).
pub const MIN_DRIVER_VERSION: i32 = 12000;

/// NVRTC options every compilation gets (after `--gpu-architecture`).
pub const DEFAULT_OPTIONS: &[&str] = &["-std=c++17", "--device-as-default-execution-space"];

fn err(reason: impl Into<String>) -> Error {
    Error::Backend {
        backend: BACKEND,
        reason: reason.into(),
    }
}

/// Runs `f`, turning a panic inside it (cudarc panics on missing libraries and symbols) into an
/// error that says what was being done.
fn guard<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(err(format!("{what}: the CUDA library failed: {msg}")))
        }
    }
}

/// `CUDA_ERROR_OUT_OF_MEMORY (out of memory)`.
fn describe(e: DriverError) -> String {
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    match e.error_string() {
        Ok(s) => format!("{name} ({})", s.to_string_lossy()),
        Err(_) => name,
    }
}

fn drv(what: impl fmt::Display) -> impl FnOnce(DriverError) -> Error {
    move |e| err(format!("{what}: {}", describe(e)))
}

fn check(what: &str, rc: dsys::CUresult) -> Result<()> {
    rc.result().map_err(drv(what))
}

/// `13000` -> `13.0`.
fn version_string(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

// ---- architectures ------------------------------------------------------------------------

/// A GPU architecture: compute capability plus an optional feature suffix (`a`, `f`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Arch {
    pub major: u32,
    pub minor: u32,
    pub suffix: String,
}

impl Arch {
    pub fn new(major: u32, minor: u32) -> Arch {
        Arch {
            major,
            minor,
            suffix: String::new(),
        }
    }

    /// Accepts `sm_90`, `sm_90a`, `compute_90`, `90` and `9.0`.
    pub fn parse(s: &str) -> Result<Arch> {
        let bad = || {
            err(format!(
                "`{s}` is not a GPU architecture (expected sm_XY, compute_XY, XY or X.Y)"
            ))
        };
        let t = s.trim();
        if let Some((maj, min)) = t.split_once('.') {
            return Ok(Arch::new(
                maj.parse().map_err(|_| bad())?,
                min.parse().map_err(|_| bad())?,
            ));
        }
        let t = t
            .strip_prefix("sm_")
            .or_else(|| t.strip_prefix("compute_"))
            .unwrap_or(t);
        let digits: String = t.chars().take_while(|c| c.is_ascii_digit()).collect();
        let suffix = &t[digits.len()..];
        if digits.len() < 2 || !matches!(suffix, "" | "a" | "f") {
            return Err(bad());
        }
        let (maj, min) = digits.split_at(digits.len() - 1);
        Ok(Arch {
            major: maj.parse().map_err(|_| bad())?,
            minor: min.parse().map_err(|_| bad())?,
            suffix: suffix.to_string(),
        })
    }

    /// `sm_90`: a real architecture (a cubin target).
    pub fn sm(&self) -> String {
        format!("sm_{}{}{}", self.major, self.minor, self.suffix)
    }

    /// `compute_90`: a virtual architecture (a PTX target).
    pub fn compute(&self) -> String {
        format!("compute_{}{}{}", self.major, self.minor, self.suffix)
    }

    /// `90`, as `nvrtcGetSupportedArchs` lists it.
    fn number(&self) -> i32 {
        (self.major * 10 + self.minor) as i32
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.sm())
    }
}

// ---- probe --------------------------------------------------------------------------------

/// What [`probe`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeInfo {
    /// `cuDriverGetVersion`, e.g. 13000 for CUDA 13.0.
    pub driver_version: i32,
    /// `nvrtcVersion` (major, minor).
    pub nvrtc_version: (i32, i32),
    /// Devices the driver sees.
    pub device_count: usize,
    /// The probed device.
    pub ordinal: usize,
    pub device_name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (u32, u32),
    pub total_memory: usize,
}

impl ProbeInfo {
    /// The device's own architecture (`sm_90` for compute capability 9.0).
    pub fn arch(&self) -> Arch {
        Arch::new(self.compute_capability.0, self.compute_capability.1)
    }
}

impl fmt::Display for ProbeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "device {} of {}: {} ({}, {:.1} GiB), driver CUDA {}, NVRTC {}.{}",
            self.ordinal,
            self.device_count,
            self.device_name,
            self.arch(),
            self.total_memory as f64 / (1u64 << 30) as f64,
            version_string(self.driver_version),
            self.nvrtc_version.0,
            self.nvrtc_version.1
        )
    }
}

/// Whether this machine can run the CUDA backend on device 0; never panics.
pub fn probe() -> Result<ProbeInfo> {
    probe_device(0)
}

/// Whether this machine can run the CUDA backend on device `ordinal`; never panics. The error
/// says which piece is missing: the driver library, a new enough driver, a device, NVRTC, or
/// NVRTC support for the device's architecture.
pub fn probe_device(ordinal: usize) -> Result<ProbeInfo> {
    guard("probing the CUDA driver", || {
        // SAFETY: only tries to open the library.
        if !unsafe { dsys::is_culib_present() } {
            return Err(err(
                "no CUDA driver library (libcuda.so) found: this machine has no NVIDIA driver \
                 (or no GPU)",
            ));
        }
        let driver_version = driver_version()?;
        if driver_version < MIN_DRIVER_VERSION {
            return Err(err(format!(
                "driver too old: it supports CUDA {}, at least CUDA {} is needed",
                version_string(driver_version),
                version_string(MIN_DRIVER_VERSION)
            )));
        }
        // SAFETY: plain driver call.
        match unsafe { dsys::cuInit(0) } {
            dsys::CUresult::CUDA_SUCCESS => {}
            dsys::CUresult::CUDA_ERROR_NO_DEVICE => {
                return Err(err(
                    "no CUDA device: the driver is installed but sees no GPU",
                ));
            }
            dsys::CUresult::CUDA_ERROR_STUB_LIBRARY => return Err(stub_library()),
            dsys::CUresult::CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE => {
                return Err(err(format!(
                    "driver too old: the CUDA {} forward-compatibility driver does not support \
                     this GPU",
                    version_string(driver_version)
                )));
            }
            rc => check("cuInit", rc)?,
        }
        let mut count: c_int = 0;
        // SAFETY: out-pointer to a local.
        check("cuDeviceGetCount", unsafe {
            dsys::cuDeviceGetCount(&mut count)
        })?;
        if count <= 0 {
            return Err(err("no CUDA device: the driver sees no GPU"));
        }
        if ordinal >= count as usize {
            return Err(err(format!(
                "no CUDA device {ordinal}: the driver sees {count} device(s)"
            )));
        }
        let mut dev: dsys::CUdevice = 0;
        // SAFETY: out-pointer to a local; ordinal checked above.
        check("cuDeviceGet", unsafe {
            dsys::cuDeviceGet(&mut dev, ordinal as c_int)
        })?;
        let mut name = [0 as c_char; 256];
        // SAFETY: the buffer holds `len` bytes.
        check("cuDeviceGetName", unsafe {
            dsys::cuDeviceGetName(name.as_mut_ptr(), name.len() as c_int, dev)
        })?;
        let bytes: Vec<u8> = name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        let device_name = String::from_utf8_lossy(&bytes).into_owned();
        let attr = |a: dsys::CUdevice_attribute| -> Result<i32> {
            let mut v: c_int = 0;
            // SAFETY: out-pointer to a local; dev is valid.
            check("cuDeviceGetAttribute", unsafe {
                dsys::cuDeviceGetAttribute(&mut v, a, dev)
            })?;
            Ok(v)
        };
        let cc_major =
            attr(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let cc_minor =
            attr(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let mut total_memory = 0usize;
        // SAFETY: out-pointer to a local.
        check("cuDeviceTotalMem", unsafe {
            dsys::cuDeviceTotalMem_v2(&mut total_memory, dev)
        })?;

        let nvrtc_version = nvrtc_version()?;
        if driver_version / 1000 < nvrtc_version.0 {
            return Err(err(format!(
                "driver too old for this NVRTC: the driver supports CUDA {}, NVRTC is {}.{} (its \
                 code needs a CUDA {} driver); put an NVRTC of CUDA {} on LD_LIBRARY_PATH or \
                 update the driver",
                version_string(driver_version),
                nvrtc_version.0,
                nvrtc_version.1,
                nvrtc_version.0,
                driver_version / 1000
            )));
        }
        let info = ProbeInfo {
            driver_version,
            nvrtc_version,
            device_count: count as usize,
            ordinal,
            device_name,
            compute_capability: (cc_major as u32, cc_minor as u32),
            total_memory,
        };
        // The tensor-core GEMM (mma.m16n8k16 with bf16) and the bf16 conversions need sm_80.
        if info.compute_capability.0 < 8 {
            return Err(err(format!(
                "{} is {}: the kernels need compute capability 8.0 (Ampere) or newer",
                info.device_name,
                info.arch()
            )));
        }
        let archs = nvrtc_supported_archs()?;
        if !archs.contains(&info.arch().number()) {
            return Err(err(format!(
                "NVRTC {}.{} cannot compile for this device ({}, {}); it supports {}",
                nvrtc_version.0,
                nvrtc_version.1,
                info.device_name,
                info.arch(),
                archs
                    .iter()
                    .map(|a| format!("sm_{a}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(info)
    })
}

/// `cuDriverGetVersion` (needs the driver library; does not need `cuInit`).
fn driver_version() -> Result<i32> {
    let mut v: c_int = 0;
    // SAFETY: out-pointer to a local.
    match unsafe { dsys::cuDriverGetVersion(&mut v) } {
        dsys::CUresult::CUDA_ERROR_STUB_LIBRARY => Err(stub_library()),
        rc => check("cuDriverGetVersion", rc).map(|_| v),
    }
}

fn stub_library() -> Error {
    err("no CUDA driver: the libcuda.so found is the CUDA toolkit's stub library, not a driver")
}

// ---- NVRTC --------------------------------------------------------------------------------

fn require_nvrtc() -> Result<()> {
    // SAFETY: only tries to open the library.
    if unsafe { nsys::is_culib_present() } {
        Ok(())
    } else {
        Err(err(
            "no NVRTC library (libnvrtc.so.13 or libnvrtc.so.12) found on the library path; \
             tools/fetch-cuda-tools.sh installs one and prints the LD_LIBRARY_PATH entry",
        ))
    }
}

fn nvrtc_error_text(rc: nsys::nvrtcResult) -> String {
    // SAFETY: returns a pointer to a static string (or null).
    unsafe {
        let p = nsys::nvrtcGetErrorString(rc);
        if p.is_null() {
            format!("{rc:?}")
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

fn nvrtc_check(what: &str, rc: nsys::nvrtcResult) -> Result<()> {
    if rc == nsys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(err(format!("{what}: {}", nvrtc_error_text(rc))))
    }
}

/// The NVRTC library's version (major, minor). Errors when there is no NVRTC library.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    guard("NVRTC", || {
        require_nvrtc()?;
        let (mut major, mut minor): (c_int, c_int) = (0, 0);
        // SAFETY: out-pointers to locals.
        nvrtc_check("nvrtcVersion", unsafe {
            nsys::nvrtcVersion(&mut major, &mut minor)
        })?;
        Ok((major, minor))
    })
}

/// The real architectures NVRTC can compile for, as numbers (`90` for sm_90).
pub fn nvrtc_supported_archs() -> Result<Vec<i32>> {
    guard("NVRTC", || {
        require_nvrtc()?;
        let mut n: c_int = 0;
        // SAFETY: out-pointer to a local.
        nvrtc_check("nvrtcGetNumSupportedArchs", unsafe {
            nsys::nvrtcGetNumSupportedArchs(&mut n)
        })?;
        let mut archs = vec![0 as c_int; n.max(0) as usize];
        // SAFETY: the buffer holds n entries.
        nvrtc_check("nvrtcGetSupportedArchs", unsafe {
            nsys::nvrtcGetSupportedArchs(archs.as_mut_ptr())
        })?;
        Ok(archs)
    })
}

/// What NVRTC produces.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// PTX for the virtual architecture (`compute_XY`); the driver JIT-compiles it, which
    /// needs a driver at least as new as NVRTC.
    Ptx,
    /// A cubin for the real architecture (`sm_XY`); loads on a driver of the same CUDA major
    /// version as NVRTC, and runs on that architecture only.
    Cubin,
}

impl Target {
    fn extension(self) -> &'static str {
        match self {
            Target::Ptx => "ptx",
            Target::Cubin => "cubin",
        }
    }
}

/// The full NVRTC option list: `--gpu-architecture`, [`DEFAULT_OPTIONS`], then `extra`.
pub fn nvrtc_options<O: AsRef<str>>(arch: &Arch, target: Target, extra: &[O]) -> Vec<String> {
    let gpu = match target {
        Target::Ptx => arch.compute(),
        Target::Cubin => arch.sm(),
    };
    std::iter::once(format!("--gpu-architecture={gpu}"))
        .chain(DEFAULT_OPTIONS.iter().map(|s| s.to_string()))
        .chain(extra.iter().map(|s| s.as_ref().to_string()))
        .collect()
}

/// One compiled kernel source.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// PTX text (without the terminating NUL) or cubin bytes.
    pub code: Vec<u8>,
    /// NVRTC's log (warnings); empty when it had nothing to say.
    pub log: String,
}

/// Destroys an NVRTC program when dropped.
struct Program(nsys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram, destroyed once.
        unsafe { nsys::nvrtcDestroyProgram(&mut self.0) };
    }
}

fn cstring(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| err(format!("{what} contains a NUL byte")))
}

/// Compiles one kernel source (`file` is its name in `kernels/`, used in messages) with the
/// shared headers as in-memory headers. `arch` is anything [`Arch::parse`] accepts; `options`
/// come after `--gpu-architecture` and [`DEFAULT_OPTIONS`]. A compile error carries the file
/// name, the options and NVRTC's log.
pub fn compile_source<O: AsRef<str>>(
    file: &str,
    text: &str,
    arch: &str,
    target: Target,
    options: &[O],
) -> Result<Compiled> {
    if target == Target::Cubin && arch.trim().starts_with("compute_") {
        return Err(err(format!(
            "a cubin needs a real architecture (sm_XY), not `{arch}`"
        )));
    }
    let arch = Arch::parse(arch)?;
    let options = nvrtc_options(&arch, target, options);
    compile_with(file, text, target, &options)
}

fn compile_with(file: &str, text: &str, target: Target, options: &[String]) -> Result<Compiled> {
    guard(&format!("NVRTC compiling kernels/{file}"), || {
        require_nvrtc()?;
        let src = cstring(file, text)?;
        let name = cstring("file name", file)?;
        let headers = nvrtc_headers();
        let header_texts = headers
            .iter()
            .map(|(n, t)| cstring(n, t))
            .collect::<Result<Vec<_>>>()?;
        let header_names = headers
            .iter()
            .map(|(n, _)| cstring("header name", n))
            .collect::<Result<Vec<_>>>()?;
        let header_text_ptrs: Vec<*const c_char> =
            header_texts.iter().map(|s| s.as_ptr()).collect();
        let header_name_ptrs: Vec<*const c_char> =
            header_names.iter().map(|s| s.as_ptr()).collect();
        let opts = options
            .iter()
            .map(|o| cstring("NVRTC option", o))
            .collect::<Result<Vec<_>>>()?;
        let opt_ptrs: Vec<*const c_char> = opts.iter().map(|s| s.as_ptr()).collect();

        let mut raw: nsys::nvrtcProgram = std::ptr::null_mut();
        // SAFETY: every pointer is a NUL-terminated string that outlives the program.
        nvrtc_check("nvrtcCreateProgram", unsafe {
            nsys::nvrtcCreateProgram(
                &mut raw,
                src.as_ptr(),
                name.as_ptr(),
                header_text_ptrs.len() as c_int,
                header_text_ptrs.as_ptr(),
                header_name_ptrs.as_ptr(),
            )
        })?;
        let prog = Program(raw);
        // SAFETY: valid program, options outlive the call.
        let rc = unsafe {
            nsys::nvrtcCompileProgram(prog.0, opt_ptrs.len() as c_int, opt_ptrs.as_ptr())
        };
        let log = program_log(&prog)?;
        if rc != nsys::nvrtcResult::NVRTC_SUCCESS {
            return Err(err(format!(
                "NVRTC could not compile kernels/{file} ({}): {}\n{log}",
                options.join(" "),
                nvrtc_error_text(rc)
            )));
        }
        let code = match target {
            Target::Ptx => {
                let mut size = 0usize;
                // SAFETY: out-pointer to a local; then a buffer of that size.
                nvrtc_check("nvrtcGetPTXSize", unsafe {
                    nsys::nvrtcGetPTXSize(prog.0, &mut size)
                })?;
                let mut buf = vec![0u8; size];
                nvrtc_check("nvrtcGetPTX", unsafe {
                    nsys::nvrtcGetPTX(prog.0, buf.as_mut_ptr() as *mut c_char)
                })?;
                while buf.last() == Some(&0) {
                    buf.pop();
                }
                buf
            }
            Target::Cubin => {
                let mut size = 0usize;
                // SAFETY: as above.
                nvrtc_check("nvrtcGetCUBINSize", unsafe {
                    nsys::nvrtcGetCUBINSize(prog.0, &mut size)
                })?;
                if size == 0 {
                    return Err(err(format!(
                        "NVRTC produced no cubin for kernels/{file} ({}); a cubin needs a real \
                         architecture (sm_XY)",
                        options.join(" ")
                    )));
                }
                let mut buf = vec![0u8; size];
                nvrtc_check("nvrtcGetCUBIN", unsafe {
                    nsys::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr() as *mut c_char)
                })?;
                buf
            }
        };
        Ok(Compiled { code, log })
    })
}

/// The shared headers as NVRTC in-memory headers. NVRTC matches an `#include "..."` against
/// these names literally, without resolving it relative to the including header, so a header
/// in `common/` that includes a sibling (`#include "apparate.cuh"` in `common/mma.cuh`) needs
/// the sibling under its bare name too.
fn nvrtc_headers() -> Vec<(&'static str, &'static str)> {
    let mut all: Vec<(&str, &str)> = HEADERS.to_vec();
    for &(name, text) in HEADERS {
        if let Some((_, base)) = name.rsplit_once('/')
            && !all.iter().any(|(n, _)| *n == base)
        {
            all.push((base, text));
        }
    }
    all
}

fn program_log(prog: &Program) -> Result<String> {
    let mut size = 0usize;
    // SAFETY: out-pointer to a local; then a buffer of that size.
    nvrtc_check("nvrtcGetProgramLogSize", unsafe {
        nsys::nvrtcGetProgramLogSize(prog.0, &mut size)
    })?;
    let mut buf = vec![0u8; size.max(1)];
    nvrtc_check("nvrtcGetProgramLog", unsafe {
        nsys::nvrtcGetProgramLog(prog.0, buf.as_mut_ptr() as *mut c_char)
    })?;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).trim_end().to_string())
}

/// Compiles every kernel source to PTX for `arch` (`sm_90` and `compute_90` both give
/// `compute_90` PTX): (file name, PTX text) per source. Stops at the first failure.
pub fn compile_ptx<O: AsRef<str>>(arch: &str, options: &[O]) -> Result<Vec<(String, String)>> {
    SOURCES
        .iter()
        .map(|(file, text)| {
            let c = compile_source(file, text, arch, Target::Ptx, options)?;
            let ptx = String::from_utf8(c.code)
                .map_err(|_| err(format!("NVRTC returned non-UTF-8 PTX for kernels/{file}")))?;
            Ok((file.to_string(), ptx))
        })
        .collect()
}

/// Compiles every kernel source to a cubin for the real architecture `arch` (`sm_90`):
/// (file name, cubin) per source. Stops at the first failure.
pub fn compile_cubin<O: AsRef<str>>(arch: &str, options: &[O]) -> Result<Vec<(String, Vec<u8>)>> {
    SOURCES
        .iter()
        .map(|(file, text)| {
            let c = compile_source(file, text, arch, Target::Cubin, options)?;
            Ok((file.to_string(), c.code))
        })
        .collect()
}

pub use super::entry_points::entry_points;

// ---- on-disk cache ------------------------------------------------------------------------

/// Where compiled modules are cached: `APPARATE_CACHE_DIR`, else `$XDG_CACHE_HOME/apparate`,
/// else `~/.cache/apparate`; `None` when none of these is set.
pub fn default_cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("APPARATE_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("apparate")))
        .or_else(|| var("HOME").map(|d| d.join(".cache").join("apparate")))
}

/// sha256 (hex) of everything that determines a compiled module: the NVRTC version, the
/// source file and text, every shared header, the target kind and the full option list (which
/// holds the architecture).
pub fn cache_key(
    nvrtc: (i32, i32),
    file: &str,
    text: &str,
    target: Target,
    options: &[String],
) -> String {
    let mut h = Sha256::new();
    let mut put = |b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    put(b"apparate nvrtc cache v1");
    put(format!("nvrtc {}.{}", nvrtc.0, nvrtc.1).as_bytes());
    put(file.as_bytes());
    put(text.as_bytes());
    for (name, body) in HEADERS {
        put(name.as_bytes());
        put(body.as_bytes());
    }
    put(target.extension().as_bytes());
    for o in options {
        put(o.as_bytes());
    }
    h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
}

fn cache_path(dir: &Path, file: &str, arch: &Arch, target: Target, key: &str) -> PathBuf {
    let stem = file.strip_suffix(".cu").unwrap_or(file);
    dir.join("nvrtc").join(format!(
        "{stem}-{}-{}.{}",
        arch.sm(),
        &key[..32],
        target.extension()
    ))
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a concurrent reader
/// never sees half a module. Failure is reported to the caller, who ignores it.
fn cache_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp-{}-{n}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The compiled module of one source: read from the cache directory when it is there (and
/// `refresh` is false), else compiled by NVRTC and written to the cache, where failing to
/// write is not an error. Returns the code and whether it came from the cache.
#[allow(clippy::too_many_arguments)]
fn cached_compile(
    file: &str,
    text: &str,
    arch: &Arch,
    target: Target,
    options: &[String],
    nvrtc: (i32, i32),
    cache_dir: Option<&Path>,
    refresh: bool,
) -> Result<(Vec<u8>, bool)> {
    let path = cache_dir.map(|d| {
        cache_path(
            d,
            file,
            arch,
            target,
            &cache_key(nvrtc, file, text, target, options),
        )
    });
    if !refresh && let Some(code) = path.as_deref().and_then(|p| std::fs::read(p).ok()) {
        return Ok((code, true));
    }
    let c = compile_with(file, text, target, options)?;
    if let Some(p) = &path {
        let _ = cache_write(p, &c.code);
    }
    Ok((c.code, false))
}

// ---- the device ---------------------------------------------------------------------------

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
    pub cache_dir: Option<PathBuf>,
    /// Whether to use the on-disk cache at all.
    pub use_cache: bool,
}

impl Default for CudaConfig {
    fn default() -> Self {
        CudaConfig {
            ordinal: 0,
            target: Target::Cubin,
            extra_options: Vec::new(),
            cache_dir: None,
            use_cache: true,
        }
    }
}

/// Device memory: a cudarc allocation (freed, stream-ordered, when dropped).
pub struct CudaBuf {
    slice: CudaSlice<u8>,
    ptr: u64,
    len: usize,
}

impl fmt::Debug for CudaBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaBuf {{ ptr: {:#x}, len: {} }}", self.ptr, self.len)
    }
}

struct Kernel {
    func: CudaFunction,
    /// Dynamic shared memory the function may use now (48 KiB minus its static shared memory
    /// until raised with `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`).
    max_dynamic_shared: AtomicU32,
}

/// A real GPU. Kernels run in order on one stream of the device's primary context.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: ProbeInfo,
    target: Target,
    kernels: HashMap<String, Kernel>,
    /// `CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`.
    max_shared_optin: u32,
    /// Sources that came from the on-disk cache.
    cached: usize,
    /// cuBLAS, created on first use (benchmarks only: the engine uses its own GEMM).
    blas: std::sync::OnceLock<std::result::Result<cudarc::cublas::CudaBlas, String>>,
    raise_lock: std::sync::Mutex<()>,
}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CudaDevice {{ {}, {:?}, {} kernels }}",
            self.info,
            self.target,
            self.kernels.len()
        )
    }
}

impl CudaDevice {
    /// Probes the machine, compiles (or takes from the cache) every kernel source for the
    /// device's architecture, and loads the modules.
    pub fn new(config: CudaConfig) -> Result<CudaDevice> {
        let info = probe_device(config.ordinal)?;
        guard("creating the CUDA device", || Self::create(config, info))
    }

    fn create(config: CudaConfig, info: ProbeInfo) -> Result<CudaDevice> {
        let arch = info.arch();
        if config.target == Target::Ptx {
            let (maj, min) = info.nvrtc_version;
            if info.driver_version < maj * 1000 + min * 10 {
                return Err(err(format!(
                    "driver too old for PTX from NVRTC {maj}.{min}: the driver supports CUDA {}; \
                     use a cubin (the default) or an older NVRTC",
                    version_string(info.driver_version)
                )));
            }
        }
        let ctx = CudaContext::new(config.ordinal).map_err(drv("creating the context"))?;
        // One stream, so ordering is the stream's; cudarc's per-buffer events are not needed.
        // SAFETY: every buffer and launch of this device uses `stream` only.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(drv("creating a stream"))?;
        let max_shared_optin = ctx
            .attribute(
                dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(drv("reading the shared memory limit"))? as u32;

        let options = nvrtc_options(&arch, config.target, &config.extra_options);
        let cache_dir = if config.use_cache {
            config.cache_dir.clone().or_else(default_cache_dir)
        } else {
            None
        };
        // Compile (or read) every source, in parallel: NVRTC is thread-safe.
        use rayon::prelude::*;
        let compile = |file: &str, text: &str, refresh: bool| {
            cached_compile(
                file,
                text,
                &arch,
                config.target,
                &options,
                info.nvrtc_version,
                cache_dir.as_deref(),
                refresh,
            )
        };
        let modules: Vec<(&str, &str, Vec<u8>, bool)> = SOURCES
            .par_iter()
            .map(|&(file, text)| {
                compile(file, text, false).map(|(code, hit)| (file, text, code, hit))
            })
            .collect::<Result<_>>()?;

        let mut kernels = HashMap::new();
        let mut cached = 0;
        for (file, text, code, hit) in modules {
            let loading = |e: String| err(format!("loading kernels/{file} for {arch}: {e}"));
            let module = match load_module(&ctx, config.target, code) {
                Ok(m) => {
                    cached += hit as usize;
                    m
                }
                // A damaged cache entry: compile afresh (which replaces it) and load that.
                Err(_) if hit => {
                    let (code, _) = compile(file, text, true)?;
                    load_module(&ctx, config.target, code).map_err(loading)?
                }
                Err(e) => return Err(loading(e)),
            };
            // Entry points found in the text; a few exist only under `APPARATE_EMU` (emulator
            // self-tests) and are simply absent from the module.
            for name in entry_points(text) {
                let func = match module.load_function(&name) {
                    Ok(f) => f,
                    Err(e) if e.0 == dsys::CUresult::CUDA_ERROR_NOT_FOUND => continue,
                    Err(e) => return Err(drv(format!("kernel `{name}` of kernels/{file}"))(e)),
                };
                let dynamic = func
                    .get_attribute(
                        dsys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    )
                    .map_err(drv(format!("kernel `{name}`")))?;
                kernels.insert(
                    name,
                    Kernel {
                        func,
                        max_dynamic_shared: AtomicU32::new(dynamic.max(0) as u32),
                    },
                );
            }
        }
        Ok(CudaDevice {
            ctx,
            stream,
            info,
            target: config.target,
            kernels,
            max_shared_optin,
            cached,
            blas: std::sync::OnceLock::new(),
            raise_lock: std::sync::Mutex::new(()),
        })
    }

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
        self.cached
    }

    /// True when the device has a kernel of this name.
    pub fn has_kernel(&self, name: &str) -> bool {
        self.kernels.contains_key(name)
    }
}

fn load_module(
    ctx: &Arc<CudaContext>,
    target: Target,
    code: Vec<u8>,
) -> std::result::Result<Arc<cudarc::driver::CudaModule>, String> {
    let image = match target {
        Target::Cubin => cudarc::nvrtc::Ptx::from_binary(code),
        Target::Ptx => {
            cudarc::nvrtc::Ptx::from_src(String::from_utf8(code).map_err(|_| "PTX is not UTF-8")?)
        }
    };
    ctx.load_module(image).map_err(describe)
}

impl CudaDevice {
    /// `Y = X W^T` with cuBLAS (`cublasGemmEx`, f32 accumulation) on the device's stream, with
    /// the same layouts as our `gemm_*` kernels: X [m, k], W [n, k], Y [m, n], row-major, all of
    /// `dtype`. The yardstick of the kernel benchmarks.
    #[allow(clippy::too_many_arguments)]
    pub fn cublas_gemm(
        &self,
        dtype: crate::tensor::DType,
        m: usize,
        n: usize,
        k: usize,
        x: &CudaBuf,
        w: &CudaBuf,
        y: &CudaBuf,
    ) -> Result<()> {
        use cudarc::cublas::sys as bsys;
        let size = dtype.size();
        if x.len < m * k * size || w.len < n * k * size || y.len < m * n * size {
            return Err(err(format!(
                "cublas_gemm: buffers too small for {m}x{n}x{k} {dtype}"
            )));
        }
        let dim =
            |v: usize| c_int::try_from(v).map_err(|_| err(format!("cublas_gemm: {v} too large")));
        let (mi, ni, ki) = (dim(m)?, dim(n)?, dim(k)?);
        guard("cublasGemmEx", || {
            let blas = self.blas.get_or_init(|| {
                // SAFETY: only asks the loader whether the library exists.
                if !unsafe { bsys::is_culib_present() } {
                    return Err("no cuBLAS library (libcublas.so) found".to_string());
                }
                cudarc::cublas::CudaBlas::new(self.stream.clone()).map_err(|e| format!("{e:?}"))
            });
            let blas = blas.as_ref().map_err(|e| err(e.clone()))?;
            let ty = match dtype {
                crate::tensor::DType::F32 => bsys::cudaDataType::CUDA_R_32F,
                crate::tensor::DType::F16 => bsys::cudaDataType::CUDA_R_16F,
                crate::tensor::DType::BF16 => bsys::cudaDataType::CUDA_R_16BF,
            };
            let (alpha, beta) = (1.0f32, 0.0f32);
            // Column-major view: Y^T [n, m] = W [n, k] (stored as W^T, k x n) transposed times
            // X^T (k x m).
            // SAFETY: sizes checked above; pointers are device allocations of this context.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *blas.handle(),
                    bsys::cublasOperation_t::CUBLAS_OP_T,
                    bsys::cublasOperation_t::CUBLAS_OP_N,
                    ni,
                    mi,
                    ki,
                    (&alpha as *const f32).cast(),
                    w.ptr as *const std::ffi::c_void,
                    ty,
                    ki,
                    x.ptr as *const std::ffi::c_void,
                    ty,
                    ki,
                    (&beta as *const f32).cast(),
                    y.ptr as *mut std::ffi::c_void,
                    ty,
                    ni,
                    bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| err(format!("cublasGemmEx: {e:?}")))
        })
    }
}

/// Page-locked host memory (cudarc's pinned slice, which carries the event of the last copy
/// into it).
pub struct CudaPinned {
    slice: cudarc::driver::PinnedHostSlice<u8>,
}

impl Device for CudaDevice {
    type Buf = CudaBuf;
    type Pinned = CudaPinned;

    fn alloc_pinned(&self, bytes: usize) -> Result<CudaPinned> {
        guard("cuMemHostAlloc", || {
            // Plain page-locked memory (flags 0): the host reads it, so not write-combined.
            // SAFETY: the bytes are only read after a copy into them has completed
            // (`read_pinned` waits for it); a zero-byte request gets one byte.
            let slice = unsafe { self.ctx.alloc_pinned_with_flags::<u8>(bytes.max(1), 0) }
                .map_err(drv(format!("pinned host allocation of {bytes} bytes")))?;
            Ok(CudaPinned { slice })
        })
    }

    fn download_async(&self, buf: &CudaBuf, dst: &mut CudaPinned) -> Result<()> {
        if dst.slice.len() < buf.slice.len() {
            return Err(err(format!(
                "async download of a {}-byte buffer into {} pinned bytes",
                buf.slice.len(),
                dst.slice.len()
            )));
        }
        guard("cuMemcpyDtoHAsync", || {
            // cudarc queues the copy on our stream and records the pinned slice's event after
            // it; nothing here waits.
            self.stream
                .memcpy_dtoh(&buf.slice, &mut dst.slice)
                .map_err(drv(format!("async download of {} bytes", buf.len)))
        })
    }

    fn read_pinned(&self, p: &CudaPinned) -> Result<Vec<u8>> {
        guard("cuEventSynchronize", || {
            // Waits for the event recorded after the last copy into it.
            p.slice
                .as_slice()
                .map(|s| s.to_vec())
                .map_err(drv("reading pinned memory"))
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
            // A zero-byte request still gets a real (1-byte) allocation, as with the emulator.
            // SAFETY: uninitialised device memory is what `alloc` promises.
            let slice = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }.map_err(|e| {
                if e.0 == dsys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                    err(format!("out of memory allocating {bytes} bytes"))
                } else {
                    err(format!("allocating {bytes} bytes: {}", describe(e)))
                }
            })?;
            let (ptr, _) = slice.device_ptr(&self.stream);
            Ok(CudaBuf {
                ptr,
                slice,
                len: bytes,
            })
        })
    }

    fn upload(&self, bytes: &[u8]) -> Result<CudaBuf> {
        let buf = self.alloc(bytes.len())?;
        if !bytes.is_empty() {
            guard("cuMemcpyHtoD", || {
                self.ctx
                    .bind_to_thread()
                    .map_err(drv("binding the context"))?;
                // SAFETY: the buffer holds bytes.len() bytes; a copy from pageable memory has
                // read `bytes` by the time it returns.
                unsafe {
                    cudarc::driver::result::memcpy_htod_async(
                        buf.ptr,
                        bytes,
                        self.stream.cu_stream(),
                    )
                }
                .map_err(drv(format!("upload of {} bytes", bytes.len())))
            })?;
        }
        Ok(buf)
    }

    fn download(&self, buf: &CudaBuf, out: &mut [u8]) -> Result<()> {
        if out.len() != buf.len {
            return Err(err(format!(
                "download of a {}-byte buffer into {} bytes",
                buf.len,
                out.len()
            )));
        }
        if out.is_empty() {
            return Ok(());
        }
        guard("cuMemcpyDtoH", || {
            self.ctx
                .bind_to_thread()
                .map_err(drv("binding the context"))?;
            // SAFETY: same length; the stream synchronisation below completes the copy
            // before `out` is used.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(out, buf.ptr, self.stream.cu_stream())
            }
            .map_err(drv(format!("download of {} bytes", buf.len)))?;
            self.stream
                .synchronize()
                .map_err(drv(format!("download of {} bytes", buf.len)))
        })
    }

    fn fill(&self, buf: &CudaBuf, byte: u8) -> Result<()> {
        guard("cuMemsetD8", || {
            self.ctx
                .bind_to_thread()
                .map_err(drv("binding the context"))?;
            // SAFETY: within the allocation, on the stream that owns it.
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    buf.ptr,
                    byte,
                    buf.len,
                    self.stream.cu_stream(),
                )
            }
            .map_err(drv(format!("fill of {} bytes", buf.len)))
        })
    }

    fn address(&self, buf: &CudaBuf) -> u64 {
        buf.ptr
    }

    fn len(&self, buf: &CudaBuf) -> usize {
        debug_assert!(buf.slice.len() >= buf.len);
        buf.len
    }

    unsafe fn launch(&self, kernel: &str, cfg: LaunchConfig, args: &[KernelArg]) -> Result<()> {
        check_launch(BACKEND, kernel, &cfg)?;
        let k = self
            .kernels
            .get(kernel)
            .ok_or_else(|| err(format!("no kernel named `{kernel}`")))?;
        guard(&format!("launch of `{kernel}`"), || {
            // Check and raise under one lock: two threads raising the same kernel's limit must
            // not leave it lower than what the atomic records.
            let _raise = self.raise_lock.lock().unwrap_or_else(|p| p.into_inner());
            if cfg.shared_bytes > k.max_dynamic_shared.load(Ordering::Relaxed) {
                if cfg.shared_bytes > self.max_shared_optin {
                    return Err(err(format!(
                        "launch of `{kernel}`: {} bytes of dynamic shared memory, this device \
                         allows at most {}",
                        cfg.shared_bytes, self.max_shared_optin
                    )));
                }
                k.func
                    .set_attribute(
                        dsys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        cfg.shared_bytes as i32,
                    )
                    .map_err(drv(format!(
                        "launch of `{kernel}`: raising its dynamic shared memory to {} bytes",
                        cfg.shared_bytes
                    )))?;
                k.max_dynamic_shared
                    .fetch_max(cfg.shared_bytes, Ordering::Relaxed);
            }
            // The launch gets a pointer to each argument's 8-byte slot.
            let values: Vec<u64> = args.iter().map(|a| a.slot()).collect();
            let mut builder = self.stream.launch_builder(&k.func);
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
            unsafe { builder.launch(lc) }
                .map_err(drv(format!("launch of `{kernel}` ({cfg:?})")))?;
            Ok(())
        })
    }

    fn synchronize(&self) -> Result<()> {
        guard("cuStreamSynchronize", || {
            self.stream
                .synchronize()
                .map_err(drv("waiting for the stream"))?;
            // Errors cudarc could only record (in drops, say).
            self.ctx.check_err().map_err(drv("an earlier operation"))
        })
    }

    type Event = cudarc::driver::CudaEvent;

    fn record_event(&self) -> Result<Self::Event> {
        guard("cuEventRecord", || {
            self.stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(drv("recording an event"))
        })
    }

    fn wait_event(&self, event: &Self::Event) -> Result<()> {
        guard("cuEventSynchronize", || {
            event.synchronize().map_err(drv("waiting for an event"))
        })
    }

    fn elapsed_ms(&self, start: &Self::Event, end: &Self::Event) -> Result<f64> {
        guard("cuEventElapsedTime", || {
            start
                .elapsed_ms(end)
                .map(f64::from)
                .map_err(drv("timing two events"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn driver_present() -> bool {
        unsafe { dsys::is_culib_present() }
    }

    fn nvrtc_present() -> bool {
        unsafe { nsys::is_culib_present() }
    }

    #[test]
    fn probe_never_panics_and_says_why() {
        match probe() {
            Ok(info) => println!("cuda probe: {info}"),
            Err(e) => {
                let msg = e.to_string();
                println!("cuda probe: {msg}");
                assert!(msg.starts_with("backend `cuda`: "), "{msg}");
                if !driver_present() {
                    assert!(msg.contains("no CUDA driver library"), "{msg}");
                }
            }
        }
    }

    #[test]
    fn device_creation_without_a_gpu_is_an_error() {
        if driver_present() {
            println!("skipped: this machine has a CUDA driver");
            return;
        }
        let e = CudaDevice::new(CudaConfig::default()).unwrap_err();
        assert!(e.to_string().contains("no CUDA driver library"), "{e}");
    }

    /// Runs only where [`probe`] succeeds (a GPU, its driver and NVRTC); prints why otherwise.
    #[test]
    fn kernels_run_on_a_gpu_when_present() {
        if let Err(e) = probe() {
            println!("skipped (no usable GPU): {e}");
            return;
        }
        let dir = std::env::temp_dir().join(format!("apparate-gpu-{}", std::process::id()));
        let config = CudaConfig {
            cache_dir: Some(dir.clone()),
            ..CudaConfig::default()
        };
        let dev = CudaDevice::new(config.clone()).unwrap();
        println!("{dev:?}");
        assert_eq!(dev.cached_sources(), 0);
        let x: Vec<f32> = (0..1000).map(|i| i as f32 * 0.37 - 100.0).collect();
        let xb = dev.upload(bytemuck::cast_slice(&x)).unwrap();
        let h = dev.alloc(x.len() * 2).unwrap();
        let y = dev.alloc(x.len() * 4).unwrap();
        dev.fill(&y, 0xff).unwrap();
        let n = KernelArg::U32(x.len() as u32);
        let cfg = LaunchConfig::linear(4, 128, 0);
        let (xa, ha, ya) = (dev.address(&xb), dev.address(&h), dev.address(&y));
        // SAFETY (every launch below): cast kernels (src, dst, n) on buffers of n elements;
        // the failing launches are refused before reaching the GPU.
        let launch = |k: &str, cfg: LaunchConfig, a: &[KernelArg]| unsafe { dev.launch(k, cfg, a) };
        launch(
            "cast_f32_f16",
            cfg,
            &[KernelArg::Ptr(xa), KernelArg::Ptr(ha), n],
        )
        .unwrap();
        launch(
            "cast_f16_f32",
            cfg,
            &[KernelArg::Ptr(ha), KernelArg::Ptr(ya), n],
        )
        .unwrap();
        dev.synchronize().unwrap();
        let mut out = vec![0u8; x.len() * 4];
        dev.download(&y, &mut out).unwrap();
        let out: &[f32] = bytemuck::cast_slice(&out);
        for (a, b) in x.iter().zip(out) {
            assert_eq!(half::f16::from_f32(*a).to_f32(), *b);
        }
        // Errors, not panics.
        assert!(launch("no_such_kernel", cfg, &[]).is_err());
        let huge = LaunchConfig::linear(1, 32, dev.max_shared_optin + 1);
        assert!(launch("cast_f32_f16", huge, &[]).is_err());
        assert!(dev.download(&y, &mut [0u8; 3]).is_err());
        assert!(dev.alloc(1 << 50).is_err());
        assert_eq!(dev.len(&dev.alloc(0).unwrap()), 0);
        drop(dev);
        // A second device finds every module in the cache.
        let dev = CudaDevice::new(config).unwrap();
        assert_eq!(dev.cached_sources(), SOURCES.len());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn archs_parse() {
        assert_eq!(Arch::parse("sm_90").unwrap(), Arch::new(9, 0));
        assert_eq!(Arch::parse("compute_80").unwrap(), Arch::new(8, 0));
        assert_eq!(Arch::parse("86").unwrap(), Arch::new(8, 6));
        assert_eq!(Arch::parse("12.0").unwrap(), Arch::new(12, 0));
        assert_eq!(Arch::parse("sm_100").unwrap(), Arch::new(10, 0));
        let a = Arch::parse("sm_90a").unwrap();
        assert_eq!(
            (a.sm(), a.compute()),
            ("sm_90a".into(), "compute_90a".into())
        );
        for bad in ["", "sm_", "sm_9", "sm_90x", "gfx90a", "9.x"] {
            assert!(Arch::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn options_and_cache_keys() {
        let arch = Arch::new(9, 0);
        let ptx = nvrtc_options::<&str>(&arch, Target::Ptx, &[]);
        assert_eq!(ptx[0], "--gpu-architecture=compute_90");
        let cubin = nvrtc_options(&arch, Target::Cubin, &["-lineinfo"]);
        assert_eq!(cubin[0], "--gpu-architecture=sm_90");
        assert_eq!(cubin.last().unwrap(), "-lineinfo");

        let k = cache_key((13, 5), "a.cu", "x", Target::Cubin, &cubin);
        assert_eq!(k.len(), 64);
        assert_eq!(k, cache_key((13, 5), "a.cu", "x", Target::Cubin, &cubin));
        for other in [
            cache_key((13, 0), "a.cu", "x", Target::Cubin, &cubin),
            cache_key((13, 5), "b.cu", "x", Target::Cubin, &cubin),
            cache_key((13, 5), "a.cu", "y", Target::Cubin, &cubin),
            cache_key((13, 5), "a.cu", "x", Target::Ptx, &cubin),
            cache_key((13, 5), "a.cu", "x", Target::Cubin, &ptx),
        ] {
            assert_ne!(k, other);
        }
        let p = cache_path(Path::new("/c"), "norm.cu", &arch, Target::Cubin, &k);
        assert_eq!(
            p,
            Path::new("/c/nvrtc").join(format!("norm-sm_90-{}.cubin", &k[..32]))
        );
    }

    #[test]
    fn cache_writes_are_atomic_and_failures_are_reported() {
        let dir = std::env::temp_dir().join(format!("apparate-cuda-cache-{}", std::process::id()));
        let p = dir.join("nvrtc").join("x.cubin");
        cache_write(&p, b"abc").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"abc");
        cache_write(&p, b"defg").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"defg");
        // A path under a regular file cannot be created: an error, not a panic.
        assert!(cache_write(&p.join("below-a-file"), b"x").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_kernel_has_a_source() {
        let mut found: Vec<String> = SOURCES.iter().flat_map(|(_, t)| entry_points(t)).collect();
        let mut listed: Vec<String> = super::super::kernel_sources::KERNELS
            .iter()
            .map(|s| s.to_string())
            .collect();
        found.sort();
        listed.sort();
        assert_eq!(found, listed);
    }

    #[test]
    fn nvrtc_compiles_every_source_when_present() {
        if !nvrtc_present() {
            println!("skipped: no NVRTC library on the library path (tools/fetch-cuda-tools.sh)");
            return;
        }
        println!("NVRTC {:?}", nvrtc_version().unwrap());
        let ptx = compile_ptx::<&str>("sm_90", &[]).unwrap();
        assert_eq!(ptx.len(), SOURCES.len());
        for ((file, text), (_, code)) in SOURCES.iter().zip(&ptx) {
            assert!(code.contains(".target sm_90"), "{file}");
            // Every PTX entry is one the text declares (some exist only for the emulator).
            let declared = entry_points(text);
            let entries: Vec<&str> = code
                .lines()
                .filter_map(|l| l.split(".entry ").nth(1))
                .map(|l| l.trim_end_matches('(').trim())
                .collect();
            assert!(!entries.is_empty() || declared.is_empty(), "{file}");
            for e in entries {
                assert!(declared.iter().any(|d| d == e), "{file}: {e}");
            }
        }
        let cubins = compile_cubin::<&str>("sm_90", &[]).unwrap();
        for (file, c) in &cubins {
            assert_eq!(&c[..4], b"\x7fELF", "{file}");
        }
    }

    #[test]
    fn nvrtc_errors_name_the_file_and_carry_the_log() {
        if !nvrtc_present() {
            println!("skipped: no NVRTC library on the library path (tools/fetch-cuda-tools.sh)");
            return;
        }
        let e = compile_source::<&str>(
            "broken.cu",
            "extern \"C\" __global__ void k() { undeclared_thing(); }",
            "sm_90",
            Target::Ptx,
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("kernels/broken.cu"), "{e}");
        assert!(e.contains("undeclared_thing"), "{e}");
        let e = compile_source::<&str>("x.cu", "", "compute_90", Target::Cubin, &[]);
        assert!(e.unwrap_err().to_string().contains("real architecture"));
    }

    #[test]
    fn compiled_modules_are_cached_on_disk() {
        if !nvrtc_present() {
            println!("skipped: no NVRTC library on the library path (tools/fetch-cuda-tools.sh)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("apparate-nvrtc-{}", std::process::id()));
        let (file, text) = (
            "t.cu",
            "extern \"C\" __global__ void k(float* x) { x[0] = 1.0f; }",
        );
        let arch = Arch::new(9, 0);
        let options = nvrtc_options::<&str>(&arch, Target::Cubin, &[]);
        let nvrtc = nvrtc_version().unwrap();
        let run = |refresh| {
            cached_compile(
                file,
                text,
                &arch,
                Target::Cubin,
                &options,
                nvrtc,
                Some(&dir),
                refresh,
            )
            .unwrap()
        };
        let (fresh, hit) = run(false);
        assert!(!hit);
        let (again, hit) = run(false);
        assert!(hit);
        assert_eq!(fresh, again);
        // A damaged entry is returned as is (loading it fails); a refresh replaces it.
        let key = cache_key(nvrtc, file, text, Target::Cubin, &options);
        let path = cache_path(&dir, file, &arch, Target::Cubin, &key);
        std::fs::write(&path, b"junk").unwrap();
        assert_eq!(run(false), (b"junk".to_vec(), true));
        assert_eq!(run(true), (fresh.clone(), false));
        assert_eq!(std::fs::read(&path).unwrap(), fresh);
        // No cache directory: compiled every time.
        let (code, hit) = cached_compile(
            file,
            text,
            &arch,
            Target::Cubin,
            &options,
            nvrtc,
            None,
            false,
        )
        .unwrap();
        assert!(!hit && code == fresh);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Whether this machine can run the `cuda` backend, and what it has: the driver library and
//! its version, a device and its architecture, NVRTC and the architectures it compiles for.
//! Never panics: each missing piece is an error that names it.

use std::ffi::{c_char, c_int};
use std::fmt;

use cudarc::driver::sys as dsys;

use super::nvrtc::{Arch, nvrtc_supported_archs, nvrtc_version};
use super::{BACKEND, MIN_DRIVER_VERSION, check, guard, version_string};
use crate::error::{Error, Result};

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
    /// Streaming multiprocessors (`CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT`): how many GEMM
    /// tiles fill this GPU (132 on an H100 SXM/H200, 114 on an H100 PCIe, 108 on an A100).
    pub multiprocessors: usize,
}

/// The architecture the kernels are compiled for on a device of compute capability `cc`: that
/// capability, with the `a` suffix on 9.0 (see [`ProbeInfo::arch`]). What a module cache filled
/// without the GPU ([`super::prebuild`]) must be built for to be used by it.
pub fn device_arch(cc: (u32, u32)) -> Arch {
    let mut arch = Arch::new(cc.0, cc.1);
    if wgmma_capable(cc) {
        arch.suffix = "a".to_string();
    }
    arch
}

/// Whether a device of compute capability `cc` runs Hopper's `wgmma`: 9.0 only (sm_90a code
/// does not run on later architectures).
fn wgmma_capable(cc: (u32, u32)) -> bool {
    cc == (9, 0)
}

impl ProbeInfo {
    /// The architecture the kernels are compiled for: the device's compute capability, with
    /// the `a` suffix on 9.0 (sm_90a: Hopper's warpgroup instructions, `wgmma`, which the
    /// Hopper GEMM uses; such code runs on 9.0 devices only, which this device is).
    pub fn arch(&self) -> Arch {
        device_arch(self.compute_capability)
    }

    /// Whether the device runs Hopper's `wgmma` (compute capability 9.0, the kernels then
    /// compiled for sm_90a): the one place that decides both.
    pub fn has_wgmma(&self) -> bool {
        wgmma_capable(self.compute_capability)
    }
}

impl fmt::Display for ProbeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "device {} of {}: {} ({}, {} SMs, {:.1} GiB), driver CUDA {}, NVRTC {}.{}",
            self.ordinal,
            self.device_count,
            self.device_name,
            self.arch(),
            self.multiprocessors,
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
            return Err(unusable(
                "no CUDA driver library (libcuda.so) found: this machine has no NVIDIA driver \
                 (or no GPU)",
            ));
        }
        let driver_version = driver_version()?;
        if driver_version < MIN_DRIVER_VERSION {
            return Err(unusable(format!(
                "driver too old: it supports CUDA {}, at least CUDA {} is needed",
                version_string(driver_version),
                version_string(MIN_DRIVER_VERSION)
            )));
        }
        // SAFETY: plain driver call.
        match unsafe { dsys::cuInit(0) } {
            dsys::CUresult::CUDA_SUCCESS => {}
            dsys::CUresult::CUDA_ERROR_NO_DEVICE => {
                return Err(unusable(
                    "no CUDA device: the driver is installed but sees no GPU",
                ));
            }
            dsys::CUresult::CUDA_ERROR_STUB_LIBRARY => return Err(stub_library()),
            dsys::CUresult::CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE => {
                return Err(unusable(format!(
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
            return Err(unusable("no CUDA device: the driver sees no GPU"));
        }
        if ordinal >= count as usize {
            return Err(unusable(format!(
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
        let multiprocessors =
            attr(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let mut total_memory = 0usize;
        // SAFETY: out-pointer to a local.
        check("cuDeviceTotalMem", unsafe {
            dsys::cuDeviceTotalMem_v2(&mut total_memory, dev)
        })?;

        let nvrtc_version = nvrtc_version()?;
        if driver_version / 1000 < nvrtc_version.0 {
            return Err(unusable(format!(
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
            multiprocessors: multiprocessors.max(1) as usize,
        };
        // The tensor-core GEMM (mma.m16n8k16 with bf16) and the bf16 conversions need sm_80.
        if info.compute_capability.0 < 8 {
            return Err(unusable(format!(
                "{} is {}: the kernels need compute capability 8.0 (Ampere) or newer",
                info.device_name,
                info.arch()
            )));
        }
        let archs = nvrtc_supported_archs()?;
        if !archs.contains(&info.arch().number()) {
            return Err(unusable(format!(
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

/// What is missing or too old for the backend to run here.
fn unusable(reason: impl std::fmt::Display) -> Error {
    Error::device(BACKEND, "probing this machine", reason)
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
    unusable(
        "no CUDA driver: the libcuda.so found is the CUDA toolkit's stub library, not a driver",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn driver_present() -> bool {
        // SAFETY: only tries to open the library.
        unsafe { dsys::is_culib_present() }
    }

    #[test]
    fn hopper_compiles_for_sm_90a_and_others_for_their_own_arch() {
        let info = |cc| ProbeInfo {
            driver_version: 13000,
            nvrtc_version: (13, 0),
            device_count: 1,
            ordinal: 0,
            device_name: "test".into(),
            compute_capability: cc,
            total_memory: 0,
            multiprocessors: 132,
        };
        assert_eq!(info((9, 0)).arch().sm(), "sm_90a");
        assert_eq!(info((9, 0)).arch().compute(), "compute_90a");
        assert!(info((9, 0)).has_wgmma() && !info((8, 0)).has_wgmma());
        assert_eq!(info((8, 0)).arch().sm(), "sm_80");
        assert_eq!(info((8, 9)).arch().sm(), "sm_89");
        assert_eq!(info((12, 0)).arch().sm(), "sm_120");
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
}

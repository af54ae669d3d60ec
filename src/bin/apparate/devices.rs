//! `apparate devices`: which backends can run here, and why not.

use apparate::Result;
use apparate::backend::emu::{EmuConfig, EmuDevice};
use apparate::backend::{CpuBackend, CpuConfig};

use super::emit;

pub fn devices() -> Result<()> {
    let mut out = String::new();
    let cpu = CpuBackend::new(CpuConfig::default())?;
    outln!(out, "cpu   available: {} threads", cpu.threads());
    let emu = EmuDevice::new(EmuConfig::default())?;
    outln!(
        out,
        "emu   available: {} kernels compiled for the host (slow; for testing)",
        apparate::backend::kernel_sources::KERNELS
            .iter()
            .filter(|k| emu.has_kernel(k))
            .count()
    );
    match apparate::backend::cuda::probe() {
        Ok(p) => outln!(
            out,
            "cuda  available: {} (sm_{}{}; kernels compiled for {}), driver {}.{}, NVRTC {}.{}",
            p.device_name,
            p.compute_capability.0,
            p.compute_capability.1,
            p.arch().sm(),
            p.driver_version / 1000,
            (p.driver_version % 1000) / 10,
            p.nvrtc_version.0,
            p.nvrtc_version.1
        ),
        Err(e) => outln!(out, "cuda  unavailable: {e}"),
    }
    emit(&out)
}

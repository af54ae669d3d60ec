//! `apparate devices`: which backends can run here, and why not.

use apparate::Result;
use apparate::backend::cuda::{CudaConfig, CudaDevice, default_cache_dir};
use apparate::backend::emu::{EmuConfig, EmuDevice};
use apparate::backend::{CpuBackend, CpuConfig};
use clap::Args;

use super::emit;

#[derive(Args)]
pub struct DevicesArgs {
    /// Also make the CUDA device: compile every kernel source for this GPU with NVRTC (in
    /// parallel) or read it from the on-disk cache (`APPARATE_CACHE_DIR`, else
    /// `~/.cache/apparate`), and report the time per source. Run once after installing or
    /// upgrading, so that the first `serve` or `classify` on the GPU does not wait for NVRTC.
    #[arg(long)]
    pub compile: bool,
}

pub fn devices(args: &DevicesArgs) -> Result<()> {
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
    if args.compile {
        // What is above is printed first: a compile takes a while.
        emit(&std::mem::take(&mut out))?;
        let t0 = std::time::Instant::now();
        let config = CudaConfig::default();
        let skipped = config.skip_sources.clone();
        let dev = CudaDevice::new(config)?;
        compile_report(&mut out, &dev, t0.elapsed().as_secs_f64());
        if !skipped.is_empty() {
            outln!(
                out,
                "      left out (APPARATE_CUDA_SKIP_SOURCES): {}",
                skipped.join(", ")
            );
        }
    }
    emit(&out)
}

/// The kernel build of `dev`: sources, cache hits, wall time, then each source slowest first.
fn compile_report(out: &mut String, dev: &CudaDevice, wall_s: f64) {
    let builds = dev.source_builds();
    let cache = match default_cache_dir() {
        Some(d) => format!("cache {}", d.display()),
        None => "no cache directory (APPARATE_CACHE_DIR, XDG_CACHE_HOME and HOME unset): \
                 compiled at every start"
            .into(),
    };
    outln!(
        out,
        "cuda  kernels: {} sources for {} in {wall_s:.1} s, {} compiled, {} from the cache; {cache}",
        builds.len(),
        dev.info().arch().sm(),
        builds.iter().filter(|b| !b.cached).count(),
        dev.cached_sources(),
    );
    let mut by_time: Vec<_> = builds.iter().collect();
    by_time.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    for b in by_time {
        let how = if b.cached { "cached" } else { "compiled" };
        outln!(out, "      {:<22} {:>7.2} s  {how}", b.file, b.seconds);
    }
}

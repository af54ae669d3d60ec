//! `apparate devices`: which backends can run here, and why not.

use apparate::Result;
use apparate::backend::cuda::{
    Arch, CudaConfig, CudaDevice, SourceBuild, default_cache_dir, device_arch, nvrtc_version,
    prebuild,
};
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
    /// With --compile: build for this GPU architecture instead of the GPU here, which need not
    /// exist (NVRTC only, no driver): a compute capability (`9.0`: compiled as a device of it
    /// would, sm_90a) or an architecture (`sm_90a`, `sm_80`); repeatable (`--arch 8.0 --arch
    /// 9.0` for an image that runs on both). Fills the cache for a machine with that GPU and
    /// this NVRTC major.minor release, e.g. when building a container image.
    #[arg(long, requires = "compile", value_name = "ARCH")]
    pub arch: Vec<String>,
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
        if args.arch.is_empty() {
            let dev = CudaDevice::new(config)?;
            compile_report(
                &mut out,
                &dev.info().arch(),
                dev.source_builds(),
                t0.elapsed().as_secs_f64(),
            );
        } else {
            // Every name is checked before the first (long) compile.
            let archs = args
                .arch
                .iter()
                .map(|a| target_arch(a))
                .collect::<Result<Vec<_>>>()?;
            let (maj, min) = nvrtc_version()?;
            for arch in archs {
                let t0 = std::time::Instant::now();
                let (dir, builds) = prebuild(&config, &arch)?;
                compile_report(&mut out, &arch, &builds, t0.elapsed().as_secs_f64());
                outln!(
                    out,
                    "      for a GPU whose `apparate devices` line says \"kernels compiled for {}\" \
                     and NVRTC {maj}.{min}, with APPARATE_CACHE_DIR={} (or this folder copied \
                     to its cache directory)",
                    arch.sm(),
                    dir.display()
                );
                let read = device_arch((arch.major, arch.minor));
                if read != arch {
                    outln!(
                        out,
                        "      note: a GPU of compute capability {}.{} compiles for {} and will not \
                         read these {} modules (`--arch {}.{}` builds what it reads)",
                        arch.major,
                        arch.minor,
                        read.sm(),
                        arch.sm(),
                        arch.major,
                        arch.minor
                    );
                }
                // Each architecture's report as it finishes.
                emit(&std::mem::take(&mut out))?;
            }
        }
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

/// `--arch`: a compute capability (`9.0`) becomes the architecture a device of it compiles
/// for (sm_90a), an architecture name is taken as it is.
fn target_arch(s: &str) -> Result<Arch> {
    let arch = Arch::parse(s)?;
    Ok(if s.contains('.') {
        device_arch((arch.major, arch.minor))
    } else {
        arch
    })
}

/// A kernel build for `arch`: sources, cache hits, wall time, then each source slowest first.
fn compile_report(out: &mut String, arch: &Arch, builds: &[SourceBuild], wall_s: f64) {
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
        arch.sm(),
        builds.iter().filter(|b| !b.cached).count(),
        builds.iter().filter(|b| b.cached).count(),
    );
    let mut by_time: Vec<_> = builds.iter().collect();
    by_time.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    for b in by_time {
        let how = if b.cached { "cached" } else { "compiled" };
        outln!(out, "      {:<22} {:>7.2} s  {how}", b.file, b.seconds);
    }
}

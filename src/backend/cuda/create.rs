//! Making a [`CudaDevice`]: the context and its one stream, the memory pool's release
//! threshold, the pinned ring, and every kernel source compiled (or read from the cache) for
//! the device's architecture and loaded.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};

use cudarc::driver::CudaContext;
use cudarc::driver::sys as dsys;

use super::super::kernel_sources::SOURCES;
use super::cache::{cached_compile, module_path};
use super::nvrtc::{Arch, Target, nvrtc_options, nvrtc_supported_archs, nvrtc_version};
use super::pinned::{PinnedBlock, RING_BLOCK_BYTES, RING_BLOCKS, Ring};
use super::probe::{ProbeInfo, probe_device};
use super::{
    BACKEND, CudaConfig, CudaDevice, Deferred, Kernel, Owner, SourceBuild, default_cache_dir,
    describe, drv, entry_points, guard, version_string,
};
use crate::error::{Error, Result};

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
                return Err(Error::device(
                    BACKEND,
                    "creating the device",
                    format!(
                        "driver too old for PTX from NVRTC {maj}.{min}: the driver supports CUDA \
                         {}; use a cubin (the default) or an older NVRTC",
                        version_string(info.driver_version)
                    ),
                ));
            }
        }
        let ctx = CudaContext::new(config.ordinal).map_err(drv("creating the context"))?;
        // One stream, so ordering is the stream's; cudarc's per-buffer events are not needed.
        // What turning them off changes in cudarc is listed in this module's parent's docs.
        // SAFETY: every buffer and launch of this device uses `stream` only.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(drv("creating a stream"))?;
        let async_alloc = ctx.has_async_alloc();
        if async_alloc {
            keep_freed_memory(&ctx)?;
        }
        let max_shared_optin = ctx
            .attribute(
                dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(drv("reading the shared memory limit"))? as u32;
        let deferred = Arc::new(Deferred::default());
        let ring = Ring::new(RING_BLOCKS, RING_BLOCK_BYTES, |size| {
            PinnedBlock::new(&ctx, &deferred, size)
        })?;

        let builder = Builder::new(&config, arch.clone(), info.nvrtc_version);
        let sources = sources_to_build(&config.skip_sources)?;
        let modules = builder.build_all(&sources)?;

        let mut kernels = HashMap::new();
        let mut builds = Vec::with_capacity(modules.len());
        for Built {
            file,
            text,
            code,
            cached: hit,
            seconds,
        } in modules
        {
            let loading = |e: String| {
                Error::kernel(
                    BACKEND,
                    format!("kernels/{file}"),
                    format!("loading for {arch}: {e}"),
                )
            };
            let module = match load_module(&ctx, config.target, code) {
                Ok(m) => {
                    builds.push(SourceBuild {
                        file,
                        seconds,
                        cached: hit,
                    });
                    m
                }
                // A damaged cache entry: compile afresh (which replaces it) and load that.
                Err(_) if hit => {
                    let t0 = std::time::Instant::now();
                    let (code, _) = builder.build(file, text, true)?;
                    builds.push(SourceBuild {
                        file,
                        seconds: seconds + t0.elapsed().as_secs_f64(),
                        cached: false,
                    });
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
            owner: Arc::new(Owner {
                ctx,
                stream,
                async_alloc,
                deferred,
                capture: std::sync::RwLock::new(()),
                parked: Mutex::new(Vec::new()),
            }),
            info,
            target: config.target,
            kernels,
            max_shared_optin,
            builds,
            ring: Arc::new(ring),
            blas: std::sync::OnceLock::new(),
            raise_lock: Mutex::new(()),
        })
    }
}

/// One kernel source's module as a build got it.
struct Built {
    file: &'static str,
    text: &'static str,
    code: Vec<u8>,
    /// Read from the on-disk cache rather than compiled.
    cached: bool,
    seconds: f64,
}

/// Compiles kernel sources for one architecture with the NVRTC loaded here, through the module
/// cache: what a device does when it is made, and what [`prebuild`] does without one.
struct Builder {
    arch: Arch,
    target: Target,
    options: Vec<String>,
    nvrtc: (i32, i32),
    cache_dir: Option<PathBuf>,
}

impl Builder {
    fn new(config: &CudaConfig, arch: Arch, nvrtc: (i32, i32)) -> Builder {
        Builder {
            options: nvrtc_options(&arch, config.target, &config.extra_options),
            target: config.target,
            arch,
            nvrtc,
            cache_dir: if config.use_cache {
                config.cache_dir.clone().or_else(default_cache_dir)
            } else {
                None
            },
        }
    }

    /// One source: from the cache (unless `refresh`) or compiled, and whether it was cached.
    fn build(&self, file: &str, text: &str, refresh: bool) -> Result<(Vec<u8>, bool)> {
        let path = self.module_path(file, text);
        cached_compile(
            file,
            text,
            self.target,
            &self.options,
            path.as_deref(),
            refresh,
        )
    }

    /// Where the module of `file` lives in the cache, when there is a cache directory.
    fn module_path(&self, file: &str, text: &str) -> Option<PathBuf> {
        self.cache_dir.as_deref().map(|d| {
            module_path(
                d,
                file,
                text,
                &self.arch,
                self.target,
                &self.options,
                self.nvrtc,
            )
        })
    }

    /// Every source in `sources`, in parallel (NVRTC is thread-safe), in their order.
    fn build_all(&self, sources: &[(&'static str, &'static str)]) -> Result<Vec<Built>> {
        use rayon::prelude::*;
        sources
            .par_iter()
            .map(|&(file, text)| {
                let t0 = std::time::Instant::now();
                self.build(file, text, false).map(|(code, cached)| Built {
                    file,
                    text,
                    code,
                    cached,
                    seconds: t0.elapsed().as_secs_f64(),
                })
            })
            .collect()
    }
}

/// Fills the module cache for a GPU that is not here: compiles every kernel source (but those
/// in [`CudaConfig::skip_sources`]) for `arch` with the NVRTC loaded on this machine into the
/// cache directory ([`CudaConfig::cache_dir`], else [`default_cache_dir`]), and returns it with
/// each source's build. A device made later with that directory finds its modules there, so it
/// starts without NVRTC's wait, when it compiles for the same architecture (what
/// `apparate devices` prints: sm_90a on compute capability 9.0) with the same NVRTC major.minor
/// release and options. For container images and build machines without a GPU. A cache
/// directory that cannot be written, or a module that is not there after its compile, is an
/// error.
pub fn prebuild(config: &CudaConfig, arch: &Arch) -> Result<(PathBuf, Vec<SourceBuild>)> {
    let what = "filling the module cache";
    let dir = if config.use_cache {
        config.cache_dir.clone().or_else(default_cache_dir)
    } else {
        None
    };
    let Some(dir) = dir else {
        return Err(Error::device(
            BACKEND,
            what,
            "no cache directory (the config turns the cache off, or APPARATE_CACHE_DIR, \
             XDG_CACHE_HOME and HOME are all unset): set APPARATE_CACHE_DIR",
        ));
    };
    // A device ignores a cache it cannot write to; filling one is all this is for, so a
    // folder that takes no file is an error, found before the compiles.
    let unwritable = |e: std::io::Error| {
        Error::device(
            BACKEND,
            what,
            format!("cannot write to the cache directory {}: {e}", dir.display()),
        )
    };
    let probe = dir
        .join("nvrtc")
        .join(format!(".write-test-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("nvrtc")).map_err(unwritable)?;
    std::fs::write(&probe, b"").map_err(unwritable)?;
    let _ = std::fs::remove_file(&probe);
    let nvrtc = nvrtc_version()?;
    if !nvrtc_supported_archs()?.contains(&arch.number()) {
        return Err(Error::device(
            BACKEND,
            what,
            format!("NVRTC {}.{} cannot compile for {arch}", nvrtc.0, nvrtc.1),
        ));
    }
    let config = CudaConfig {
        cache_dir: Some(dir.clone()),
        use_cache: true,
        ..config.clone()
    };
    let builder = Builder::new(&config, arch.clone(), nvrtc);
    let sources = sources_to_build(&config.skip_sources)?;
    let built = builder.build_all(&sources)?;
    // A module that compiled but was not written (a full disk) would leave the cache short.
    for (file, text) in &sources {
        if !builder.module_path(file, text).is_some_and(|p| p.is_file()) {
            return Err(Error::device(
                BACKEND,
                what,
                format!(
                    "kernels/{file} compiled but its module is not in {} (disk full?)",
                    dir.display()
                ),
            ));
        }
    }
    Ok((
        dir,
        built
            .into_iter()
            .map(|b| SourceBuild {
                file: b.file,
                seconds: b.seconds,
                cached: b.cached,
            })
            .collect(),
    ))
}

/// The kernel sources a device builds: all but those named in `skip` (file names in `kernels/`,
/// [`CudaConfig::skip_sources`]); a name that is no source is an error that lists them.
fn sources_to_build(skip: &[String]) -> Result<Vec<(&'static str, &'static str)>> {
    if let Some(bad) = skip.iter().find(|s| !SOURCES.iter().any(|(f, _)| f == s)) {
        let known: Vec<&str> = SOURCES.iter().map(|(f, _)| *f).collect();
        return Err(Error::device(
            BACKEND,
            "creating the device",
            format!(
                "`{bad}` in the sources to skip (APPARATE_CUDA_SKIP_SOURCES) is not a kernel \
                 source; they are: {}",
                known.join(", ")
            ),
        ));
    }
    Ok(SOURCES
        .iter()
        .copied()
        .filter(|(f, _)| !skip.iter().any(|s| s == f))
        .collect())
}

/// Raises the release threshold of the pool that stream-ordered allocations come from (the
/// device's current pool, its default one unless someone changed it) to "never": by default
/// the pool hands freed memory back to the driver at every synchronisation, so each batch
/// would pay for fresh `cuMemAllocAsync` mappings. The memory stays with the process until it
/// exits (or trims the pool), which is what an inference server wants.
fn keep_freed_memory(ctx: &CudaContext) -> Result<()> {
    let what = "raising the memory pool's release threshold";
    // SAFETY: the context's own device.
    let pool = unsafe { cudarc::driver::result::device::get_mem_pool(ctx.cu_device()) }
        .map_err(drv(what))?;
    let mut threshold: u64 = u64::MAX;
    // SAFETY: the attribute takes a cuuint64_t.
    unsafe {
        cudarc::driver::result::mem_pool::set_attribute(
            pool,
            dsys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .map_err(drv(what))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_sources_are_left_out_and_unknown_ones_refused() {
        assert_eq!(sources_to_build(&[]).unwrap().len(), SOURCES.len());
        let skip = ["gemm_wgmma.cu".to_string(), "gemm_wgmma_tma.cu".to_string()];
        let built = sources_to_build(&skip).unwrap();
        assert_eq!(built.len(), SOURCES.len() - 2);
        assert!(built.iter().all(|(f, _)| !skip.iter().any(|s| s == f)));
        assert!(built.iter().any(|(f, _)| *f == "gemm.cu"));
        let e = sources_to_build(&["gemm.cuh".to_string()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`gemm.cuh`") && e.contains("gemm_wgmma.cu"),
            "{e}"
        );
    }

    /// Without a cache directory there is nothing to fill: an error that says what to set
    /// (checked before NVRTC is needed, so it holds on any machine).
    #[test]
    fn prebuild_without_a_cache_directory_says_what_to_set() {
        let config = CudaConfig {
            use_cache: false,
            ..CudaConfig::default()
        };
        let e = prebuild(&config, &Arch::new(8, 0)).unwrap_err().to_string();
        assert!(e.contains("APPARATE_CACHE_DIR"), "{e}");
    }

    /// A cache directory that cannot hold files (here: a path below a regular file) is an
    /// error that names it, before NVRTC is needed.
    #[test]
    fn prebuild_into_an_unwritable_directory_says_so() {
        let file = std::env::temp_dir().join(format!("apparate-not-a-dir-{}", std::process::id()));
        std::fs::write(&file, b"x").unwrap();
        let config = CudaConfig {
            cache_dir: Some(file.join("cache")),
            ..CudaConfig::default()
        };
        let e = prebuild(&config, &Arch::new(8, 0)).unwrap_err().to_string();
        std::fs::remove_file(&file).unwrap();
        assert!(e.contains("cannot write to the cache directory"), "{e}");
        assert!(e.contains("apparate-not-a-dir"), "{e}");
    }

    /// What `prebuild` writes is what a device of that architecture reads: the same builder
    /// (options, NVRTC version, key) finds every module in the cache, and a second prebuild
    /// compiles nothing. Two small sources, so the test takes a second.
    #[test]
    #[ignore = "needs NVRTC (tools/fetch-cuda-tools.sh): run by .ci/run"]
    fn prebuild_fills_the_cache_a_device_reads() {
        let dir = std::env::temp_dir().join(format!("apparate-prebuild-{}", std::process::id()));
        let keep = ["elementwise.cu", "swiglu.cu"];
        let config = CudaConfig {
            cache_dir: Some(dir.clone()),
            skip_sources: SOURCES
                .iter()
                .map(|(f, _)| f.to_string())
                .filter(|f| !keep.contains(&f.as_str()))
                .collect(),
            ..CudaConfig::default()
        };
        let arch = super::super::probe::device_arch((9, 0));
        assert_eq!(arch.sm(), "sm_90a");
        let (at, builds) = prebuild(&config, &arch).unwrap();
        assert_eq!(at, dir);
        let files: Vec<&str> = builds.iter().map(|b| b.file).collect();
        assert_eq!(files, keep);
        assert!(builds.iter().all(|b| !b.cached));
        let written = std::fs::read_dir(dir.join("nvrtc")).unwrap().count();
        assert_eq!(written, keep.len());

        // A device made for sm_90a with this NVRTC builds through the same `Builder`.
        let device = Builder::new(&config, arch.clone(), nvrtc_version().unwrap());
        for (file, text) in sources_to_build(&config.skip_sources).unwrap() {
            let (code, cached) = device.build(file, text, false).unwrap();
            assert!(cached, "{file}");
            assert_eq!(&code[..4], b"\x7fELF", "{file}");
        }
        let (_, again) = prebuild(&config, &arch).unwrap();
        assert!(again.iter().all(|b| b.cached));
        // Another architecture is another key: compiled, not read.
        let (_, other) = prebuild(&config, &Arch::new(8, 0)).unwrap();
        assert!(other.iter().all(|b| !b.cached));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

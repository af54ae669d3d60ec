//! The on-disk cache of compiled modules, keyed by the sha256 of everything that determines
//! one (NVRTC version, source, headers, target, options), written atomically.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use super::super::kernel_sources::HEADERS;
use super::nvrtc::{Arch, Target, compile_with};
use crate::error::Result;

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

/// Where the module of one source (as [`cached_compile`] would build it) lives in the cache
/// directory `dir`.
pub(super) fn module_path(
    dir: &Path,
    file: &str,
    text: &str,
    arch: &Arch,
    target: Target,
    options: &[String],
    nvrtc: (i32, i32),
) -> PathBuf {
    cache_path(
        dir,
        file,
        arch,
        target,
        &cache_key(nvrtc, file, text, target, options),
    )
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

/// The compiled module of one source: read from `path` (its place in the cache, from
/// [`module_path`]) when it is there and `refresh` is false, else compiled by NVRTC and written
/// there, where failing to write is not an error. No path: compiled every time. Returns the
/// code and whether it came from the cache.
pub(super) fn cached_compile(
    file: &str,
    text: &str,
    target: Target,
    options: &[String],
    path: Option<&Path>,
    refresh: bool,
) -> Result<(Vec<u8>, bool)> {
    if !refresh && let Some(code) = path.and_then(|p| std::fs::read(p).ok()) {
        return Ok((code, true));
    }
    let c = compile_with(file, text, target, options)?;
    if let Some(p) = path {
        let _ = cache_write(p, &c.code);
    }
    Ok((c.code, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::nvrtc::{nvrtc_options, nvrtc_version};

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
    #[ignore = "needs NVRTC (tools/fetch-cuda-tools.sh): run by .ci/run and tools/gpu-check.sh"]
    fn nvrtc_compiled_modules_are_cached_on_disk() {
        let dir = std::env::temp_dir().join(format!("apparate-nvrtc-{}", std::process::id()));
        let (file, text) = (
            "t.cu",
            "extern \"C\" __global__ void k(float* x) { x[0] = 1.0f; }",
        );
        let arch = Arch::new(9, 0);
        let options = nvrtc_options::<&str>(&arch, Target::Cubin, &[]);
        let nvrtc = nvrtc_version().unwrap();
        let compile = |dir: Option<&Path>, refresh| {
            let path =
                dir.map(|d| module_path(d, file, text, &arch, Target::Cubin, &options, nvrtc));
            cached_compile(
                file,
                text,
                Target::Cubin,
                &options,
                path.as_deref(),
                refresh,
            )
            .unwrap()
        };
        let run = |refresh| compile(Some(&dir), refresh);
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
        let (code, hit) = compile(None, false);
        assert!(!hit && code == fresh);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

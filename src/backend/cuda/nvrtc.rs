//! NVRTC: the kernel sources embedded in the binary compiled to PTX or to a cubin, with the
//! shared headers as in-memory headers; GPU architectures and the option list.

use std::ffi::{CString, c_char, c_int};
use std::fmt;

use cudarc::nvrtc::sys as nsys;

use super::super::kernel_sources::{HEADERS, SOURCES};
use super::{BACKEND, DEFAULT_OPTIONS, guard};
use crate::error::{Error, Result};

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
            Error::config(
                "GPU architecture",
                format!("`{s}`"),
                "sm_XY, compute_XY, XY or X.Y (optionally with an a or f suffix)",
            )
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
    pub(super) fn number(&self) -> i32 {
        (self.major * 10 + self.minor) as i32
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.sm())
    }
}

fn require_nvrtc() -> Result<()> {
    // SAFETY: only tries to open the library.
    if unsafe { nsys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::device(
            BACKEND,
            "NVRTC",
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
        Err(Error::device(BACKEND, what, nvrtc_error_text(rc)))
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
    pub(super) fn extension(self) -> &'static str {
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
    CString::new(s)
        .map_err(|_| Error::device(BACKEND, "NVRTC", format!("{what} contains a NUL byte")))
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
    let options = nvrtc_options(&arch_for(arch, target)?, target, options);
    compile_with(file, text, target, &options)
}

/// `arch` parsed for `target`: a cubin needs a real architecture (sm_XY), not a virtual one.
fn arch_for(arch: &str, target: Target) -> Result<Arch> {
    if target == Target::Cubin && arch.trim().starts_with("compute_") {
        return Err(Error::config(
            "GPU architecture of a cubin",
            format!("`{arch}`"),
            "real architectures (sm_XY)",
        ));
    }
    Arch::parse(arch)
}

pub(super) fn compile_with(
    file: &str,
    text: &str,
    target: Target,
    options: &[String],
) -> Result<Compiled> {
    guard(&format!("NVRTC compiling kernels/{file}"), || {
        let (prog, log) = compile_program(file, text, options)?;
        let code = match target {
            Target::Ptx => ptx_of(&prog)?,
            Target::Cubin => cubin_of(&prog, file, options)?,
        };
        Ok(Compiled { code, log })
    })
}

/// One compile for a real architecture, both results: what the run-time path loads (the
/// cubin) and the PTX it came from, with NVRTC's log (which holds ptxas' report when the
/// options ask for one: `-Xptxas=-v`). Half the work of compiling to each in turn.
#[derive(Clone, Debug)]
pub struct PtxAndCubin {
    pub ptx: Vec<u8>,
    pub cubin: Vec<u8>,
    pub log: String,
}

/// [`compile_source`] to a cubin for the real architecture `arch` (sm_XY), keeping the PTX.
pub fn compile_source_ptx_and_cubin<O: AsRef<str>>(
    file: &str,
    text: &str,
    arch: &str,
    options: &[O],
) -> Result<PtxAndCubin> {
    let options = nvrtc_options(&arch_for(arch, Target::Cubin)?, Target::Cubin, options);
    guard(&format!("NVRTC compiling kernels/{file}"), || {
        let (prog, log) = compile_program(file, text, &options)?;
        Ok(PtxAndCubin {
            ptx: ptx_of(&prog)?,
            cubin: cubin_of(&prog, file, &options)?,
            log,
        })
    })
}

/// Creates and compiles the program of one source; its log on success, an error naming the
/// file, the options and the log otherwise.
fn compile_program(file: &str, text: &str, options: &[String]) -> Result<(Program, String)> {
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
    let header_text_ptrs: Vec<*const c_char> = header_texts.iter().map(|s| s.as_ptr()).collect();
    let header_name_ptrs: Vec<*const c_char> = header_names.iter().map(|s| s.as_ptr()).collect();
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
    let rc =
        unsafe { nsys::nvrtcCompileProgram(prog.0, opt_ptrs.len() as c_int, opt_ptrs.as_ptr()) };
    let log = program_log(&prog)?;
    if rc != nsys::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::kernel(
            BACKEND,
            format!("kernels/{file}"),
            format!(
                "NVRTC could not compile it ({}): {}\n{log}",
                options.join(" "),
                nvrtc_error_text(rc)
            ),
        ));
    }
    Ok((prog, log))
}

fn ptx_of(prog: &Program) -> Result<Vec<u8>> {
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
    Ok(buf)
}

fn cubin_of(prog: &Program, file: &str, options: &[String]) -> Result<Vec<u8>> {
    let mut size = 0usize;
    // SAFETY: as above.
    nvrtc_check("nvrtcGetCUBINSize", unsafe {
        nsys::nvrtcGetCUBINSize(prog.0, &mut size)
    })?;
    if size == 0 {
        return Err(Error::kernel(
            BACKEND,
            format!("kernels/{file}"),
            format!(
                "NVRTC produced no cubin ({}); a cubin needs a real architecture \
                 (sm_XY)",
                options.join(" ")
            ),
        ));
    }
    let mut buf = vec![0u8; size];
    nvrtc_check("nvrtcGetCUBIN", unsafe {
        nsys::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr() as *mut c_char)
    })?;
    Ok(buf)
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

/// Compiles every kernel source for the real architecture `arch` (`sm_90`): (file name, its
/// PTX, cubin and log) per source, in source order, one NVRTC compile each, in parallel (NVRTC
/// is thread-safe). Fails with the first source, in source order, that fails.
pub fn compile_every_source<O: AsRef<str> + Sync>(
    arch: &str,
    options: &[O],
) -> Result<Vec<(String, PtxAndCubin)>> {
    use rayon::prelude::*;
    SOURCES
        .par_iter()
        .map(|(file, text)| {
            Ok((
                file.to_string(),
                compile_source_ptx_and_cubin(file, text, arch, options)?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::entry_points::entry_points;

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
    fn every_kernel_has_a_source() {
        let mut found: Vec<String> = SOURCES.iter().flat_map(|(_, t)| entry_points(t)).collect();
        let mut listed: Vec<String> = crate::backend::kernel_sources::KERNELS
            .iter()
            .map(|s| s.to_string())
            .collect();
        found.sort();
        listed.sort();
        assert_eq!(found, listed);
    }

    #[test]
    #[ignore = "needs NVRTC (tools/fetch-cuda-tools.sh): run by .ci/run and tools/gpu-check.sh"]
    fn nvrtc_compiles_every_source() {
        println!("NVRTC {:?}", nvrtc_version().unwrap());
        let all = compile_every_source::<&str>("sm_90", &[]).unwrap();
        assert_eq!(all.len(), SOURCES.len());
        for ((file, text), (name, c)) in SOURCES.iter().zip(&all) {
            assert_eq!(file, name);
            let code = std::str::from_utf8(&c.ptx).unwrap();
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
            assert_eq!(&c.cubin[..4], b"\x7fELF", "{file}");
        }
        // ptxas' report reaches the log when asked for.
        let (file, text) = SOURCES[0];
        let c = compile_source_ptx_and_cubin(file, text, "sm_80", &["-Xptxas=-v"]).unwrap();
        assert!(c.log.contains("Used "), "{}", c.log);
        let e = compile_source_ptx_and_cubin::<&str>(file, text, "compute_80", &[]);
        assert!(e.unwrap_err().to_string().contains("real architecture"));
    }

    #[test]
    #[ignore = "needs NVRTC (tools/fetch-cuda-tools.sh): run by .ci/run and tools/gpu-check.sh"]
    fn nvrtc_errors_name_the_file_and_carry_the_log() {
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
}

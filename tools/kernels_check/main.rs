//! `kernels-check`: the NVRTC compile check of every kernel source, no GPU needed.
//!
//! For each architecture (default sm_80 and sm_90a, what the CUDA backend compiles for on
//! compute capability 9.0) every kernel source embedded in the library is compiled by NVRTC
//! straight to a cubin, the path the CUDA backend takes at run time, with NVRTC's own ptxas
//! asked for its `-v` report: the registers, static shared memory, stack and spills of every
//! kernel entry are read from it and printed as a table (`--markdown FILE` also writes it as
//! markdown). The PTX of the same compile and the cubin are written to a folder. One compile
//! per (architecture, source): the PTX, the cubin and the report all come from it. Exits
//! non-zero if any source fails to compile.
//!
//! NVRTC is loaded at run time (put `libnvrtc.so.13` on `LD_LIBRARY_PATH`);
//! `tools/fetch-cuda-tools.sh` installs it from PyPI and `tools/nvrtc-check.sh` runs this tool
//! with it.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use apparate::backend::cuda::{self, Arch, DEFAULT_OPTIONS};
use apparate::backend::kernel_sources::SOURCES;
use clap::Parser;
use rayon::prelude::*;

#[derive(Parser)]
#[command(
    name = "kernels-check",
    about = "Compile every kernel with NVRTC to a cubin, report its resources"
)]
struct Cli {
    /// Architectures to check (sm_XY), repeatable.
    #[arg(long = "arch", default_values = ["sm_80", "sm_90a"])]
    archs: Vec<String>,
    /// Folder for the PTX and cubin files, one subfolder per architecture.
    #[arg(long, default_value = "target/kernels-check")]
    out: PathBuf,
    /// Also write the table as markdown to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Check only this source (e.g. `attention.cu`), repeatable; a partial check writes no
    /// markdown table.
    #[arg(long = "source")]
    sources: Vec<String>,
    /// Extra NVRTC option (after the library's defaults), repeatable.
    #[arg(long = "nvrtc-option", allow_hyphen_values = true)]
    nvrtc_options: Vec<String>,
}

/// ptxas' report for one kernel entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Usage {
    kernel: String,
    registers: u32,
    shared: u64,
    stack: u64,
    spill_stores: u64,
    spill_loads: u64,
}

/// Result of one (arch, source).
struct Checked {
    arch: String,
    file: String,
    usage: Vec<Usage>,
    /// NVRTC and ptxas warnings.
    warnings: Vec<String>,
    /// Why it failed, if it did.
    error: Option<String>,
    /// Wall-clock seconds of its NVRTC compile (the pairs compile in parallel).
    seconds: f64,
}

/// The number in front of `word` in a ptxas phrase list such as
/// `Used 32 registers, used 1 barriers, 4096 bytes smem, 380 bytes cmem[0]`.
fn number_before(line: &str, word: &str) -> Option<u64> {
    line.split(',').find_map(|part| {
        let words: Vec<&str> = part.split_whitespace().collect();
        let i = words.iter().position(|w| *w == word)?;
        // `N registers`, or `N bytes smem`.
        let n = if i >= 2 && words[i - 1] == "bytes" {
            words[i - 2]
        } else {
            words.get(i.checked_sub(1)?)?
        };
        n.parse().ok()
    })
}

/// Parses `ptxas -v` output: one [`Usage`] per `Compiling entry function` in order.
fn parse_ptxas(report: &str) -> Vec<Usage> {
    let mut entries: Vec<Usage> = Vec::new();
    // Which function the next `bytes stack frame` line belongs to (entries and device functions
    // that were not inlined both get a "Function properties" block).
    let mut properties_of: Option<String> = None;
    let quoted = |line: &str| line.split('\'').nth(1).map(str::to_string);
    for line in report.lines() {
        if line.contains("Compiling entry function") {
            if let Some(name) = quoted(line) {
                entries.push(Usage {
                    kernel: name,
                    ..Usage::default()
                });
            }
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            properties_of = Some(rest.trim().to_string());
        } else if line.contains("bytes stack frame") {
            if let Some(name) = properties_of.take()
                && let Some(u) = entries.iter_mut().find(|u| u.kernel == name)
            {
                u.stack = number_before(line, "stack").unwrap_or(0);
                // `N bytes spill stores, M bytes spill loads`: one phrase at a time.
                for part in line.split(',') {
                    if part.contains("spill stores") {
                        u.spill_stores = number_before(part, "spill").unwrap_or(0);
                    } else if part.contains("spill loads") {
                        u.spill_loads = number_before(part, "spill").unwrap_or(0);
                    }
                }
            }
        } else if line.contains("Used ") && line.contains(" registers") {
            // Belongs to the entry being compiled (the last one announced).
            if let Some(u) = entries.last_mut() {
                u.registers = number_before(line, "registers").unwrap_or(0) as u32;
                u.shared = number_before(line, "smem").unwrap_or(0);
            }
        }
    }
    entries
}

/// The option that makes NVRTC's own ptxas write its `-v` report into the program log.
const PTXAS_VERBOSE: &str = "-Xptxas=-v";

fn check_one(cli: &Cli, arch: &Arch, file: &str, text: &str) -> Checked {
    let mut out = Checked {
        arch: arch.sm(),
        file: file.to_string(),
        usage: Vec::new(),
        warnings: Vec::new(),
        error: None,
        seconds: 0.0,
    };
    let t0 = std::time::Instant::now();
    let stem = file.strip_suffix(".cu").unwrap_or(file);
    let dir = cli.out.join(arch.sm());
    let result = (|| -> Result<(), String> {
        // The run-time path: NVRTC straight to a cubin for the real architecture. One compile
        // gives the PTX too, and its log the ptxas report.
        let mut options = cli.nvrtc_options.clone();
        options.push(PTXAS_VERBOSE.to_string());
        let c = cuda::compile_source_ptx_and_cubin(file, text, &arch.sm(), &options)
            .map_err(|e| e.to_string())?;
        out.seconds = t0.elapsed().as_secs_f64();
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for (ext, bytes) in [("ptx", &c.ptx), ("cubin", &c.cubin)] {
            let path = dir.join(format!("{stem}.{ext}"));
            std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        // Everything in the log but ptxas' resource report is a warning (NVRTC's or ptxas').
        let (report, other): (Vec<&str>, Vec<&str>) = c
            .log
            .lines()
            .filter(|l| !l.trim().is_empty())
            .partition(|l| l.starts_with("ptxas") && !l.to_lowercase().contains("warning"));
        out.warnings
            .extend(other.iter().map(|l| l.trim().to_string()));
        out.usage = parse_ptxas(&report.join("\n"));
        Ok(())
    })();
    out.error = result.err();
    out
}

const HEAD: [&str; 8] = [
    "arch",
    "source",
    "kernel",
    "registers",
    "shared B",
    "stack B",
    "spill st B",
    "spill ld B",
];

fn rows(results: &[Checked]) -> Vec<[String; 8]> {
    results
        .iter()
        .flat_map(|c| {
            c.usage.iter().map(move |u| {
                [
                    c.arch.clone(),
                    c.file.clone(),
                    u.kernel.clone(),
                    u.registers.to_string(),
                    u.shared.to_string(),
                    u.stack.to_string(),
                    u.spill_stores.to_string(),
                    u.spill_loads.to_string(),
                ]
            })
        })
        .collect()
}

fn text_table(rows: &[[String; 8]]) -> String {
    let mut width = HEAD.map(str::len);
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut s = String::new();
    let line = |cells: &[&str], s: &mut String| {
        for (i, (c, w)) in cells.iter().zip(width).enumerate() {
            // Text columns left-aligned, numbers right-aligned.
            if i < 3 {
                write!(s, "{c:<w$}  ").unwrap();
            } else {
                write!(s, "{c:>w$}  ").unwrap();
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
    };
    line(&HEAD, &mut s);
    let rule: Vec<String> = width.iter().map(|&w| "-".repeat(w)).collect();
    line(&rule.iter().map(String::as_str).collect::<Vec<_>>(), &mut s);
    for r in rows {
        line(&r.iter().map(String::as_str).collect::<Vec<_>>(), &mut s);
    }
    s
}

fn markdown(archs: &[Arch], rows: &[[String; 8]], nvrtc: (i32, i32), options: &[String]) -> String {
    let mut s = String::from("# Kernel resources\n\n");
    writeln!(
        s,
        "Generated by `tools/nvrtc-check.sh` (the `kernels-check` binary); do not edit by hand.\n\
         Every `kernels/*.cu` is compiled by NVRTC {}.{} for each architecture straight to a \
         cubin (`{}`), as the CUDA backend does at run time; the table is the `-v` report of \
         NVRTC's own ptxas (`{PTXAS_VERBOSE}`).\n",
        nvrtc.0,
        nvrtc.1,
        options.join(" ")
    )
    .unwrap();
    s.push_str(
        "Registers are per thread. Shared memory is the static `__shared__` memory of the \
         kernel; dynamic shared memory is chosen per launch and not included (the tensor-core \
         kernels take all of theirs that way: see the last section). Stack and spills are \
         bytes per thread; a kernel that spills is worth a look. The Hopper kernels \
         (`gemm_wgmma*`) are built as a single trap for other architectures (their launcher \
         picks them only on sm_90a), hence their few registers there.\n",
    );
    for arch in archs {
        let sm = arch.sm();
        writeln!(s, "\n## {sm}\n").unwrap();
        s.push_str("| source | kernel | registers | shared (B) | stack (B) | spill stores (B) | spill loads (B) |\n");
        s.push_str("|---|---|---:|---:|---:|---:|---:|\n");
        for r in rows.iter().filter(|r| r[0] == sm) {
            writeln!(
                s,
                "| {} | `{}` | {} | {} | {} | {} | {} |",
                r[1], r[2], r[3], r[4], r[5], r[6], r[7]
            )
            .unwrap();
        }
    }
    s.push_str(&dynamic_shared_markdown());
    s
}

/// The dynamic shared memory the launchers give the kernels that take a fixed amount per block
/// (`backend::gpu::shared_memory`), and how many such blocks fit a multiprocessor by shared
/// memory alone on an A100 (164 KiB per SM, 163 KiB per block at most) and on an H100/H200
/// (228 KiB, 227 KiB), counting the 1 KiB the hardware reserves per block.
fn dynamic_shared_markdown() -> String {
    let mut s = String::from(
        "\n## Dynamic shared memory at launch\n\n\
         Set by each family's launcher from one formula (`src/backend/gpu/shared_memory.rs`), \
         per block; blocks per multiprocessor by shared memory alone (registers and threads may \
         allow fewer), counting the 1 KiB reserved per block: sm_80 has 164 KiB per \
         multiprocessor (163 KiB per block at most), sm_90 228 KiB (227 KiB).\n\n\
         | kernels | threads | dynamic shared (B) | blocks per SM, sm_80 | blocks per SM, sm_90 |\n\
         |---|---:|---:|---:|---:|\n",
    );
    for l in apparate::backend::gpu::shared_memory::fixed_dynamic_shared() {
        let fits = |per_sm: u32, per_block: u32| {
            if l.bytes > per_block {
                "too big".to_string()
            } else {
                (per_sm / (l.bytes + 1024)).to_string()
            }
        };
        let sm80 = if l.hopper_only {
            "-".to_string()
        } else {
            fits(164 * 1024, 163 * 1024)
        };
        writeln!(
            s,
            "| `{}` | {} | {} | {sm80} | {} |",
            l.kernels,
            l.threads,
            l.bytes,
            fits(228 * 1024, 227 * 1024)
        )
        .unwrap();
    }
    s
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let archs: Vec<Arch> = match cli.archs.iter().map(|a| Arch::parse(a)).collect() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let nvrtc = match cuda::nvrtc_version() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "NVRTC {}.{}, {} sources, archs {}",
        nvrtc.0,
        nvrtc.1,
        SOURCES.len(),
        archs.iter().map(Arch::sm).collect::<Vec<_>>().join(", ")
    );

    if let Some(bad) = cli
        .sources
        .iter()
        .find(|s| !SOURCES.iter().any(|(f, _)| f == s))
    {
        let known: Vec<&str> = SOURCES.iter().map(|(f, _)| *f).collect();
        eprintln!(
            "error: --source {bad}: no such kernel source (kernels/: {})",
            known.join(", ")
        );
        return ExitCode::FAILURE;
    }
    if !cli.sources.is_empty() && cli.markdown.is_some() {
        eprintln!("error: --markdown needs every source: leave out --source");
        return ExitCode::FAILURE;
    }
    let picked = |f: &str| cli.sources.is_empty() || cli.sources.iter().any(|s| s == f);
    let jobs: Vec<(&Arch, &str, &str)> = archs
        .iter()
        .flat_map(|a| SOURCES.iter().map(move |&(f, t)| (a, f, t)))
        .filter(|&(_, f, _)| picked(f))
        .collect();
    let results: Vec<Checked> = jobs
        .par_iter()
        .map(|&(arch, file, text)| check_one(&cli, arch, file, text))
        .collect();

    let mut failed = 0;
    for c in &results {
        for w in &c.warnings {
            println!("warning: {} kernels/{}: {w}", c.arch, c.file);
        }
        if let Some(e) = &c.error {
            failed += 1;
            println!("FAILED: {} kernels/{}: {e}", c.arch, c.file);
        } else if c.usage.is_empty() && !cuda::entry_points(source_text(&c.file)).is_empty() {
            println!(
                "note: {} kernels/{}: ptxas reported no entry functions",
                c.arch, c.file
            );
        }
    }
    let rows = rows(&results);
    print!("\n{}", text_table(&rows));
    // The slowest compiles: a device compiles every source in parallel when it is made, so a
    // cold start waits about as long as the slowest one (machine-dependent: not in the docs).
    let mut slow: Vec<&Checked> = results.iter().filter(|c| c.error.is_none()).collect();
    slow.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    let slow: Vec<String> = slow
        .iter()
        .take(6)
        .map(|c| format!("{} {} {:.1} s", c.arch, c.file, c.seconds))
        .collect();
    println!("\nslowest NVRTC compiles here: {}", slow.join(", "));

    if let Some(path) = &cli.markdown {
        let options: Vec<String> = DEFAULT_OPTIONS
            .iter()
            .map(|s| s.to_string())
            .chain(cli.nvrtc_options.iter().cloned())
            .collect();
        let md = markdown(&archs, &rows, nvrtc, &options);
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
            && let Err(e) = std::fs::create_dir_all(parent)
        {
            eprintln!("error: {}: {e}", parent.display());
            return ExitCode::FAILURE;
        }
        if let Err(e) = std::fs::write(path, md) {
            eprintln!("error: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("\nwrote {}", path.display());
    }

    println!(
        "\n{} of {} (arch, source) pairs compiled to cubins; PTX and cubins in {}",
        results.len() - failed,
        results.len(),
        cli.out.display()
    );
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn source_text(file: &str) -> &'static str {
    SOURCES
        .iter()
        .find(|(f, _)| *f == file)
        .map_or("", |(_, t)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'layernorm_f16' for 'sm_90'
ptxas info    : Function properties for layernorm_f16
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem, 380 bytes cmem[0]
ptxas info    : Compiling entry function 'cast_f32_f16' for 'sm_90'
ptxas info    : Function properties for helper
    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Function properties for cast_f32_f16
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers, 368 bytes cmem[0]
";

    #[test]
    fn parses_ptxas_reports() {
        let u = parse_ptxas(REPORT);
        assert_eq!(
            u,
            vec![
                Usage {
                    kernel: "layernorm_f16".into(),
                    registers: 40,
                    shared: 4096,
                    stack: 8,
                    spill_stores: 4,
                    spill_loads: 12,
                },
                Usage {
                    kernel: "cast_f32_f16".into(),
                    registers: 10,
                    ..Usage::default()
                },
            ]
        );
    }

    #[test]
    fn tables_have_one_row_per_kernel() {
        let results = vec![Checked {
            arch: "sm_90".into(),
            file: "norm.cu".into(),
            usage: parse_ptxas(REPORT),
            warnings: vec![],
            error: None,
            seconds: 1.0,
        }];
        let r = rows(&results);
        assert_eq!(r.len(), 2);
        let t = text_table(&r);
        assert_eq!(t.lines().count(), 4);
        let md = markdown(&[Arch::new(9, 0)], &r, (13, 5), &[]);
        assert!(
            md.contains("NVRTC 13.5") && md.contains(PTXAS_VERBOSE),
            "{md}"
        );
        assert!(md.contains("| norm.cu | `layernorm_f16` | 40 | 4096 | 8 | 4 | 12 |"));
    }
}

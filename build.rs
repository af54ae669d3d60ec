//! Builds the emulated CUDA device: every `kernels/*.cu` compiled by the host C++ compiler
//! (`APPARATE_EMU`) together with the fiber runtime in `kernels/emu/`, plus a generated
//! registry that maps kernel names to launch trampolines. The CUDA backend compiles the same
//! sources with NVRTC at run time; nothing here needs CUDA. Also generates the gRPC server code
//! of `apparate serve` from `proto/inference.proto`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[path = "src/backend/entry_points.rs"]
mod entry_points;
use entry_points::entry_points;

fn main() {
    grpc_messages();
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let kernels = root.join("kernels");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=proto");
    println!("cargo::rustc-check-cfg=cfg(apparate_emu)");
    // The emulated device switches fibers with x86-64 assembly: elsewhere the crate builds
    // without it (and `EmuDevice::new` says so), so the CUDA backend still builds on, say,
    // aarch64 GPU hosts.
    let emu = std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86_64");
    if emu {
        println!("cargo:rustc-cfg=apparate_emu");
    }

    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kernels)
        .expect("kernels/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .define("APPARATE_EMU", None)
        .include(&kernels)
        .flag_if_supported("-fno-strict-aliasing")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-unused-function")
        // Tensor maps (64-byte aligned) are kernel parameters by value: GCC notes the ABI.
        .flag_if_supported("-Wno-psabi")
        .warnings(false)
        .file(kernels.join("emu/emu.cpp"))
        .file(kernels.join("emu/mbarrier.cpp"));

    let mut tables = Vec::new();
    let mut all_names = Vec::new();
    for src in &sources {
        let text = std::fs::read_to_string(src).expect("read kernel source");
        let stem = src.file_stem().unwrap().to_string_lossy().replace('-', "_");
        let names = entry_points(&text);
        let mut unit = String::new();
        writeln!(unit, "#include \"{}\"", src.display()).unwrap();
        writeln!(unit, "#include \"emu/trampoline.h\"").unwrap();
        writeln!(
            unit,
            "extern const ApparateEmuKernel apparate_emu_table_{stem}[] = {{"
        )
        .unwrap();
        for n in &names {
            writeln!(unit, "    APPARATE_EMU_ENTRY({n}),").unwrap();
        }
        writeln!(unit, "    ApparateEmuKernel{{nullptr, nullptr}}}};").unwrap();
        let path = out.join(format!("emu_{stem}.cpp"));
        write_if_changed(&path, &unit);
        build.file(&path);
        tables.push(stem);
        all_names.extend(names);
    }

    let mut reg = String::from("#include \"emu/trampoline.h\"\n#include <cstring>\n");
    for t in &tables {
        writeln!(
            reg,
            "extern const ApparateEmuKernel apparate_emu_table_{t}[];"
        )
        .unwrap();
    }
    reg.push_str("static const ApparateEmuKernel* const tables[] = {");
    for t in &tables {
        write!(reg, "apparate_emu_table_{t}, ").unwrap();
    }
    reg.push_str("nullptr};\n");
    reg.push_str(
        "void (*apparate_emu_find(const char* name))(void**) {\n\
         for (int t = 0; tables[t]; t++)\n\
           for (const ApparateEmuKernel* k = tables[t]; k->name; k++)\n\
             if (std::strcmp(k->name, name) == 0) return k->entry;\n\
         return nullptr;\n}\n",
    );
    let reg_path = out.join("emu_registry.cpp");
    write_if_changed(&reg_path, &reg);
    build.file(&reg_path);
    if emu {
        build.compile("apparate_emu");
    }

    // The kernel sources, embedded for NVRTC (name, text); headers by include name.
    let mut embed = String::from(
        "/// Kernel sources: (file name, text).\npub const SOURCES: &[(&str, &str)] = &[\n",
    );
    for src in &sources {
        let name = src.file_name().unwrap().to_string_lossy();
        writeln!(
            embed,
            "    ({name:?}, include_str!({:?})),",
            src.display().to_string()
        )
        .unwrap();
    }
    embed.push_str(
        "];\n/// Shared headers: (include name, text).\npub const HEADERS: &[(&str, &str)] = &[\n",
    );
    let mut headers: Vec<PathBuf> = std::fs::read_dir(kernels.join("common"))
        .expect("kernels/common exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cuh"))
        .collect();
    headers.sort();
    for h in &headers {
        let name = format!("common/{}", h.file_name().unwrap().to_string_lossy());
        writeln!(
            embed,
            "    ({name:?}, include_str!({:?})),",
            h.display().to_string()
        )
        .unwrap();
    }
    embed.push_str("];\n/// Every entry point, for checks.\npub const KERNELS: &[&str] = &[\n");
    for n in &all_names {
        writeln!(embed, "    {n:?},").unwrap();
    }
    embed.push_str("];\n");
    write_if_changed(&out.join("kernel_sources.rs"), &embed);

    let params = kernels.join("common/params.cuh");
    let text = std::fs::read_to_string(&params).expect("kernels/common/params.cuh exists");
    write_if_changed(&out.join("kernel_params.rs"), &kernel_params(&text));
}

/// The Rust side of `kernels/common/params.cuh`: each `#define NAME value` (a decimal integer)
/// becomes `pub const NAME: u32`, with the comment lines above it as its doc. Anything else that
/// looks like a define is a build error, so the two sides cannot silently disagree.
fn kernel_params(text: &str) -> String {
    let mut rs = String::from("// Generated by build.rs from kernels/common/params.cuh.\n");
    let mut doc: Vec<&str> = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(c) = line.strip_prefix("//") {
            doc.push(c.trim());
            continue;
        }
        if let Some(def) = line.strip_prefix("#define") {
            let mut parts = def.split_whitespace();
            let (Some(name), Some(value), None) = (parts.next(), parts.next(), parts.next()) else {
                panic!("kernels/common/params.cuh: `{line}` is not `#define NAME value`");
            };
            let value: u32 = value.parse().unwrap_or_else(|_| {
                panic!("kernels/common/params.cuh: {name} = `{value}` is not a decimal u32")
            });
            for d in &doc {
                writeln!(rs, "/// {d}").unwrap();
            }
            writeln!(rs, "pub const {name}: u32 = {value};").unwrap();
        }
        doc.clear();
    }
    rs
}

fn write_if_changed(path: &Path, text: &str) {
    if std::fs::read_to_string(path).ok().as_deref() != Some(text) {
        std::fs::write(path, text).expect("write generated file");
    }
}

/// `proto/inference.proto` (the Open Inference Protocol's gRPC form) as Rust messages and a
/// server trait, in `OUT_DIR/inference.rs`; `src/server/grpc.rs` includes it.
fn grpc_messages() {
    let fds = protox::compile(["proto/inference.proto"], ["proto"])
        .unwrap_or_else(|e| panic!("proto/inference.proto: {e}"));
    tonic_prost_build::configure()
        .build_client(false)
        .build_transport(false)
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating the gRPC code: {e}"));
}

//! The `apparate` binary refuses nonsense flags at once, with a message naming the flag and what
//! it accepts, and a non-zero exit (issue 12, defect 9): nothing is loaded, nothing panics,
//! nothing hangs. Uses only committed files (weights/mnist-resnet.apparate).

use std::process::Command;
use std::time::{Duration, Instant};

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/weights/mnist-resnet.apparate");

/// Runs the CLI; returns (exit code, stderr).
fn apparate(args: &[&str]) -> (Option<i32>, String) {
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_apparate"))
        .args(args)
        .env_remove("APPARATE_THREADS")
        .output()
        .expect("the apparate binary runs");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "{args:?} took {:?}",
        t.elapsed()
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `args` fail with our error (exit 1: not a panic's 101, not a hang) naming every `needle`.
fn refused(args: &[&str], needles: &[&str]) {
    let (code, err) = apparate(args);
    assert_eq!(code, Some(1), "{args:?}: exit {code:?}, stderr: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: `{n}` not in: {err}");
    }
}

/// `serve-replay` on the committed model with `extra` flags. The stream does not exist: every
/// flag tested must be refused before it is read.
fn replay<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "serve-replay",
        "-m",
        MODEL,
        "--data",
        "no-such-stream.safetensors",
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn thread_counts_outside_the_machine_are_refused() {
    for t in ["0", "10000"] {
        refused(
            &["profile", "-m", MODEL, "-o", "unused.json", "--threads", t],
            &["threads", t, "outside"],
        );
        refused(
            &[
                "profile",
                "-m",
                MODEL,
                "-o",
                "unused.json",
                "--backend",
                "emu",
                "--threads",
                t,
            ],
            &["threads", t],
        );
    }
}

#[test]
fn threads_with_the_cuda_backend_are_refused_not_ignored() {
    refused(
        &[
            "profile",
            "-m",
            MODEL,
            "-o",
            "unused.json",
            "--backend",
            "cuda",
            "--threads",
            "4",
        ],
        &["--threads", "cpu and emu"],
    );
}

#[test]
fn convert_flags_of_the_other_family_are_refused_not_dropped() {
    // clap refuses these itself (exit 2, usage error), before anything is read.
    for (args, needle) in [
        (
            vec![
                "convert",
                "x.safetensors",
                "-o",
                "y",
                "--arch",
                "resnet18",
                "--head",
                "h",
            ],
            "--head",
        ),
        (
            vec!["convert", "folder", "-o", "y", "--resize-shorter", "256"],
            "--arch",
        ),
        (
            vec!["convert", "folder", "-o", "y", "--mean", "0.5"],
            "--arch",
        ),
    ] {
        let (code, err) = apparate(&args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: `{needle}` not in: {err}");
    }
}

#[test]
fn adaptation_knobs_are_refused_by_name_and_range() {
    refused(
        &replay(&["--accuracy-budget", "2"]),
        &["accuracy_budget", "(0, 1)"],
    );
    refused(&replay(&["--accuracy-budget=-0.5"]), &["accuracy_budget"]);
    refused(
        &replay(&["--accuracy-budget", "NaN"]),
        &["accuracy_budget", "NaN"],
    );
    refused(&replay(&["--tuning-headroom", "5"]), &["tuning_headroom"]);
    refused(
        &replay(&["--adjust-every", "0"]),
        &["adjust_every_batches", "1..="],
    );
    refused(
        &replay(&["--fixed", "stage1=0.5,stage1=0.6"]),
        &["fixed", "`stage1` given twice"],
    );
    refused(
        &replay(&["--bootstrap-fraction=-1"]),
        &["--bootstrap-fraction", "(0, 1]"],
    );
}

#[test]
fn batching_knobs_and_durations_are_refused_without_panicking() {
    refused(
        &replay(&["--max-batch", "100000000"]),
        &["max_batch_size", "1..="],
    );
    // 1e300 ms overflowed `Duration::from_secs_f64` (a panic) before.
    refused(
        &replay(&["--max-delay-ms", "1e300"]),
        &["--max-delay-ms", "ms"],
    );
    refused(&replay(&["--max-delay-ms=-1"]), &["--max-delay-ms"]);
    refused(&replay(&["--queue", "0"]), &["queue_capacity"]);
    refused(&replay(&["--rate", "0"]), &["--rate"]);
    // Not an integer at all: clap's own usage error (exit 2) names the flag.
    let (code, err) = apparate(&replay(&["--max-batch", "1e8"]));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--max-batch"), "{err}");
}

#[test]
fn limit_zero_says_what_it_is() {
    refused(
        &replay(&["--limit", "0"]),
        &["--limit", "1 or more inputs to replay"],
    );
}

#[test]
fn an_unwritable_json_path_fails_before_the_run() {
    // Before: the run went ahead (here it would have failed on the missing stream instead).
    refused(
        &replay(&["--json", "/no-such-dir/summary.json"]),
        &["/no-such-dir/summary.json"],
    );
}

#[test]
fn top_zero_is_refused() {
    refused(
        &["classify", "-m", MODEL, "--top", "0", "x.png"],
        &["--top", "1 or more"],
    );
}

#[test]
fn a_directory_given_as_a_model_is_named_as_such() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/weights");
    refused(
        &["inspect", dir],
        &["is a directory, expected a model file"],
    );
    let (_, err) = apparate(&["inspect", dir]);
    assert!(!err.contains("No such device"), "{err}");
}

#[test]
fn train_ramps_fractions_and_counts_are_checked() {
    let base = ["train-ramps", "-m", MODEL, "--data", "no-such-stream"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        base.iter().chain(extra).copied().collect()
    };
    refused(
        &with(&["--bootstrap-fraction", "0"]),
        &["--bootstrap-fraction"],
    );
    refused(&with(&["--holdout-fraction", "2"]), &["--holdout-fraction"]);
    refused(&with(&["--epochs", "0"]), &["--epochs"]);
    refused(
        &with(&["--report", "/no-such-dir/r.json"]),
        &["/no-such-dir/r.json"],
    );
}

#[test]
fn live_loop_flags_outside_their_range_are_refused_by_name() {
    refused(
        &replay(&["--without", "warp"]),
        &["--without", "warp", "drift-test"],
    );
    refused(
        &replay(&["--confidence", "1.5"]),
        &["live.confidence", "1.5"],
    );
    // The mode is parsed by clap (a usage error, exit 2) and named.
    let (code, err) = apparate(&replay(&["--mode", "fast"]));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--mode") && err.contains("live or paper"),
        "{err}"
    );
}

/// `inspect` reads a GGUF file by its magic (whatever its name) and shows its metadata and
/// tensors; a corrupt one is refused naming what is wrong.
#[test]
fn inspect_reads_gguf_files_and_refuses_corrupt_ones() {
    use apparate::gguf::{GgmlType, GgufWriter, Value};
    let dir = std::env::temp_dir().join(format!("apparate-cli-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = GgufWriter::new()
        .meta("general.architecture", Value::String("llama".into()))
        .meta("llama.block_count", Value::U32(1))
        .meta("tokenizer.ggml.add_bos_token", Value::Bool(false))
        .meta("neg", Value::I32(-5))
        .tensor("output_norm.weight", &[8], GgmlType::F32, vec![0; 32])
        .tensor("w", &[32, 2], GgmlType::Q8_0, vec![0; 68])
        .to_bytes();
    let good = dir.join("tiny.bin");
    std::fs::write(&good, &bytes).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_apparate"))
        .args(["inspect", good.to_str().unwrap(), "--tensors"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for want in [
        "GGUF version 3",
        "architecture llama",
        "llama.block_count",
        "false",
        "-5",
        "tensors: 2 (",
        "Q8_0",
        "[2, 32]",
    ] {
        assert!(text.contains(want), "`{want}` not in:\n{text}");
    }
    let bad = dir.join("cut.gguf");
    std::fs::write(&bad, &bytes[..bytes.len() - 10]).unwrap();
    refused(
        &["inspect", bad.to_str().unwrap()],
        &["cut.gguf", "`w`", "run past the end"],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

const SMOLLM: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/weights/smollm2-135m-instruct.q4_1.gguf"
);

/// `generate` streams the reference's greedy tokens (raw prompt, `--ids`) and the chat
/// template's answer as text, with the speed on standard error.
#[test]
fn generate_streams_the_reference_tokens() {
    let f: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/smollm2_golden.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let c = &f["cases"][15];
    assert_eq!(c["kind"], "raw");
    let out = Command::new(env!("CARGO_BIN_EXE_apparate"))
        .args([
            "generate",
            "-m",
            SMOLLM,
            "--raw",
            "--ids",
            "--max-tokens",
            "16",
            "--ignore-eos",
        ])
        .arg(c["text"].as_str().unwrap())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let got: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let want: Vec<u64> = c["greedy"].as_array().unwrap()[..16]
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(got, want);
    assert!(
        err.contains("prefill: ") && err.contains("ms/token"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_apparate"))
        .args(["generate", "-m", SMOLLM, "What is the capital of France?"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "The capital of France is Paris.\n"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("ended at the end-of-turn token"));
}

#[test]
fn generate_flags_are_refused_by_name() {
    let g = |extra: &[&'static str]| {
        let mut v = vec!["generate", "-m", SMOLLM, "hi"];
        v.extend_from_slice(extra);
        v
    };
    refused(&g(&["--temperature=-1"]), &["temperature", "greedy"]);
    refused(&g(&["--top-p", "0"]), &["top_p", "(0, 1]"]);
    refused(&g(&["--max-tokens", "0"]), &["--max-tokens", "1..="]);
    refused(
        &g(&["--q8-activations", "--backend", "emu"]),
        &["--q8-activations", "cpu backend"],
    );
    refused(
        &g(&["--kv-cache-mib", "1", "--max-tokens", "200"]),
        &["do not fit", "--kv-cache-mib 1"],
    );
    refused(&["generate", "-m", MODEL, "hi"], &["mnist-resnet.apparate"]);
}

/// `convert` of a GGUF file refuses the BERT/CNN flags (they would do nothing) by name.
#[test]
fn converting_gguf_refuses_the_other_families_flags() {
    refused(
        &[
            "convert",
            SMOLLM,
            "-o",
            "/nonexistent/x.apparate",
            "--dtype",
            "f16",
        ],
        &["--dtype", "GGUF"],
    );
    refused(
        &[
            "convert",
            SMOLLM,
            "-o",
            "/nonexistent/x.apparate",
            "--pooling",
            "mean",
        ],
        &["--pooling", "GGUF"],
    );
}

/// `devices --compile --arch` fills the module cache for a GPU that is not here, with NVRTC
/// only: where NVRTC is on the library path it reports the sources it built for each of two
/// architectures (one small source here, the rest left out, to keep it quick), else it fails
/// with exit 1 and says NVRTC is missing. A bad architecture is refused by name either way,
/// before anything compiles, and `--arch` without `--compile` is a usage error.
#[test]
fn devices_compile_for_an_absent_gpu_fills_the_cache_or_says_nvrtc_is_missing() {
    let dir = std::env::temp_dir().join(format!("apparate-cli-prebuild-{}", std::process::id()));
    let kernels = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let skip: Vec<String> = std::fs::read_dir(&kernels)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f.ends_with(".cu") && f != "elementwise.cu")
        .collect();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_apparate"))
            .args(args)
            .env("APPARATE_CACHE_DIR", &dir)
            .env("APPARATE_CUDA_SKIP_SOURCES", skip.join(","))
            .output()
            .expect("the apparate binary runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = run(&["devices", "--compile", "--arch", "8.0", "--arch", "9.0"]);
    assert!(!stderr.contains("panicked"), "{stderr}");
    if code == Some(0) {
        for sm in ["sm_80", "sm_90a"] {
            assert!(
                stdout.contains(&format!("cuda  kernels: 1 sources for {sm}"))
                    && stdout.contains(&format!("kernels compiled for {sm}")),
                "{stdout}"
            );
        }
        assert!(stdout.contains("elementwise.cu"), "{stdout}");
        assert_eq!(std::fs::read_dir(dir.join("nvrtc")).unwrap().count(), 2);
    } else {
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains("no NVRTC library"), "{stderr}");
    }
    // Every name is checked before anything compiles.
    let (code, stdout, stderr) = run(&["devices", "--compile", "--arch", "9.0", "--arch", "sm_9x"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("GPU architecture") && stderr.contains("sm_9x"),
        "{stderr}"
    );
    assert!(!stdout.contains("cuda  kernels"), "{stdout}");
    let (code, _, stderr) = run(&["devices", "--arch", "9.0"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--compile"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `devices --compile` makes the CUDA device: where there is none (CI, this crate's usual
/// machines) it fails with the probe's reason and exit 1, after the lines it could print; where
/// there is one it reports every kernel source it built.
#[test]
fn devices_compile_reports_the_build_or_why_there_is_no_gpu() {
    let out = Command::new(env!("CARGO_BIN_EXE_apparate"))
        .args(["devices", "--compile"])
        .output()
        .expect("the apparate binary runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(stdout.contains("cpu   available"), "{stdout}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    if out.status.code() == Some(0) {
        assert!(stdout.contains("cuda  kernels: "), "{stdout}");
        assert!(stdout.contains("gemm.cu"), "{stdout}");
    } else {
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stdout.contains("cuda  unavailable: "), "{stdout}");
        assert!(stderr.contains("error: backend `cuda`"), "{stderr}");
    }
}

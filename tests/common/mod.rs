//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use apparate::backend::{CpuBackend, CpuConfig};

/// Folder of the fetched model files: `APPARATE_WEIGHTS` or `weights/` in the repository.
pub fn weights_dir() -> PathBuf {
    std::env::var_os("APPARATE_WEIGHTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights"))
}

/// A fetched model file; panics with the command to run when it is missing (the real-model
/// tests must never pass silently without the real model).
pub fn weights_file(name: &str) -> PathBuf {
    let p = weights_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `weights/fetch.sh` first (it downloads and converts the real models)",
        p.display()
    );
    p
}

pub fn cpu() -> CpuBackend {
    CpuBackend::new(CpuConfig::default()).expect("cpu backend")
}

/// The model file `src` written again to `path` with its weights stored as `dtype` (and
/// `entries`, its tokenizer for instance, carried over): what `apparate convert --dtype` makes
/// of the same checkpoint.
pub fn write_as_dtype(
    src: &apparate::format::ModelFile,
    path: &std::path::Path,
    dtype: apparate::tensor::DType,
    entries: &[(String, String)],
) {
    let tensors = src
        .meta()
        .expected_tensors()
        .into_iter()
        .map(|(n, shape)| {
            let v = src.tensor(&n).unwrap().to_f32();
            (n, apparate::format::OwnedTensor::from_f32(&v, shape, dtype))
        })
        .collect();
    apparate::format::write_model(path, src.meta(), entries, tensors).unwrap();
}

/// A fresh temporary directory under the target dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p =
            std::env::temp_dir().join(format!("apparate-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A prepared workload stream (`workloads/`, made by `weights/fetch.sh`); panics with the
/// command to run when it is missing.
pub fn workload_file(name: &str) -> PathBuf {
    let p = std::env::var_os("APPARATE_WORKLOADS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("workloads"))
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: run `weights/fetch.sh` first (it prepares the workload streams)",
        p.display()
    );
    p
}

/// The SmolLM2 reference outputs (tests/fixtures/smollm2_golden.json, made by
/// tools/make_golden_smollm2.py with transformers on the same GGUF file).
pub fn smollm2_fixture() -> serde_json::Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/smollm2_golden.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// A JSON array of token ids.
pub fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

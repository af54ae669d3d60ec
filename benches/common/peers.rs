//! Shared by benches/encoder.rs and benches/cnn.rs: the peers' timings (PyTorch, ONNX Runtime;
//! the JSON that tools/bench_encoder_peers.py and tools/bench_cnn_peers.py write) as extra
//! columns, and the host CPU's model and feature flags, recorded the same way the peers record
//! theirs so a ratio can be checked to come from one machine.

use std::path::Path;

use serde_json::{Map, Value, json};

/// The /proc/cpuinfo flags that decide which kernels we and the peers (oneDNN/MKL, MLAS) can
/// use. Keep in step with CPU_FLAGS in tools/bench_peers_common.py.
const CPU_FLAGS: &[&str] = &[
    // x86
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512dq",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    // arm64 (/proc/cpuinfo names them "Features")
    "asimd",
    "asimddp",
    "sve",
    "sve2",
    "i8mm",
    "bf16",
];

/// Peers with a display name, in column order; any other peer in the file follows these,
/// named by its key.
const KNOWN_PEERS: &[(&str, &str)] = &[("torch", "PyTorch"), ("onnxruntime", "ONNX Runtime")];

/// The host processor: model name and which of [`CPU_FLAGS`] it has.
pub struct HostCpu {
    pub model: String,
    /// `None` where /proc/cpuinfo cannot be read (not Linux): unknown, not "none".
    pub flags: Option<Vec<&'static str>>,
}

impl HostCpu {
    /// The model as the backend names it (`host_cpu_name`), the flags from /proc/cpuinfo
    /// (Linux; elsewhere unknown).
    pub fn read() -> HostCpu {
        let model = apparate::backend::cpu::host_cpu_name();
        let flags = std::fs::read_to_string("/proc/cpuinfo").ok().map(|info| {
            let have = info
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    matches!(k.trim(), "flags" | "Features").then(|| v.to_string())
                })
                .unwrap_or_default();
            let have: Vec<&str> = have.split_whitespace().collect();
            CPU_FLAGS
                .iter()
                .copied()
                .filter(|f| have.contains(f))
                .collect()
        });
        HostCpu { model, flags }
    }

    /// The same shape as the peers' `cpu` object: `{"model", "flags"}`.
    pub fn json(&self) -> Value {
        json!({"model": self.model, "flags": self.flags})
    }

    /// One line for the table's header: model, flags, and the micro-kernel level asked for.
    pub fn describe(&self) -> String {
        let flags = self
            .flags
            .as_ref()
            .map_or("unknown".to_string(), |f| f.join(" "));
        let simd = simd_env().unwrap_or_else(|| "unset (widest available)".into());
        format!("cpu: {}; flags: {flags}; APPARATE_SIMD: {simd}", self.model)
    }
}

/// `APPARATE_SIMD` when set: it forces the CPU backend's micro-kernels (avx512, avx2, generic),
/// so a result measured under it is not the default build's speed.
pub fn simd_env() -> Option<String> {
    std::env::var("APPARATE_SIMD").ok()
}

/// One peer's timings from the peers file.
struct Peer {
    key: String,
    label: String,
    version: Value,
    results: Vec<Value>,
}

/// The peers file (`--peers FILE`), or no peers.
#[derive(Default)]
pub struct Peers {
    path: Option<String>,
    cpu: Value,
    threads: Value,
    list: Vec<Peer>,
}

impl Peers {
    /// Reads `path` when given; no file means no peer columns.
    pub fn load(path: Option<&Path>) -> Result<Peers, String> {
        let Some(path) = path else {
            return Ok(Peers::default());
        };
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file: Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let Some(map) = file["peers"].as_object() else {
            return Err(format!(
                "{}: no `peers` object (written by tools/bench_*_peers.py?)",
                path.display()
            ));
        };
        let known = KNOWN_PEERS.iter().filter(|(k, _)| map.contains_key(*k));
        let others = map
            .keys()
            .filter(|k| !KNOWN_PEERS.iter().any(|(n, _)| n == k))
            .map(|k| (k.as_str(), k.as_str()));
        let list = known
            .copied()
            .chain(others)
            .map(|(key, label)| Peer {
                key: key.to_string(),
                label: label.to_string(),
                version: map[key]["version"].clone(),
                results: map[key]["results"].as_array().cloned().unwrap_or_default(),
            })
            .collect();
        Ok(Peers {
            path: Some(path.display().to_string()),
            cpu: file["cpu"].clone(),
            threads: file["threads"].clone(),
            list,
        })
    }

    /// A ratio across machines or thread counts means little: say so rather than refuse,
    /// since comparing on purpose (say, one thread against all) is legitimate.
    pub fn warn_if_not_comparable(&self, cpu: &HostCpu, threads: usize) {
        if self.list.is_empty() {
            return;
        }
        if self.cpu != cpu.json() {
            eprintln!(
                "note: the peers ran on {}, this is {}: ratios compare different CPUs",
                self.cpu,
                cpu.json()
            );
        }
        if self.threads.as_u64() != Some(threads as u64) {
            eprintln!(
                "note: the peers used {} threads, this run {threads}",
                self.threads
            );
        }
    }

    /// For each peer: `<peer>_median_ms` (its result that `matches`, or null) and
    /// `ratio_vs_<peer>` (ours / theirs: below 1 is faster than the peer) added to `row`.
    pub fn add_columns(&self, row: &mut Value, ours_ms: f64, matches: impl Fn(&Value) -> bool) {
        let Some(row) = row.as_object_mut() else {
            return;
        };
        for p in &self.list {
            let theirs = p
                .results
                .iter()
                .find(|r| matches(r))
                .and_then(|r| r["median_ms"].as_f64());
            row.insert(format!("{}_median_ms", p.key), json!(theirs));
            row.insert(
                format!("ratio_vs_{}", p.key),
                json!(theirs.map(|t| ours_ms / t)),
            );
        }
    }

    /// The peer columns' markdown header cells and alignment cells, each cell starting with `|`
    /// (the caller closes the line), so a table with no peers has no empty columns.
    pub fn header(&self) -> (String, String) {
        let names = self
            .list
            .iter()
            .map(|p| format!("| {0} median ms | ours / {0} ", p.label))
            .collect();
        (names, "|---:|---:".repeat(self.list.len()))
    }

    /// The peer columns' cells of one row (as [`Peers::add_columns`] filled it), each starting
    /// with `|`; "-" where the peer has no result for that row.
    pub fn cells(&self, row: &Value) -> String {
        self.list
            .iter()
            .map(|p| {
                let median = row[format!("{}_median_ms", p.key)]
                    .as_f64()
                    .map_or("-".into(), |v| format!("{v:.2}"));
                let ratio = row[format!("ratio_vs_{}", p.key)]
                    .as_f64()
                    .map_or("-".into(), |v| format!("{v:.2}x"));
                format!("| {median} | {ratio} ")
            })
            .collect()
    }

    /// One line for the table's header naming the peers, their versions and threads.
    pub fn describe(&self) -> Option<String> {
        if self.list.is_empty() {
            return None;
        }
        let names: Vec<String> = self
            .list
            .iter()
            .map(|p| format!("{} {}", p.label, p.version.as_str().unwrap_or("?")))
            .collect();
        Some(format!(
            "peers: {}, {} threads ({})",
            names.join(", "),
            self.threads,
            self.path.as_deref().unwrap_or("?")
        ))
    }

    /// What the results file records about the peers: the file, the CPU and threads they ran
    /// on, and each peer's version.
    pub fn json(&self) -> Value {
        if self.list.is_empty() {
            return Value::Null;
        }
        let mut m = Map::new();
        m.insert("file".into(), json!(self.path));
        m.insert("cpu".into(), self.cpu.clone());
        m.insert("threads".into(), self.threads.clone());
        for p in &self.list {
            m.insert(p.key.clone(), json!({"version": p.version}));
        }
        Value::Object(m)
    }
}

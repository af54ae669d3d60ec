//! `apparate serve --config serve.toml`: several models, each with its ramps, profile,
//! backend and batching, and the server's settings. Paths are relative to the file's folder.
//!
//! ```toml
//! addr = "0.0.0.0:8000"        # default 127.0.0.1:8000
//! grpc_addr = "0.0.0.0:8001"   # the gRPC form; default 127.0.0.1:8001, "off" for none
//! max_body_mib = 64            # default 64
//! max_connections = 1024       # default 1024
//! log_requests = false         # default false
//!
//! [[model]]
//! name = "sentiment"
//! path = "weights/minilm-l6-sentiment.apparate"
//! ramps = "weights/minilm-l6-sentiment.ramps"             # optional: the plain model without
//! profile = "weights/minilm-l6-sentiment.profile.json"    # optional
//! backend = "cpu"              # cpu (default), emu or cuda
//! threads = 2                  # cpu/emu worker threads; default all cores
//! dtype = "f32"                # emu/cuda storage dtype: f32 (default), f16, bf16
//! max_batch = 16               # default 16
//! queue_capacity = 1024        # default 1024
//! max_queue_wait_ms = 50       # optional: the queue's bound in time
//! timeout_ms = 200             # optional: deadline of requests that name none
//!
//! [[model]]                    # a decoder (a llama GGUF file): the generate extension
//! name = "smollm2"
//! path = "weights/smollm2-135m-instruct.q4_1.gguf"
//! max_batch = 16               # sequences decoded together per step
//! max_tokens = 256             # default 256: tokens generated when a request names none
//! kv_cache_mib = 256           # default 256: the key/value cache's memory
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{ConnectionLimits, ServerConfig};
use crate::error::{Error, Result};
use crate::select::BackendChoice;
use crate::serve::config::{BatchingConfig, duration_from_millis};
use crate::tensor::DType;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeFile {
    #[serde(default = "default_addr")]
    pub addr: String,
    #[serde(default = "default_grpc_addr")]
    pub grpc_addr: String,
    #[serde(default = "default_body_mib")]
    pub max_body_mib: usize,
    #[serde(default = "default_connections")]
    pub max_connections: usize,
    #[serde(default)]
    pub log_requests: bool,
    #[serde(rename = "model")]
    pub models: Vec<ModelEntry>,
}

/// One `[[model]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub name: String,
    pub path: PathBuf,
    pub ramps: Option<PathBuf>,
    pub profile: Option<PathBuf>,
    #[serde(default = "default_backend")]
    pub backend: String,
    pub threads: Option<usize>,
    #[serde(default = "default_dtype")]
    pub dtype: String,
    #[serde(default = "default_batch")]
    pub max_batch: usize,
    #[serde(default = "default_queue")]
    pub queue_capacity: usize,
    pub max_queue_wait_ms: Option<f64>,
    pub timeout_ms: Option<f64>,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    #[serde(default = "default_kv_cache_mib")]
    pub kv_cache_mib: usize,
}

fn default_addr() -> String {
    "127.0.0.1:8000".into()
}
fn default_grpc_addr() -> String {
    "127.0.0.1:8001".into()
}
fn default_body_mib() -> usize {
    64
}
fn default_connections() -> usize {
    1024
}
fn default_max_tokens() -> usize {
    256
}
fn default_kv_cache_mib() -> usize {
    256
}
fn default_backend() -> String {
    "cpu".into()
}
fn default_dtype() -> String {
    "f32".into()
}
fn default_batch() -> usize {
    BatchingConfig::default().max_batch_size
}
fn default_queue() -> usize {
    BatchingConfig::default().queue_capacity
}

/// A model entry checked and resolved: what the engine builder needs.
#[derive(Debug)]
pub struct ModelPlan {
    pub name: String,
    pub path: PathBuf,
    pub ramps: Option<PathBuf>,
    pub profile: Option<PathBuf>,
    pub backend: BackendChoice,
    pub batching: BatchingConfig,
    pub default_timeout: Option<Duration>,
    /// Decoders: tokens generated when a request names no `max_tokens`.
    pub max_tokens: usize,
    /// Decoders: the key/value cache's memory, MiB.
    pub kv_cache_mib: usize,
}

impl ServeFile {
    /// Reads and checks `path`: every error names the file and what is wrong.
    pub fn load(path: &Path) -> Result<ServeFile> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let f: ServeFile = toml::from_str(&text).map_err(|e| Error::format(path, e.to_string()))?;
        if f.models.is_empty() {
            return Err(Error::format(path, "no [[model]] table"));
        }
        for (i, m) in f.models.iter().enumerate() {
            if m.name.is_empty()
                || !m
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(Error::format(
                    path,
                    format!(
                        "model name {:?}: use letters, digits, '-', '_' and '.' (it is a URL part)",
                        m.name
                    ),
                ));
            }
            if f.models[..i].iter().any(|o| o.name == m.name) {
                return Err(Error::format(path, format!("model {:?} twice", m.name)));
            }
        }
        Ok(f)
    }

    /// The server's settings.
    pub fn server_config(&self) -> Result<ServerConfig> {
        if self.max_body_mib == 0 || self.max_body_mib > 4096 {
            return Err(Error::config("max_body_mib", self.max_body_mib, "1..=4096"));
        }
        if self.max_connections == 0 || self.max_connections > 1 << 20 {
            return Err(Error::config(
                "max_connections",
                self.max_connections,
                "1..=1048576",
            ));
        }
        Ok(ServerConfig {
            max_body_bytes: self.max_body_mib << 20,
            connections: ConnectionLimits {
                max_connections: self.max_connections,
                ..ConnectionLimits::default()
            },
            log_requests: self.log_requests,
            ..ServerConfig::default()
        })
    }

    /// Each model's plan, with paths taken relative to `base` (the file's folder).
    pub fn plans(&self, base: &Path) -> Result<Vec<ModelPlan>> {
        let at = |p: &PathBuf| {
            if p.is_absolute() {
                p.clone()
            } else {
                base.join(p)
            }
        };
        self.models
            .iter()
            .map(|m| {
                let knob = |k: &str| format!("model {}: {k}", m.name);
                let dtype = match m.dtype.as_str() {
                    "f32" => DType::F32,
                    "f16" => DType::F16,
                    "bf16" => DType::BF16,
                    other => return Err(Error::config(knob("dtype"), other, "f32, f16 or bf16")),
                };
                let backend = match (m.backend.as_str(), m.threads) {
                    ("cpu", threads) => BackendChoice::Cpu { threads },
                    ("emu", threads) => BackendChoice::Emu { threads, dtype },
                    ("cuda", None) => BackendChoice::Cuda { dtype },
                    ("cuda", Some(t)) => {
                        return Err(Error::config(
                            knob("threads"),
                            t,
                            "the cpu and emu backends (cuda has no worker threads)",
                        ));
                    }
                    (other, _) => {
                        return Err(Error::config(knob("backend"), other, "cpu, emu or cuda"));
                    }
                };
                // Waits and deadlines of 0 would refuse or expire every request.
                let ms = |k: &str, v: Option<f64>| match v {
                    Some(ms) if ms <= 0.0 => Err(Error::config(knob(k), ms, "above 0 ms")),
                    v => v.map(|ms| duration_from_millis(&knob(k), ms)).transpose(),
                };
                let batching = BatchingConfig {
                    max_batch_size: m.max_batch,
                    queue_capacity: m.queue_capacity,
                    max_queue_wait: ms("max_queue_wait_ms", m.max_queue_wait_ms)?,
                    ..BatchingConfig::default()
                };
                batching
                    .validate()
                    .map_err(|e| Error::Input(format!("model {}: {e}", m.name)))?;
                if !(1..=1 << 20).contains(&m.max_tokens) {
                    return Err(Error::config(
                        knob("max_tokens"),
                        m.max_tokens,
                        "1..=1048576",
                    ));
                }
                if !(1..=1 << 20).contains(&m.kv_cache_mib) {
                    return Err(Error::config(
                        knob("kv_cache_mib"),
                        m.kv_cache_mib,
                        "1..=1048576",
                    ));
                }
                Ok(ModelPlan {
                    name: m.name.clone(),
                    path: at(&m.path),
                    ramps: m.ramps.as_ref().map(at),
                    profile: m.profile.as_ref().map(at),
                    backend,
                    batching,
                    default_timeout: ms("timeout_ms", m.timeout_ms)?,
                    max_tokens: m.max_tokens,
                    kv_cache_mib: m.kv_cache_mib,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ServeFile> {
        let dir = std::env::temp_dir().join(format!("apparate-serve-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("{}.toml", text.len()));
        std::fs::write(&p, text).unwrap();
        let r = ServeFile::load(&p);
        let _ = std::fs::remove_file(&p);
        r
    }

    #[test]
    fn a_file_with_two_models_and_defaults() {
        let f = parse(
            r#"
addr = "0.0.0.0:9000"
[[model]]
name = "sentiment"
path = "m/a.apparate"
ramps = "m/a.ramps"
threads = 2
max_queue_wait_ms = 50
timeout_ms = 200
[[model]]
name = "digits"
path = "/abs/b.apparate"
backend = "emu"
dtype = "bf16"
"#,
        )
        .unwrap();
        assert_eq!(f.addr, "0.0.0.0:9000");
        let c = f.server_config().unwrap();
        assert_eq!(c.max_body_bytes, 64 << 20);
        let p = f.plans(Path::new("/srv")).unwrap();
        assert_eq!(p[0].path, PathBuf::from("/srv/m/a.apparate"));
        assert_eq!(p[0].ramps, Some(PathBuf::from("/srv/m/a.ramps")));
        assert_eq!(
            p[0].batching.max_queue_wait,
            Some(Duration::from_millis(50))
        );
        assert_eq!(p[0].default_timeout, Some(Duration::from_millis(200)));
        assert!(matches!(
            p[0].backend,
            BackendChoice::Cpu { threads: Some(2) }
        ));
        assert_eq!(p[1].path, PathBuf::from("/abs/b.apparate"));
        assert!(matches!(
            p[1].backend,
            BackendChoice::Emu {
                threads: None,
                dtype: DType::BF16
            }
        ));
    }

    #[test]
    fn mistakes_are_named() {
        let one =
            |extra: &str| format!("[[model]]\nname = \"m\"\npath = \"a.apparate\"\n{extra}\n");
        let err = |text: &str| match parse(text) {
            Err(e) => e.to_string(),
            Ok(f) => match f.server_config().and_then(|_| f.plans(Path::new("."))) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("accepted: {text}"),
            },
        };
        assert!(err("addr = 1").contains("addr"));
        assert!(err("").contains("model"));
        assert!(err(&one("colour = \"red\"")).contains("colour"));
        assert!(err(&one("backend = \"tpu\"")).contains("backend"));
        assert!(err(&one("backend = \"cuda\"\nthreads = 2")).contains("threads"));
        assert!(err(&one("dtype = \"f64\"")).contains("dtype"));
        assert!(err(&one("max_batch = 0")).contains("max_batch_size"));
        assert!(err(&one("timeout_ms = -1")).contains("timeout_ms"));
        assert!(err(&one("timeout_ms = 0")).contains("timeout_ms"));
        assert!(err(&one("timeout_ms = 1e30")).contains("timeout_ms"));
        assert!(err(&format!("max_body_mib = 0\n{}", one(""))).contains("max_body_mib"));
        assert!(err(&format!("{}{}", one(""), one(""))).contains("twice"));
        assert!(err("[[model]]\nname = \"a/b\"\npath = \"x\"").contains("URL"));
    }
}

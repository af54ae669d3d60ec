//! `apparate serve`: models behind the Open Inference Protocol (KServe v2), over HTTP/REST and
//! gRPC.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use apparate::backend::decoder::DecoderBackend;
use apparate::error::{Error, Result};
use apparate::format::ModelFile;
use apparate::generation::{self, EngineConfig, LanguageModel};
use apparate::models::llama::KvCacheConfig;
use apparate::select::{DecoderJob, with_decoder_backend};
use apparate::serve::Engine;
use apparate::serve::config::{BatchingConfig, duration_from_millis};
use apparate::server::config::{ModelPlan, ServeFile};
use apparate::server::{ConnectionLimits, Generator, Model, Server, ServerConfig};
use clap::Args;

use super::DeviceArgs;

#[derive(Args)]
pub struct ServeArgs {
    /// The model file to serve (or --config for several).
    #[arg(
        short,
        long,
        required_unless_present = "config",
        conflicts_with = "config"
    )]
    model: Option<PathBuf>,
    /// A TOML file naming several models, each with its ramps, profile, backend and batching,
    /// and the server's settings (docs/deploy.md shows one); the other flags then do not
    /// apply, but for --http-threads.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Its name in URLs (/v2/models/NAME); default: the file name without extension.
    #[arg(long)]
    name: Option<String>,
    /// Its ramps file (without one the plain model answers).
    #[arg(long)]
    ramps: Option<PathBuf>,
    /// Its profile (`apparate profile`), for the ramps' costs.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Address of the REST form (HTTP/1.1).
    #[arg(long, default_value = "127.0.0.1:8000")]
    addr: String,
    /// Address of the gRPC form (service inference.GRPCInferenceService); "off" for none.
    #[arg(long, default_value = "127.0.0.1:8001")]
    grpc_addr: String,
    /// Largest request body read, in MiB (larger: 413).
    #[arg(long, default_value_t = 64)]
    max_body_mib: usize,
    /// Deadline of requests that name none (their `timeout` parameter), in milliseconds;
    /// one still queued then is answered 504. Default: none.
    #[arg(long)]
    timeout_ms: Option<f64>,
    /// Most open connections; more are closed as soon as they are accepted.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Threads that run the network side (HTTP and gRPC parsing, JSON, the tokio runtime),
    /// beside the engines' own compute threads. Default: one per core.
    #[arg(long)]
    http_threads: Option<usize>,
    /// One JSON line per inference request on standard error (model, id, status, items, ms,
    /// error).
    #[arg(long)]
    log_requests: bool,
    /// The queue's bound in time, in milliseconds: while its oldest request has waited this
    /// long, new requests get 429 at once. Default: none (only --queue-capacity bounds it).
    #[arg(long)]
    max_queue_wait_ms: Option<f64>,
    /// Most requests per batch.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Most requests waiting; more are answered 429 at once.
    #[arg(long, default_value_t = 1024)]
    queue_capacity: usize,
    /// Decoders: tokens generated when a request names no max_tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Decoders: memory of the key/value cache, MiB.
    #[arg(long, default_value_t = 256)]
    kv_cache_mib: usize,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let (plans, cfg, addr, grpc_addr) = match &a.config {
        Some(path) => {
            let f = ServeFile::load(path)?;
            let base = path.parent().unwrap_or(Path::new("."));
            let (addr, grpc) = (f.addr.clone(), f.grpc_addr.clone());
            (f.plans(base)?, f.server_config()?, addr, grpc)
        }
        None => {
            let (plans, cfg, addr) = from_flags(&a)?;
            (plans, cfg, addr, a.grpc_addr.clone())
        }
    };
    let grpc_addr = (grpc_addr != "off").then_some(grpc_addr);
    if let Some(n) = a.http_threads
        && !(1..=1024).contains(&n)
    {
        return Err(Error::config("--http-threads", n, "1..=1024"));
    }
    if !(1..=1 << 20).contains(&a.max_tokens) {
        return Err(Error::config("--max-tokens", a.max_tokens, "1..=1048576"));
    }
    if !(1..=1 << 20).contains(&a.kv_cache_mib) {
        return Err(Error::config(
            "--kv-cache-mib",
            a.kv_cache_mib,
            "1..=1048576",
        ));
    }
    let mut models = Vec::with_capacity(plans.len());
    let mut generators = Vec::new();
    for p in plans {
        let t0 = Instant::now();
        if is_decoder(&p.path) {
            let choice = p.backend.clone();
            let g = with_decoder_backend(&choice, StartGenerator(p))?;
            eprintln!(
                "model {} (text generation) ready in {:.1} s",
                g.name,
                t0.elapsed().as_secs_f64()
            );
            generators.push(g);
            continue;
        }
        let mut builder = Engine::builder(&p.path)
            .backend(p.backend)
            .batching(p.batching)
            .log(|s| eprintln!("{s}"));
        if let Some(r) = &p.ramps {
            builder = builder.ramps(r);
        }
        if let Some(pr) = &p.profile {
            builder = builder.profile(pr);
        }
        let engine = Arc::new(builder.build()?);
        eprintln!(
            "model {} ready in {:.1} s on {}",
            p.name,
            t0.elapsed().as_secs_f64(),
            engine.device()
        );
        models.push(Model {
            name: p.name,
            engine,
            default_timeout: p.default_timeout,
        });
    }
    let server = Server::with_generators(models, generators, cfg);
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = a.http_threads {
        rt.worker_threads(n);
    }
    let rt = rt.enable_all().build().map_err(|e| Error::Io {
        path: "tokio runtime".into(),
        source: e,
    })?;
    rt.block_on(async {
        let bind = |addr: String| async move {
            tokio::net::TcpListener::bind(&addr)
                .await
                .map_err(|e| Error::Io {
                    path: addr.into(),
                    source: e,
                })
        };
        let rest = bind(addr.clone()).await?;
        let grpc = match &grpc_addr {
            Some(g) => Some(bind(g.clone()).await?),
            None => None,
        };
        // The bound addresses (a port of 0 picks a free one).
        let shown = |l: &tokio::net::TcpListener, asked: &str| {
            l.local_addr()
                .map_or_else(|_| asked.to_string(), |a| a.to_string())
        };
        eprintln!(
            "listening on http://{} (KServe v2 REST; SIGTERM or Ctrl-C stops)",
            shown(&rest, &addr)
        );
        if let (Some(l), Some(g)) = (&grpc, &grpc_addr) {
            eprintln!("listening on {} (KServe v2 gRPC)", shown(l, g));
        }
        // One signal stops both listeners.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
        let io = |addr: &str| {
            let addr = addr.to_string();
            move |e| Error::Io {
                path: addr.into(),
                source: e,
            }
        };
        let rest = server.serve(rest, stopped());
        match grpc {
            Some(g) => {
                let grpc = server.serve_grpc(g, stopped());
                let (r, g) = tokio::join!(rest, grpc);
                r.map_err(io(&addr))?;
                g.map_err(io(grpc_addr.as_deref().unwrap_or("")))
            }
            None => rest.await.map_err(io(&addr)),
        }
    })?;
    eprintln!("stopped: every request in flight was answered");
    Ok(())
}

/// Whether `path` is a decoder: a GGUF file or a model file of the llama family.
fn is_decoder(path: &Path) -> bool {
    generation::is_gguf(path)
        || ModelFile::open(path)
            .is_ok_and(|f| matches!(f.meta().family, apparate::format::Family::Llama(_)))
}

/// Loads a decoder and starts its generation engine on the chosen backend.
struct StartGenerator(ModelPlan);

impl DecoderJob for StartGenerator {
    type Output = Generator;
    fn run<B: DecoderBackend + 'static>(self, be: B, what: String) -> Result<Generator> {
        let p = self.0;
        let lm = LanguageModel::open(be, &p.path)?;
        eprintln!("model {}: {} on the {what}", p.name, p.path.display());
        let cfg = EngineConfig {
            max_running: p.batching.max_batch_size,
            queue_capacity: p.batching.queue_capacity,
            kv: KvCacheConfig {
                budget_bytes: p.kv_cache_mib << 20,
                ..KvCacheConfig::default()
            },
            ..EngineConfig::default()
        };
        let mut g = Generator::new(p.name, lm, cfg, p.max_tokens)?;
        g.default_timeout = p.default_timeout;
        Ok(g)
    }
}

/// SIGTERM (Kubernetes) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("shutting down: no new connections, answering what is in flight");
}

/// One model from the command-line flags.
fn from_flags(a: &ServeArgs) -> Result<(Vec<ModelPlan>, ServerConfig, String)> {
    if a.max_connections == 0 || a.max_connections > 1 << 20 {
        return Err(Error::config(
            "--max-connections",
            a.max_connections,
            "1..=1048576",
        ));
    }
    if a.max_body_mib == 0 || a.max_body_mib > 4096 {
        return Err(Error::config("--max-body-mib", a.max_body_mib, "1..=4096"));
    }
    let model = a
        .model
        .clone()
        .expect("clap requires --model without --config");
    let name = match &a.name {
        Some(n) => n.clone(),
        None => model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into()),
    };
    let plan = ModelPlan {
        name,
        path: model,
        ramps: a.ramps.clone(),
        profile: a.profile.clone(),
        backend: a.device.choice()?,
        batching: BatchingConfig {
            max_batch_size: a.max_batch,
            queue_capacity: a.queue_capacity,
            max_queue_wait: a
                .max_queue_wait_ms
                .map(|ms| duration_from_millis("--max-queue-wait-ms", ms))
                .transpose()?,
            ..BatchingConfig::default()
        },
        default_timeout: None,
        max_tokens: a.max_tokens,
        kv_cache_mib: a.kv_cache_mib,
    };
    let cfg = ServerConfig {
        max_body_bytes: a.max_body_mib << 20,
        default_timeout: match a.timeout_ms {
            Some(ms) if ms <= 0.0 => {
                return Err(Error::config("--timeout-ms", ms, "above 0 ms"));
            }
            ms => ms
                .map(|ms| duration_from_millis("--timeout-ms", ms))
                .transpose()?,
        },
        connections: ConnectionLimits {
            max_connections: a.max_connections,
            ..ConnectionLimits::default()
        },
        log_requests: a.log_requests,
        ..ServerConfig::default()
    };
    Ok((vec![plan], cfg, a.addr.clone()))
}

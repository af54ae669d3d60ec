//! `apparate serve`: the engine behind the Open Inference Protocol (KServe v2) over HTTP/REST,
//! on axum. Health (`/v2/health/live`, `/v2/health/ready`), server and model metadata
//! (`/v2`, `/v2/models/{name}`), model readiness (`/v2/models/{name}/ready`), inference
//! (`POST /v2/models/{name}/infer`) with Triton's classification parameter, and the engine's
//! Prometheus metrics (`/metrics`).
//!
//! Semantics a serving stack relies on: bodies above [`ServerConfig::max_body_bytes`] are
//! refused with 413 before they are read; a full queue is answered at once with 429 and
//! `Retry-After`; a request's deadline (its `timeout` parameter in microseconds, as Triton
//! reads it, or the model's default) drops it from the queue with 504 if it has not started;
//! a client that goes away cancels its queued requests (the handler's future is dropped, and
//! with it the engine's); a body slower than [`ServerConfig::body_timeout`] gets 408; the
//! accept loop (`listen.rs`) bounds connections and closes those whose request head does not
//! come in time; on shutdown the server stops accepting, reports not ready, and answers what is
//! in flight before it returns.

pub mod config;
mod generate;
pub mod grpc;
mod infer;
mod listen;
pub mod v2;

pub use generate::Generator;
pub use listen::ConnectionLimits;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value};

use crate::serve::{Engine, InputSpec, ServeError};
use infer::{Answer, Call, Column, Elements, InputTensor, input_name};
use v2::*;

/// Settings of the HTTP server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Largest request body read, in bytes; larger ones get 413. Default 64 MiB: a batch of
    /// a few dozen 224x224 images as JSON numbers fits.
    pub max_body_bytes: usize,
    /// Deadline of a request that names none, measured from its arrival. Default `None`.
    pub default_timeout: Option<Duration>,
    /// Longest wait for a request's body once its head is in; then 408. Default 30 s (a body
    /// shorter than its declared length would otherwise hold the connection for ever).
    pub body_timeout: Duration,
    /// Connections kept and how long a request head may take.
    pub connections: ConnectionLimits,
    /// One JSON line per inference request on standard error (model, request id, status,
    /// items, milliseconds, error). Default off.
    pub log_requests: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_body_bytes: 64 << 20,
            default_timeout: None,
            body_timeout: Duration::from_secs(30),
            connections: ConnectionLimits::default(),
            log_requests: false,
        }
    }
}

/// A model the server answers for.
pub struct Model {
    pub name: String,
    pub engine: Arc<Engine>,
    /// Deadline of its requests that name none; `None`: the server's
    /// [`ServerConfig::default_timeout`].
    pub default_timeout: Option<Duration>,
}

/// One model's counts of inference requests at the HTTP level, for Triton's metric names.
#[derive(Default)]
struct RequestCounts {
    success: AtomicU64,
    /// Failures by Triton's reasons: REJECTED (429), BACKEND (500), OTHER (the rest).
    failure: [AtomicU64; 3],
    /// Summed duration of the successful ones, microseconds.
    success_us: AtomicU64,
}

const FAILURE_REASONS: [&str; 3] = ["REJECTED", "BACKEND", "OTHER"];

pub(crate) struct AppState {
    models: Vec<Model>,
    generators: Vec<Arc<Generator>>,
    /// Per model name, classifiers and generators.
    counts: Vec<(String, RequestCounts)>,
    cfg: ServerConfig,
    /// False from the start of a shutdown on: readiness answers 503.
    accepting: AtomicBool,
    /// Turns true when a shutdown starts: open gRPC streams stop taking requests.
    stopping: tokio::sync::watch::Sender<bool>,
    /// Image files decoded at once (one per core).
    decode_slots: Arc<tokio::sync::Semaphore>,
}

/// The server: its routes, over whatever listener [`Server::serve`] is given.
#[derive(Clone)]
pub struct Server {
    state: Arc<AppState>,
}

/// An error answer: a status and `{"error": "..."}`.
#[derive(Debug)]
pub(crate) struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.0, axum::Json(ErrorBody { error: self.1 })).into_response();
        if self.0 == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

impl From<ServeError> for ApiError {
    fn from(e: ServeError) -> ApiError {
        let status = match &e {
            ServeError::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            ServeError::BadInput(_) => StatusCode::BAD_REQUEST,
            ServeError::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            ServeError::ShutDown(_) | ServeError::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
            ServeError::Backend(_) | ServeError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl Server {
    /// A server for classification models.
    pub fn new(models: Vec<Model>, cfg: ServerConfig) -> Server {
        Server::with_generators(models, Vec::new(), cfg)
    }

    /// A server for classification models and decoder models (the generate extension). Names
    /// are looked up among the generators first; give every model its own.
    pub fn with_generators(
        models: Vec<Model>,
        generators: Vec<Generator>,
        cfg: ServerConfig,
    ) -> Server {
        let counts = models
            .iter()
            .map(|m| m.name.clone())
            .chain(generators.iter().map(|g| g.name.clone()))
            .map(|n| (n, RequestCounts::default()))
            .collect();
        Server {
            state: Arc::new(AppState {
                models,
                generators: generators.into_iter().map(Arc::new).collect(),
                counts,
                cfg,
                accepting: AtomicBool::new(true),
                stopping: tokio::sync::watch::channel(false).0,
                decode_slots: Arc::new(tokio::sync::Semaphore::new(
                    std::thread::available_parallelism().map_or(1, |n| n.get()),
                )),
            }),
        }
    }

    /// The routes, for embedding in a larger axum application.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v2", get(server_meta))
            .route("/v2/health/live", get(live))
            .route("/v2/health/ready", get(ready))
            .route("/v2/models/{name}", get(model_meta))
            .route("/v2/models/{name}/ready", get(model_ready))
            .route("/v2/models/{name}/infer", post(infer))
            .route("/v2/models/{name}/generate", post(generate::generate))
            .route(
                "/v2/models/{name}/generate_stream",
                post(generate::generate_stream),
            )
            .route("/metrics", get(metrics))
            .layer(DefaultBodyLimit::max(self.state.cfg.max_body_bytes))
            .with_state(self.state.clone())
    }

    /// Serves the REST form on `listener` until `shutdown` completes, then stops accepting,
    /// turns not ready and returns once every request in flight is answered.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let app = listen::App::Rest(self.router());
        self.serve_app(listener, app, shutdown).await
    }

    /// Serves the gRPC form (service `inference.GRPCInferenceService`, HTTP/2 without TLS) on
    /// `listener`, as [`Server::serve`] serves the REST form; run both on one `Server` for
    /// both protocols (a shutdown of either turns the whole server not ready).
    pub async fn serve_grpc(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let app = listen::App::Grpc(grpc::service(self.state.clone()));
        self.serve_app(listener, app, shutdown).await
    }

    async fn serve_app(
        &self,
        listener: tokio::net::TcpListener,
        app: listen::App,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let state = self.state.clone();
        listen::serve(listener, app, self.state.cfg.connections, async move {
            shutdown.await;
            state.accepting.store(false, Ordering::SeqCst);
            state.stopping.send_replace(true);
        })
        .await
    }
}

impl AppState {
    fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::SeqCst)
    }

    /// Completes when a shutdown has started.
    async fn stopping(&self) {
        let mut rx = self.stopping.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    fn is_ready(&self) -> bool {
        self.is_accepting() && self.models.iter().all(|m| m.engine.is_ready())
    }

    fn not_found(&self, name: &str) -> ApiError {
        ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "no model named {name:?} (this server has: {})",
                self.counts
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    }

    /// Whether a model of either kind is called `name`.
    fn find_any(&self, name: &str) -> Result<(), ApiError> {
        if self.counts.iter().any(|(n, _)| n == name) {
            Ok(())
        } else {
            Err(self.not_found(name))
        }
    }

    /// The classification model `name`.
    fn model(&self, name: &str) -> Result<&Model, ApiError> {
        if self.generators.iter().any(|g| g.name == name) {
            return Err(bad(format!(
                "model {name:?} generates text: POST /v2/models/{name}/generate \
                 (or generate_stream)"
            )));
        }
        self.models
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| self.not_found(name))
    }

    /// The decoder model `name`.
    fn generator(&self, name: &str) -> Result<&Arc<Generator>, ApiError> {
        if let Some(g) = self.generators.iter().find(|g| g.name == name) {
            return Ok(g);
        }
        if self.models.iter().any(|m| m.name == name) {
            return Err(bad(format!(
                "model {name:?} classifies: POST /v2/models/{name}/infer"
            )));
        }
        Err(self.not_found(name))
    }

    /// Whether model `name` (either kind) takes requests.
    fn model_is_ready(&self, name: &str) -> Result<bool, ApiError> {
        if self.generators.iter().any(|g| g.name == name) {
            return Ok(self.is_accepting());
        }
        Ok(self.is_accepting() && self.model(name)?.engine.is_ready())
    }

    /// Model `name`'s metadata (either kind).
    fn metadata(&self, name: &str) -> Result<ModelMeta, ApiError> {
        let (inputs, outputs) = if self.generators.iter().any(|g| g.name == name) {
            let text = |name| TensorMeta {
                name,
                datatype: "BYTES",
                shape: vec![1],
            };
            (vec![text("text_input")], vec![text("text_output")])
        } else {
            let m = self.model(name)?;
            (
                vec![input_meta(m.engine.input_spec())],
                Column::ALL
                    .iter()
                    .map(|c| TensorMeta {
                        name: c.name(),
                        datatype: c.datatype(),
                        shape: vec![-1],
                    })
                    .collect(),
            )
        };
        Ok(ModelMeta {
            name: name.to_string(),
            versions: vec!["1".into()],
            platform: "apparate",
            inputs,
            outputs,
        })
    }
}

/// The server's name, version and the protocol extensions it speaks.
fn server_metadata() -> ServerMeta {
    ServerMeta {
        name: "apparate",
        version: env!("CARGO_PKG_VERSION"),
        extensions: vec!["classification", "binary_tensor_data", "generate"],
    }
}

async fn server_meta() -> axum::Json<ServerMeta> {
    axum::Json(server_metadata())
}

async fn live() -> StatusCode {
    StatusCode::OK
}

async fn ready(State(s): State<Arc<AppState>>) -> StatusCode {
    if s.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn model_ready(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    Ok(if s.model_is_ready(&name)? {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    })
}

fn input_meta(spec: InputSpec) -> TensorMeta {
    match spec {
        InputSpec::Text => TensorMeta {
            name: input_name(spec),
            datatype: "BYTES",
            shape: vec![-1],
        },
        InputSpec::Image {
            height,
            width,
            channels,
        } => TensorMeta {
            name: input_name(spec),
            datatype: "UINT8",
            shape: vec![-1, height as i64, width as i64, channels as i64],
        },
    }
}

async fn model_meta(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<axum::Json<ModelMeta>, ApiError> {
    s.metadata(&name).map(axum::Json)
}

async fn metrics(State(s): State<Arc<AppState>>) -> String {
    let counts = |name: &str| {
        &s.counts
            .iter()
            .find(|(n, _)| n == name)
            .expect("every model has counts")
            .1
    };
    let mut per_model: Vec<(&str, String)> = s
        .models
        .iter()
        .map(|m| {
            let mut text = m.engine.metrics().render_prometheus();
            // Plus the queue's depth, the autoscaling signal of docs/deploy.md.
            text.push_str(&format!(
                "# HELP apparate_queue_depth Requests waiting for a batch.\n\
                 # TYPE apparate_queue_depth gauge\n\
                 apparate_queue_depth {}\n",
                m.engine.queued()
            ));
            let met = m.engine.metrics();
            text.push_str(&triton_metrics(
                counts(&m.name),
                met.answered(),
                met.batches(),
                Some(m.engine.queued() as u64),
            ));
            (m.name.as_str(), text)
        })
        .collect();
    for g in &s.generators {
        let st = g.stats();
        let mut text = generator_metrics(&st);
        text.push_str(&triton_metrics(
            counts(&g.name),
            st.completed,
            st.steps,
            None,
        ));
        per_model.push((g.name.as_str(), text));
    }
    with_model_labels(&per_model)
}

/// A generation engine's counters.
fn generator_metrics(st: &crate::generation::EngineStats) -> String {
    use std::fmt::Write as _;
    let mut t = String::new();
    for (name, kind, help, v) in [
        (
            "apparate_generation_steps_total",
            "counter",
            "Steps (one forward over every running sequence's rows).",
            st.steps,
        ),
        (
            "apparate_generation_decode_tokens_total",
            "counter",
            "Tokens decoded (one row per running sequence per step).",
            st.decode_rows,
        ),
        (
            "apparate_generation_prefill_tokens_total",
            "counter",
            "Prompt tokens fed.",
            st.prefill_rows,
        ),
        (
            "apparate_generation_completed_total",
            "counter",
            "Generations that finished.",
            st.completed,
        ),
        (
            "apparate_generation_cancelled_total",
            "counter",
            "Generations cancelled (the client went away).",
            st.cancelled,
        ),
        (
            "apparate_generation_rejected_total",
            "counter",
            "Requests refused by a full queue.",
            st.rejected,
        ),
        (
            "apparate_generation_failed_total",
            "counter",
            "Generations that failed.",
            st.failed,
        ),
        (
            "apparate_generation_cache_free_blocks",
            "gauge",
            "Key/value cache blocks free.",
            st.free_blocks as u64,
        ),
        (
            "apparate_generation_cache_blocks",
            "gauge",
            "Key/value cache blocks in all.",
            st.cache_blocks as u64,
        ),
    ] {
        let _ = writeln!(t, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
    t
}

/// Triton's names for what means the same here (so dashboards and autoscalers built for Triton
/// read them): HTTP inference requests that succeeded and failed (by reason) and their summed
/// duration, inferences (items answered, generations completed), model executions (batches,
/// generation steps) and items waiting.
fn triton_metrics(
    c: &RequestCounts,
    inferences: u64,
    executions: u64,
    pending: Option<u64>,
) -> String {
    use std::fmt::Write as _;
    let mut t = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(t, "# HELP {name} {help}");
        let _ = writeln!(t, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(t, "{name}{{{labels}version=\"1\"}} {v}");
        }
    };
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
    family(
        "nv_inference_request_success",
        "counter",
        "Number of successful inference requests, all batch sizes",
        &[("", ld(&c.success))],
    );
    let reasons: Vec<(String, u64)> = FAILURE_REASONS
        .iter()
        .zip(&c.failure)
        .map(|(r, n)| (format!("reason=\"{r}\","), ld(n)))
        .collect();
    let reasons: Vec<(&str, u64)> = reasons.iter().map(|(l, n)| (l.as_str(), *n)).collect();
    family(
        "nv_inference_request_failure",
        "counter",
        "Number of failed inference requests, all batch sizes",
        &reasons,
    );
    family(
        "nv_inference_count",
        "counter",
        "Number of inferences performed",
        &[("", inferences)],
    );
    family(
        "nv_inference_exec_count",
        "counter",
        "Number of model executions performed",
        &[("", executions)],
    );
    family(
        "nv_inference_request_duration_us",
        "counter",
        "Cumulative inference request duration in microseconds",
        &[("", ld(&c.success_us))],
    );
    if let Some(pending) = pending {
        family(
            "nv_inference_pending_request_count",
            "gauge",
            "Instantaneous number of pending requests awaiting execution per-model",
            &[("", pending)],
        );
    }
    t
}

/// Several engines' Prometheus texts as one exposition: each sample gains a `model` label,
/// and each metric family's HELP and TYPE lines appear once, before all models' samples.
fn with_model_labels(per_model: &[(&str, String)]) -> String {
    // Families in first-seen order: (name, header lines, sample lines).
    let mut families: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    for (model, text) in per_model {
        let label = format!(
            "model=\"{}\"",
            model.replace('\\', "\\\\").replace('"', "\\\"")
        );
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line
                .strip_prefix("# HELP ")
                .or_else(|| line.strip_prefix("# TYPE "))
            {
                current = rest.split_whitespace().next().unwrap_or("").to_string();
                let i = match families.iter().position(|f| f.0 == current) {
                    Some(i) => i,
                    None => {
                        families.push((current.clone(), Vec::new(), Vec::new()));
                        families.len() - 1
                    }
                };
                if !families[i].1.iter().any(|h| h == line) {
                    families[i].1.push(line.to_string());
                }
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let sample = match line.find('{') {
                Some(b) if line[..b].chars().all(|c| !c.is_whitespace()) => {
                    format!("{}{{{label},{}", &line[..b], &line[b + 1..])
                }
                _ => match line.split_once(' ') {
                    Some((name, value)) => format!("{name}{{{label}}} {value}"),
                    None => continue,
                },
            };
            match families.iter_mut().find(|f| f.0 == current) {
                Some(f) => f.2.push(sample),
                None => families.push((current.clone(), Vec::new(), vec![sample])),
            }
        }
    }
    let mut out = String::new();
    for (_, headers, samples) in families {
        for l in headers.iter().chain(&samples) {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// The whole body, within the size limit (413) and the body timeout (408).
async fn read_body(request: axum::extract::Request, cfg: &ServerConfig) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body over the limit of {} bytes",
                cfg.max_body_bytes
            ),
        )
    };
    // A declared length over the limit is refused before a byte of the body is read.
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > cfg.max_body_bytes as u64) {
        return Err(too_large());
    }
    let read = axum::body::to_bytes(request.into_body(), cfg.max_body_bytes);
    match tokio::time::timeout(cfg.body_timeout, read).await {
        Err(_) => Err(ApiError(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {:.0} s",
                cfg.body_timeout.as_secs_f64()
            ),
        )),
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => {
            // The limit's own error type sits under axum's; anything else is a broken body.
            let over = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            Err(if over {
                too_large()
            } else {
                bad(format!("could not read the request body: {e}"))
            })
        }
    }
}

/// The header of Triton's binary tensor data extension: the body's first this many bytes are
/// the JSON request, the rest the tensors' raw bytes.
const BINARY_HEADER: &str = "inference-header-content-length";

/// A REST request as a [`Call`]: JSON, or JSON followed by binary tensors (Triton's binary
/// tensor data extension, which tritonclient uses by default).
async fn rest_call(request: axum::extract::Request, cfg: &ServerConfig) -> Result<Call, ApiError> {
    let json_len = match request.headers().get(BINARY_HEADER) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| bad(format!("{BINARY_HEADER}: not a byte count")))?,
        ),
    };
    let body = read_body(request, cfg).await?;
    let (json, mut binary) = match json_len {
        None => (&body[..], &body[body.len()..]),
        Some(n) if n <= body.len() => body.split_at(n),
        Some(n) => {
            return Err(bad(format!(
                "{BINARY_HEADER} is {n}, the body has {} bytes",
                body.len()
            )));
        }
    };
    let req: InferRequest =
        serde_json::from_slice(json).map_err(|e| bad(format!("malformed request JSON: {e}")))?;
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for i in req.inputs {
        let size = i.parameters.get("binary_data_size");
        let data = match (size, &i.data) {
            (Some(size), _) => {
                let n = size
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .filter(|&n| n <= binary.len())
                    .ok_or_else(|| {
                        bad(format!(
                            "input {:?}: binary_data_size {size} is not a byte count within the \
                             {} binary bytes left",
                            i.name,
                            binary.len()
                        ))
                    })?;
                let (raw, rest) = binary.split_at(n);
                binary = rest;
                Elements::from_raw(&i.name, &i.datatype, raw)?
            }
            (None, Some(data)) => Elements::from_json(&i.name, &i.datatype, data)?,
            (None, None) => {
                return Err(bad(format!(
                    "input {:?}: no data (and no binary_data_size)",
                    i.name
                )));
            }
        };
        inputs.push(InputTensor {
            name: i.name,
            datatype: i.datatype,
            shape: i.shape,
            data,
        });
    }
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} bytes of binary tensor data that no input's binary_data_size claims",
            binary.len()
        )));
    }
    let timeout_us = infer::timeout_param(&req.parameters)?;
    let outputs = req
        .outputs
        .into_iter()
        .map(|o| infer::requested_output(o.name, &o.parameters))
        .collect::<Result<_, ApiError>>()?;
    Ok(Call {
        id: req.id,
        timeout_us,
        parameters: req.parameters,
        inputs,
        outputs,
    })
}

impl AppState {
    /// Runs `work`, one inference request on model `name` over `protocol`, and
    /// [`AppState::record`]s it when it is answered. A request whose client went away is
    /// dropped with `work`, unrecorded.
    pub(crate) async fn accounted(
        &self,
        name: &str,
        protocol: &'static str,
        arrived: Instant,
        work: impl Future<Output = Result<Answer, ApiError>>,
    ) -> Result<Answer, ApiError> {
        let result = work.await;
        self.record(
            name,
            protocol,
            arrived,
            result.as_ref().map(|a| (a.id.clone(), a.items)),
        );
        result
    }

    /// Counts an answered request (for Triton's metrics) and logs it (with `--log-requests`):
    /// its request id and items (answers, or tokens generated), or its error.
    pub(crate) fn record(
        &self,
        name: &str,
        protocol: &'static str,
        arrived: Instant,
        outcome: Result<(Option<String>, usize), &ApiError>,
    ) {
        if let Some((_, c)) = self.counts.iter().find(|(n, _)| n == name) {
            match &outcome {
                Ok(_) => {
                    c.success.fetch_add(1, Ordering::Relaxed);
                    c.success_us
                        .fetch_add(arrived.elapsed().as_micros() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    let reason = match e.0 {
                        StatusCode::TOO_MANY_REQUESTS => 0,
                        StatusCode::INTERNAL_SERVER_ERROR => 1,
                        _ => 2,
                    };
                    c.failure[reason].fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if self.cfg.log_requests {
            // One JSON line per request on standard error: what a log pipeline indexes.
            let (status, id, items, error) = match outcome {
                Ok((id, items)) => (200, id, items, None),
                Err(e) => (e.0.as_u16(), None, 0, Some(e.1.clone())),
            };
            let line = serde_json::json!({
                "unix_ms": std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                "protocol": protocol,
                "model": name,
                "id": id,
                "status": status,
                "items": items,
                "ms": arrived.elapsed().as_secs_f64() * 1e3,
                "error": error,
            });
            eprintln!("{line}");
        }
    }
}

async fn infer(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
    request: axum::extract::Request,
) -> Result<axum::Json<InferResponse>, ApiError> {
    let arrived = Instant::now();
    let answer = s
        .accounted(&name, "http", arrived, async {
            // An unknown name is refused before the body is read.
            s.find_any(&name)?;
            let call = rest_call(request, &s.cfg).await?;
            s.run_named(&name, call, arrived).await
        })
        .await?;
    let outputs = answer
        .outputs
        .iter()
        .map(|t| ResponseOutput {
            name: t.name.into(),
            shape: t.shape.clone(),
            datatype: t.datatype,
            data: t.json(),
        })
        .collect();
    let mut parameters = Map::new();
    if let Some(exit) = answer.exit {
        parameters.insert("exit".into(), Value::String(exit));
    }
    Ok(axum::Json(InferResponse {
        model_name: name,
        model_version: "1".into(),
        id: answer.id,
        parameters,
        outputs,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_of_several_models_are_one_exposition_with_model_labels() {
        let a = "# HELP x_total X.\n# TYPE x_total counter\nx_total 3\n\
                 # HELP lat Latency.\n# TYPE lat summary\nlat{quantile=\"0.5\"} 0.1\nlat_count 2\n";
        let b = a.replace("x_total 3", "x_total 5");
        let out = with_model_labels(&[("one", a.to_string()), ("two", b)]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines.iter().filter(|l| **l == "# HELP x_total X.").count(),
            1
        );
        let pos = |s: &str| {
            lines
                .iter()
                .position(|l| *l == s)
                .unwrap_or_else(|| panic!("{s}\n{out}"))
        };
        assert!(pos("# TYPE x_total counter") < pos("x_total{model=\"one\"} 3"));
        assert!(pos("x_total{model=\"one\"} 3") < pos("x_total{model=\"two\"} 5"));
        assert!(pos("x_total{model=\"two\"} 5") < pos("# HELP lat Latency."));
        pos("lat{model=\"two\",quantile=\"0.5\"} 0.1");
        pos("lat_count{model=\"one\"} 2");
    }
}

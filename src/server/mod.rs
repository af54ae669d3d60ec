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
mod listen;
pub mod v2;

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

use crate::serve::{Engine, Exit, Input, InputSpec, RequestOptions, ServeError};
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

struct AppState {
    models: Vec<Model>,
    /// Parallel to `models`.
    counts: Vec<RequestCounts>,
    cfg: ServerConfig,
    /// False from the start of a shutdown on: readiness answers 503.
    accepting: AtomicBool,
}

/// The server: its routes, over whatever listener [`Server::serve`] is given.
#[derive(Clone)]
pub struct Server {
    state: Arc<AppState>,
}

/// An error answer: a status and `{"error": "..."}`.
struct ApiError(StatusCode, String);

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
    pub fn new(models: Vec<Model>, cfg: ServerConfig) -> Server {
        Server {
            state: Arc::new(AppState {
                counts: models.iter().map(|_| RequestCounts::default()).collect(),
                models,
                cfg,
                accepting: AtomicBool::new(true),
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
            .route("/metrics", get(metrics))
            .layer(DefaultBodyLimit::max(self.state.cfg.max_body_bytes))
            .with_state(self.state.clone())
    }

    /// Serves on `listener` until `shutdown` completes, then stops accepting, turns not ready
    /// and returns once every request in flight is answered.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let state = self.state.clone();
        listen::serve(
            listener,
            self.router(),
            self.state.cfg.connections,
            async move {
                shutdown.await;
                state.accepting.store(false, Ordering::SeqCst);
            },
        )
        .await
    }
}

impl AppState {
    fn model(&self, name: &str) -> Result<&Model, ApiError> {
        self.models.iter().find(|m| m.name == name).ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!(
                    "no model named {name:?} (this server has: {})",
                    self.models
                        .iter()
                        .map(|m| m.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })
    }
}

async fn server_meta() -> axum::Json<ServerMeta> {
    axum::Json(ServerMeta {
        name: "apparate",
        version: env!("CARGO_PKG_VERSION"),
        extensions: vec!["classification"],
    })
}

async fn live() -> StatusCode {
    StatusCode::OK
}

async fn ready(State(s): State<Arc<AppState>>) -> StatusCode {
    if s.accepting.load(Ordering::SeqCst) && s.models.iter().all(|m| m.engine.is_ready()) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn model_ready(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let m = s.model(&name)?;
    Ok(
        if s.accepting.load(Ordering::SeqCst) && m.engine.is_ready() {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
    )
}

fn input_meta(spec: InputSpec) -> TensorMeta {
    match spec {
        InputSpec::Text => TensorMeta {
            name: "text",
            datatype: "BYTES",
            shape: vec![-1],
        },
        InputSpec::Image {
            height,
            width,
            channels,
        } => TensorMeta {
            name: "image",
            datatype: "UINT8",
            shape: vec![-1, height as i64, width as i64, channels as i64],
        },
    }
}

async fn model_meta(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<axum::Json<ModelMeta>, ApiError> {
    let m = s.model(&name)?;
    let out = |name, datatype| TensorMeta {
        name,
        datatype,
        shape: vec![-1],
    };
    Ok(axum::Json(ModelMeta {
        name: m.name.clone(),
        versions: vec!["1".into()],
        platform: "apparate",
        inputs: vec![input_meta(m.engine.input_spec())],
        outputs: vec![
            out("label", "BYTES"),
            out("class", "INT64"),
            out("probability", "FP32"),
            out("exit", "BYTES"),
        ],
    }))
}

async fn metrics(State(s): State<Arc<AppState>>) -> String {
    let per_model: Vec<(&str, String)> = s
        .models
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut text = m.engine.metrics().render_prometheus();
            // Plus the queue's depth, the autoscaling signal of docs/deploy.md.
            text.push_str(&format!(
                "# HELP apparate_queue_depth Requests waiting for a batch.\n\
                 # TYPE apparate_queue_depth gauge\n\
                 apparate_queue_depth {}\n",
                m.engine.queued()
            ));
            text.push_str(&triton_metrics(m, &s.counts[i]));
            (m.name.as_str(), text)
        })
        .collect();
    with_model_labels(&per_model)
}

/// Triton's names for what means the same here (so dashboards and autoscalers built for Triton
/// read them): HTTP inference requests that succeeded and failed (by reason) and their summed
/// duration, inferences (items) answered, model executions (batches) and items waiting.
fn triton_metrics(m: &Model, c: &RequestCounts) -> String {
    use std::fmt::Write as _;
    let met = m.engine.metrics();
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
        &[("", met.answered())],
    );
    family(
        "nv_inference_exec_count",
        "counter",
        "Number of model executions performed",
        &[("", met.batches())],
    );
    family(
        "nv_inference_request_duration_us",
        "counter",
        "Cumulative inference request duration in microseconds",
        &[("", ld(&c.success_us))],
    );
    family(
        "nv_inference_pending_request_count",
        "gauge",
        "Instantaneous number of pending requests awaiting execution per-model",
        &[("", m.engine.queued() as u64)],
    );
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

/// The element count a shape implies, refusing negative or overflowing dimensions.
fn elements(shape: &[i64]) -> Result<usize, ApiError> {
    shape.iter().try_fold(1usize, |n, &d| {
        usize::try_from(d)
            .ok()
            .and_then(|d| n.checked_mul(d))
            .ok_or_else(|| bad(format!("shape {shape:?}: dimensions must be non-negative")))
    })
}

/// The request's inputs as engine inputs, checked against the model.
fn engine_inputs(spec: InputSpec, req: &InferRequest) -> Result<Vec<Input>, ApiError> {
    let [input] = req.inputs.as_slice() else {
        return Err(bad(format!(
            "{} inputs: the model takes exactly one ({})",
            req.inputs.len(),
            input_meta(spec).name
        )));
    };
    let want = input_meta(spec);
    if input.name != want.name {
        return Err(bad(format!(
            "input {:?}: the model's input is named {:?}",
            input.name, want.name
        )));
    }
    let n = elements(&input.shape)?;
    let data = input
        .data
        .as_array()
        .ok_or_else(|| bad(format!("input {:?}: data must be a JSON array", input.name)))?;
    // Nested arrays are allowed (row-major), as the protocol's JSON form says.
    let mut flat = Vec::with_capacity(n);
    fn flatten<'a>(v: &'a [Value], out: &mut Vec<&'a Value>) {
        for x in v {
            match x {
                Value::Array(a) => flatten(a, out),
                x => out.push(x),
            }
        }
    }
    flatten(data, &mut flat);
    if flat.len() != n {
        return Err(bad(format!(
            "input {:?}: shape {:?} holds {n} elements, data has {}",
            input.name,
            input.shape,
            flat.len()
        )));
    }
    match spec {
        InputSpec::Text => {
            if input.datatype != "BYTES" {
                return Err(bad(format!(
                    "input {:?}: datatype {}, the model takes BYTES (text)",
                    input.name, input.datatype
                )));
            }
            flat.iter()
                .map(|v| {
                    v.as_str()
                        .map(|s| Input::Text(s.to_string()))
                        .ok_or_else(|| bad("BYTES elements must be JSON strings"))
                })
                .collect()
        }
        InputSpec::Image {
            height,
            width,
            channels,
        } => {
            let per = height * width * channels;
            let tail: Vec<i64> = vec![height as i64, width as i64, channels as i64];
            let batch = match input.shape.as_slice() {
                [b, rest @ ..] if rest == tail.as_slice() => *b as usize,
                rest if rest == tail.as_slice() => 1,
                other => {
                    return Err(bad(format!(
                        "input {:?}: shape {other:?}, the model takes [batch, {height}, {width}, {channels}]",
                        input.name
                    )));
                }
            };
            let items: Result<Vec<Input>, ApiError> = match input.datatype.as_str() {
                "UINT8" => flat
                    .chunks(per.max(1))
                    .map(|c| {
                        c.iter()
                            .map(|v| {
                                v.as_u64()
                                    .and_then(|x| u8::try_from(x).ok())
                                    .ok_or_else(|| bad("UINT8 elements must be integers 0-255"))
                            })
                            .collect::<Result<Vec<u8>, _>>()
                            .map(Input::Pixels)
                    })
                    .collect(),
                "FP32" => flat
                    .chunks(per.max(1))
                    .map(|c| {
                        c.iter()
                            .map(|v| {
                                v.as_f64()
                                    .map(|x| x as f32)
                                    .ok_or_else(|| bad("FP32 elements must be numbers"))
                            })
                            .collect::<Result<Vec<f32>, _>>()
                            .map(Input::Normalized)
                    })
                    .collect(),
                other => {
                    return Err(bad(format!(
                        "input {:?}: datatype {other}, the model takes UINT8 pixels or FP32 normalised values",
                        input.name
                    )));
                }
            };
            let items = items?;
            debug_assert_eq!(items.len(), batch);
            Ok(items)
        }
    }
}

/// Where an answer came from, as the `exit` output says it: the ramp's point, or `final`.
fn exit_name(e: &Exit) -> String {
    match e {
        Exit::Ramp { point, .. } => point.clone(),
        Exit::Final => "final".to_string(),
    }
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

/// The request's deadline: its `timeout` parameter (microseconds, as Triton reads it; 0, as in
/// Triton, means none given), else the model's default, else the server's. A deadline beyond
/// what the clock can represent is no deadline.
fn deadline(
    req: &InferRequest,
    model_default: Option<Duration>,
    cfg: &ServerConfig,
    arrived: Instant,
) -> Result<Option<Instant>, ApiError> {
    let asked = match req.parameters.get("timeout") {
        Some(v) => v
            .as_u64()
            .ok_or_else(|| bad("parameter timeout: microseconds, a non-negative integer"))?,
        None => 0,
    };
    let after = match asked {
        0 => model_default.or(cfg.default_timeout),
        us => Some(Duration::from_micros(us)),
    };
    Ok(after.and_then(|d| arrived.checked_add(d)))
}

async fn infer(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
    request: axum::extract::Request,
) -> Result<axum::Json<InferResponse>, ApiError> {
    let arrived = Instant::now();
    let result = infer_inner(&s, &name, request, arrived).await;
    if let Some(c) = s
        .models
        .iter()
        .position(|m| m.name == name)
        .map(|i| &s.counts[i])
    {
        match &result {
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
    if s.cfg.log_requests {
        // One JSON line per request on standard error: what a log pipeline indexes.
        let (status, id, items, error) = match &result {
            Ok(r) => (
                200,
                r.id.clone(),
                r.outputs.first().map_or(0, |o| o.data.len()),
                None,
            ),
            Err(e) => (e.0.as_u16(), None, 0, Some(e.1.clone())),
        };
        let line = serde_json::json!({
            "unix_ms": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            "model": name,
            "id": id,
            "status": status,
            "items": items,
            "ms": arrived.elapsed().as_secs_f64() * 1e3,
            "error": error,
        });
        eprintln!("{line}");
    }
    result
}

async fn infer_inner(
    s: &AppState,
    name: &str,
    request: axum::extract::Request,
    arrived: Instant,
) -> Result<axum::Json<InferResponse>, ApiError> {
    let m = s.model(name)?;
    if request
        .headers()
        .contains_key("inference-header-content-length")
    {
        return Err(bad(
            "the binary tensor data extension is not supported: send tensors as JSON \
             (tritonclient: binary_data=False on inputs and outputs)",
        ));
    }
    let body = read_body(request, &s.cfg).await?;
    if !s.accepting.load(Ordering::SeqCst) {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down".into(),
        ));
    }
    let req: InferRequest =
        serde_json::from_slice(&body).map_err(|e| bad(format!("malformed request JSON: {e}")))?;
    let inputs = engine_inputs(m.engine.input_spec(), &req)?;
    let opts = RequestOptions {
        deadline: deadline(&req, m.default_timeout, &s.cfg, arrived)?,
    };
    // Classification extension: `classification: k` on the label output asks for
    // "probability:class:label" strings; the engine answers its top class only.
    let mut classification = false;
    for o in &req.outputs {
        if !["label", "class", "probability", "exit"].contains(&o.name.as_str()) {
            return Err(bad(format!(
                "no output named {:?} (label, class, probability, exit)",
                o.name
            )));
        }
        if let Some(k) = o.parameters.get("classification") {
            match k.as_u64() {
                Some(1) => classification = true,
                _ => {
                    return Err(bad(
                        "classification: this engine answers the top class only (k = 1)",
                    ));
                }
            }
        }
    }
    // Submit every item before awaiting any, so a batch request is batched by the engine.
    let futures: Vec<_> = inputs
        .into_iter()
        .map(|i| m.engine.infer_with(i, opts))
        .collect();
    let mut answers = Vec::with_capacity(futures.len());
    for f in futures {
        answers.push(f.await?);
    }
    let n = answers.len() as i64;

    let wanted = |name: &str| req.outputs.is_empty() || req.outputs.iter().any(|o| o.name == name);
    type Column = fn(&crate::serve::Response, bool) -> Value;
    let columns: [(&str, &'static str, Column); 4] = [
        ("label", "BYTES", |a, classification| {
            Value::String(if classification {
                format!("{}:{}:{}", a.confidence, a.class, a.label)
            } else {
                a.label.clone()
            })
        }),
        ("class", "INT64", |a, _| Value::from(a.class as u64)),
        ("probability", "FP32", |a, _| Value::from(a.confidence)),
        ("exit", "BYTES", |a, _| Value::String(exit_name(&a.exit))),
    ];
    let outputs = columns
        .iter()
        .filter(|(name, _, _)| wanted(name))
        .map(|&(name, datatype, value)| ResponseOutput {
            name: name.into(),
            shape: vec![n],
            datatype,
            data: answers.iter().map(|a| value(a, classification)).collect(),
        })
        .collect();
    let mut parameters = Map::new();
    if let [a] = answers.as_slice() {
        parameters.insert("exit".into(), Value::String(exit_name(&a.exit)));
    }
    Ok(axum::Json(InferResponse {
        model_name: m.name.clone(),
        model_version: "1".into(),
        id: req.id,
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

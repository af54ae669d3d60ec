//! Triton's generate extension for decoder models: `POST /v2/models/{name}/generate` answers
//! the whole text, `POST /v2/models/{name}/generate_stream` streams it as server-sent events,
//! one event per piece of text as its tokens come out of the generation engine (which batches
//! every running sequence per step).
//!
//! The request is a JSON object: `text_input` (the prompt), an optional `id`, and parameters,
//! either in `parameters` or at the top level as Triton allows: `max_tokens`, `temperature`,
//! `top_k`, `top_p`, `seed`, `raw` (no chat template), `system` (a system message),
//! `ignore_eos`, `stream`, `timeout` (microseconds). Unknown parameters are refused by name.
//!
//! Each generation is fed by one task: it tokenizes the prompt on the blocking pool, submits it
//! to the engine's async stream, and detokenizes the tokens as they come. A client that goes
//! away (or a deadline that passes) closes its channel, the task drops the generation's stream
//! at once, and the engine frees the sequence before its next step.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use super::infer::{Answer, Call, Elements, OutData, OutTensor};
use super::{ApiError, AppState, bad, read_body};
use crate::backend::decoder::DecoderBackend;
use crate::chat::ChatTemplate;
use crate::error::Result;
use crate::generation::{
    self, EngineConfig, EngineStats, FinishReason, GenerateRequest, LanguageModel, TextStream,
    TokenEvent,
};
use crate::models::llama::Sampling;

/// A decoder model the server generates text with.
pub struct Generator {
    pub name: String,
    engine: generation::Engine,
    tokenizer: tokenizers::Tokenizer,
    template: Option<ChatTemplate>,
    stop: Vec<u32>,
    /// Tokens generated at most when a request names no `max_tokens`.
    pub default_max_tokens: usize,
    /// Deadline of its requests that name none; `None`: the server's default.
    pub default_timeout: Option<Duration>,
    /// Most prompts one tensor-form request may carry: what the engine can hold (running and
    /// queued), so one request cannot spawn more work than that.
    max_prompts: usize,
    /// Longest prompt tokenized, in bytes: the context times the longest token's text. A longer
    /// one cannot fit and is refused before the tokenizer spends time on it.
    max_prompt_bytes: usize,
}

impl Generator {
    /// Starts the generation engine on `lm`'s decoder.
    pub fn new<B: DecoderBackend + 'static>(
        name: impl Into<String>,
        lm: LanguageModel<B>,
        cfg: EngineConfig,
        default_max_tokens: usize,
    ) -> Result<Generator> {
        let LanguageModel {
            model,
            tokenizer,
            template,
            stop,
        } = lm;
        let longest_token = tokenizer
            .get_vocab(true)
            .keys()
            .map(|t| t.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let max_prompt_bytes = model.cfg.context.saturating_mul(longest_token);
        let max_prompts = cfg.queue_capacity + cfg.max_running;
        Ok(Generator {
            name: name.into(),
            engine: generation::Engine::start(model, cfg)?,
            tokenizer,
            template,
            stop,
            default_max_tokens,
            default_timeout: None,
            max_prompts,
            max_prompt_bytes,
        })
    }

    /// The engine's counters.
    pub fn stats(&self) -> EngineStats {
        self.engine.stats()
    }
}

/// One request's settings.
#[derive(Clone, Debug)]
struct Params {
    id: Option<String>,
    prompt: String,
    raw: bool,
    system: Option<String>,
    max_tokens: usize,
    sampling: Sampling,
    ignore_eos: bool,
    timeout_us: u64,
}

const PARAMETERS: &str =
    "max_tokens, temperature, top_k, top_p, seed, raw, system, ignore_eos, stream, timeout";

/// Parameters of the tensor form (`/infer`, gRPC `ModelInfer` and `ModelStreamInfer`) that
/// belong to the protocol, not to generation: read elsewhere (`timeout`,
/// `triton_enable_empty_final_response`) or without meaning here (tritonclient's
/// `binary_data_output`, Triton's scheduling `priority`).
const PROTOCOL_PARAMETERS: [&str; 4] = [
    "timeout",
    "binary_data_output",
    "priority",
    "triton_enable_empty_final_response",
];

/// Reads a generate request; `streaming` says which route it came to.
fn params(body: &[u8], g: &Generator, streaming: bool) -> Result<Params, ApiError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("malformed request JSON: {e}")))?;
    let Value::Object(mut top) = v else {
        return Err(bad("the request must be a JSON object"));
    };
    let prompt = match top.remove("text_input") {
        Some(Value::String(s)) => s,
        Some(_) => return Err(bad("text_input must be a string (the prompt)")),
        None => return Err(bad("no text_input (the prompt)")),
    };
    let id = match top.remove("id") {
        None => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => return Err(bad("id must be a string")),
    };
    let mut all = Map::new();
    match top.remove("parameters") {
        None => {}
        Some(Value::Object(p)) => all.extend(p),
        Some(_) => return Err(bad("parameters must be a JSON object")),
    }
    all.extend(top);
    settings(prompt, id, &all, g, streaming)
}

/// A request's settings from its parameters.
fn settings(
    prompt: String,
    id: Option<String>,
    all: &Map<String, Value>,
    g: &Generator,
    streaming: bool,
) -> Result<Params, ApiError> {
    let mut p = Params {
        id,
        prompt,
        raw: false,
        system: None,
        max_tokens: g.default_max_tokens,
        sampling: Sampling::default(),
        ignore_eos: false,
        timeout_us: 0,
    };
    for (k, v) in all {
        let want = |what: &str| bad(format!("parameter {k}: {what}, not {v}"));
        let uint = || v.as_u64().ok_or_else(|| want("a non-negative integer"));
        let float = || v.as_f64().ok_or_else(|| want("a number"));
        let flag = || v.as_bool().ok_or_else(|| want("true or false"));
        match k.as_str() {
            "max_tokens" => {
                p.max_tokens = usize::try_from(uint()?)
                    .ok()
                    .filter(|n| (1..=1 << 20).contains(n))
                    .ok_or_else(|| want("1..=1048576"))?
            }
            "temperature" => p.sampling.temperature = float()? as f32,
            "top_k" => p.sampling.top_k = usize::try_from(uint()?).unwrap_or(usize::MAX),
            "top_p" => p.sampling.top_p = float()? as f32,
            "seed" => p.sampling.seed = uint()?,
            "raw" => p.raw = flag()?,
            "ignore_eos" => p.ignore_eos = flag()?,
            "system" => p.system = Some(v.as_str().ok_or_else(|| want("a string"))?.into()),
            "timeout" => p.timeout_us = uint()?,
            "stream" => {
                if flag()? != streaming {
                    return Err(bad(if streaming {
                        "stream: false on generate_stream; POST to generate instead"
                    } else {
                        "stream: true; POST to generate_stream for a stream of events"
                    }));
                }
            }
            other => {
                return Err(bad(format!(
                    "unknown parameter {other:?} (accepted: {PARAMETERS})"
                )));
            }
        }
    }
    p.sampling.check().map_err(|e| bad(e.to_string()))?;
    if p.prompt.len() > g.max_prompt_bytes {
        return Err(bad(format!(
            "a prompt of {} bytes cannot fit the model's context (at most {} bytes are read)",
            p.prompt.len(),
            g.max_prompt_bytes
        )));
    }
    Ok(p)
}

/// What the feeding thread sends the handler.
enum Piece {
    /// The engine took the request.
    Started,
    Text(String),
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        generated: usize,
    },
}

fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Context => "context",
    }
}

/// Starts a generation: a task tokenizes the prompt (on the blocking pool: a long prompt takes
/// milliseconds), submits it, and detokenizes its tokens as they come; its answers come on the
/// returned channel, which the handler drops to cancel.
fn start(g: Arc<Generator>, p: Params) -> mpsc::Receiver<Result<Piece, ApiError>> {
    // A few pieces of slack; the engine's own channel is unbounded, so a client that reads
    // slowly never holds up the engine, only its own task.
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let tokenize = {
            let g = g.clone();
            let (prompt, raw, system) = (p.prompt, p.raw, p.system);
            tokio::task::spawn_blocking(move || {
                generation::prompt_ids(
                    &g.tokenizer,
                    g.template.as_ref(),
                    &prompt,
                    raw,
                    system.as_deref(),
                )
            })
        };
        let ids = match tokenize.await {
            Ok(Ok(ids)) => ids,
            Ok(Err(e)) => {
                let _ = tx.send(Err(bad(e.to_string()))).await;
                return;
            }
            Err(e) => {
                let _ = tx
                    .send(Err(ApiError(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("tokenizing the prompt failed: {e}"),
                    )))
                    .await;
                return;
            }
        };
        let req = GenerateRequest {
            prompt: ids,
            max_tokens: p.max_tokens,
            sampling: p.sampling,
            stop: if p.ignore_eos {
                Vec::new()
            } else {
                g.stop.clone()
            },
        };
        // Returning drops the stream, which cancels the sequence if it still runs.
        let mut stream = match g.engine.submit_async(req) {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        if tx.send(Ok(Piece::Started)).await.is_err() {
            return;
        }
        let mut text = TextStream::new(&g.tokenizer);
        loop {
            let event = tokio::select! {
                e = stream.next() => e,
                // The answer was dropped (client gone, deadline passed): cancel now, not at
                // the next token.
                _ = tx.closed() => return,
            };
            let Some(event) = event else { return };
            let msg = match event {
                TokenEvent::Token(t) => match text.push(t) {
                    Ok(s) if s.is_empty() => continue,
                    Ok(s) => Ok(Piece::Text(s)),
                    Err(e) => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
                },
                TokenEvent::Done(finish, stats) => Ok(Piece::Done {
                    finish,
                    prompt_tokens: stats.prompt_tokens,
                    generated: stats.generated,
                }),
                TokenEvent::Failed(e) => Err(e.into()),
            };
            let last = !matches!(msg, Ok(Piece::Text(_)));
            if tx.send(msg).await.is_err() || last {
                return;
            }
        }
    });
    rx
}

/// The deadline of a request ([`AppState::deadline`] with the model's default).
fn deadline(s: &AppState, g: &Generator, p: &Params, arrived: Instant) -> Option<Instant> {
    s.deadline(p.timeout_us, g.default_timeout, arrived)
}

fn timed_out() -> ApiError {
    ApiError(
        StatusCode::GATEWAY_TIMEOUT,
        "the generation did not finish within the request's timeout".into(),
    )
}

/// Waits for the next message, or the deadline.
async fn next(
    rx: &mut mpsc::Receiver<Result<Piece, ApiError>>,
    deadline: Option<Instant>,
) -> Result<Piece, ApiError> {
    let closed = || {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the generation ended without an answer".into(),
        )
    };
    match deadline {
        Some(d) => match tokio::time::timeout_at(d.into(), rx.recv()).await {
            Err(_) => Err(timed_out()),
            Ok(m) => m.ok_or_else(closed)?,
        },
        None => rx.recv().await.ok_or_else(closed)?,
    }
}

/// The request read and the generation started (the engine took it), or the error to answer.
async fn begin(
    s: &Arc<AppState>,
    name: &str,
    request: axum::extract::Request,
    streaming: bool,
    arrived: Instant,
) -> Result<Start, ApiError> {
    let g = s.generator(name)?.clone();
    let body = read_body(request, &s.cfg).await?;
    if !s.is_accepting() {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down".into(),
        ));
    }
    let p = params(&body, &g, streaming)?;
    let id = p.id.clone();
    let deadline = deadline(s, &g, &p, arrived);
    let mut rx = start(g, p);
    match next(&mut rx, deadline).await? {
        Piece::Started => Ok(Start { rx, deadline, id }),
        _ => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the generation answered before it started".into(),
        )),
    }
}

/// A started generation.
struct Start {
    rx: mpsc::Receiver<Result<Piece, ApiError>>,
    deadline: Option<Instant>,
    id: Option<String>,
}

/// Collects a started generation's text; `None` if the deadline passed (the stream dropped with
/// the receiver cancels the sequence).
async fn collect(
    rx: &mut mpsc::Receiver<Result<Piece, ApiError>>,
    deadline: Option<Instant>,
) -> Result<(String, FinishReason, usize, usize), ApiError> {
    let mut text = String::new();
    loop {
        match next(rx, deadline).await? {
            Piece::Started => {}
            Piece::Text(t) => text.push_str(&t),
            Piece::Done {
                finish,
                prompt_tokens,
                generated,
            } => return Ok((text, finish, prompt_tokens, generated)),
        }
    }
}

/// A tensor-form request's prompts (`text_input`, BYTES), their tensor's shape, and each
/// prompt's settings from the request's parameters.
fn tensor_requests(
    s: &AppState,
    g: &Generator,
    call: &Call,
) -> Result<(Vec<i64>, Vec<Params>), ApiError> {
    if !s.is_accepting() {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down".into(),
        ));
    }
    if let Some(o) = call.outputs.iter().find(|o| o.name != "text_output") {
        return Err(bad(format!(
            "no output named {:?} (a decoder answers text_output)",
            o.name
        )));
    }
    let [input] = call.inputs.as_slice() else {
        return Err(bad(format!(
            "{} inputs: the model takes exactly one (text_input)",
            call.inputs.len()
        )));
    };
    if input.name != "text_input" {
        return Err(bad(format!(
            "input {:?}: the model's input is named \"text_input\"",
            input.name
        )));
    }
    let prompts: Vec<String> = match &input.data {
        Elements::Strings(v) => v.clone(),
        Elements::Bytes(v) => v
            .iter()
            .map(|b| {
                String::from_utf8(b.clone())
                    .map_err(|_| bad("input \"text_input\": a prompt is not UTF-8"))
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(bad(format!(
                "input \"text_input\": datatype {}, the model takes BYTES (prompts)",
                input.datatype
            )));
        }
    };
    let n = input.shape.iter().try_fold(1usize, |n, &d| {
        usize::try_from(d).ok().and_then(|d| n.checked_mul(d))
    });
    if n != Some(prompts.len()) {
        return Err(bad(format!(
            "input \"text_input\": shape {:?}, data has {} elements",
            input.shape,
            prompts.len()
        )));
    }
    if prompts.len() > g.max_prompts {
        return Err(ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{} prompts in one request; the generation engine holds {} (running and queued)",
                prompts.len(),
                g.max_prompts
            ),
        ));
    }
    let mut map = call.parameters.clone();
    for k in PROTOCOL_PARAMETERS {
        map.remove(k);
    }
    let params = prompts
        .into_iter()
        .map(|prompt| {
            let mut p = settings(prompt, None, &map, g, false)?;
            p.timeout_us = call.timeout_us;
            Ok(p)
        })
        .collect::<Result<_, ApiError>>()?;
    Ok((input.shape.clone(), params))
}

/// The tensor form on a decoder (`/infer`, gRPC `ModelInfer`): `text_input` BYTES, one prompt
/// per element, generated at once; `text_output` BYTES in the same shape. Generation settings
/// come from the request's parameters, as on `/generate`.
pub(super) async fn run_tensors(
    s: &AppState,
    g: &Arc<Generator>,
    call: Call,
    arrived: Instant,
) -> Result<Answer, ApiError> {
    let (shape, params) = tensor_requests(s, g, &call)?;
    let mut started = Vec::with_capacity(params.len());
    let mut deadline_at = None;
    for p in params {
        deadline_at = deadline(s, g, &p, arrived);
        started.push(start(g.clone(), p));
    }
    let mut texts = Vec::with_capacity(started.len());
    let mut generated = 0;
    for mut rx in started {
        let (text, _, _, n) = collect(&mut rx, deadline_at).await?;
        texts.push(text);
        generated += n;
    }
    Ok(Answer {
        id: call.id,
        outputs: vec![OutTensor {
            name: "text_output",
            datatype: "BYTES",
            shape,
            data: OutData::Strings(texts),
        }],
        exit: None,
        items: generated,
    })
}

/// A running generation, read piece by piece (gRPC's streaming form).
pub(super) struct Generation {
    rx: mpsc::Receiver<Result<Piece, ApiError>>,
    deadline: Option<Instant>,
    /// Tokens generated, once finished.
    pub generated: usize,
}

impl Generation {
    /// The next piece of text; `None` once the generation finished. An error (the deadline
    /// passed, the engine failed) ends it; dropping the `Generation` cancels it.
    pub(super) async fn next_piece(&mut self) -> Result<Option<String>, ApiError> {
        loop {
            match next(&mut self.rx, self.deadline).await? {
                Piece::Started => {}
                Piece::Text(t) => return Ok(Some(t)),
                Piece::Done { generated, .. } => {
                    self.generated = generated;
                    return Ok(None);
                }
            }
        }
    }
}

/// Starts the tensor form's one prompt (`text_input` of one element) as a [`Generation`]; the
/// engine has taken it when this returns.
pub(super) async fn start_tensor(
    s: &AppState,
    g: &Arc<Generator>,
    call: &Call,
    arrived: Instant,
) -> Result<Generation, ApiError> {
    let (_, mut params) = tensor_requests(s, g, call)?;
    if params.len() != 1 {
        return Err(bad(format!(
            "{} prompts in one streamed request: stream one prompt per request",
            params.len()
        )));
    }
    let p = params.remove(0);
    let deadline = deadline(s, g, &p, arrived);
    let mut rx = start(g.clone(), p);
    match next(&mut rx, deadline).await? {
        Piece::Started => Ok(Generation {
            rx,
            deadline,
            generated: 0,
        }),
        _ => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the generation answered before it started".into(),
        )),
    }
}

/// `POST /v2/models/{name}/generate`: the whole text.
pub(super) async fn generate(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
    request: axum::extract::Request,
) -> Result<axum::Json<Value>, ApiError> {
    let arrived = Instant::now();
    let result = async {
        let mut st = begin(&s, &name, request, false, arrived).await?;
        let (text, finish, prompt_tokens, generated) = collect(&mut st.rx, st.deadline).await?;
        let mut r = json!({
            "model_name": name,
            "model_version": "1",
            "text_output": text,
            "finish_reason": finish_name(finish),
            "prompt_tokens": prompt_tokens,
            "generated_tokens": generated,
        });
        if let Some(id) = st.id {
            r["id"] = Value::String(id);
        }
        Ok((r, generated))
    }
    .await;
    s.record(
        &name,
        "http",
        arrived,
        result
            .as_ref()
            .map(|(r, n)| (r["id"].as_str().map(str::to_string), *n)),
    );
    result.map(|(r, _)| axum::Json(r))
}

/// `POST /v2/models/{name}/generate_stream`: server-sent events, `data: {...}` with each piece
/// of `text_output`; the last event has an empty piece, `finish_reason` and the token counts,
/// or `error` if the generation failed or passed its deadline after it started.
pub(super) async fn generate_stream(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
    request: axum::extract::Request,
) -> Response {
    let arrived = Instant::now();
    let st = match begin(&s, &name, request, true, arrived).await {
        Ok(x) => x,
        Err(e) => {
            s.record(&name, "http", arrived, Err(&e));
            return e.into_response();
        }
    };
    struct Feed {
        st: Start,
        s: Arc<AppState>,
        name: String,
        arrived: Instant,
        over: bool,
    }
    let feed = Feed {
        st,
        s,
        name,
        arrived,
        over: false,
    };
    let events = futures_util::stream::unfold(feed, |mut f| async move {
        if f.over {
            return None;
        }
        let mut next_piece = next(&mut f.st.rx, f.st.deadline).await;
        while let Ok(Piece::Started) = next_piece {
            next_piece = next(&mut f.st.rx, f.st.deadline).await;
        }
        let mut body = match next_piece {
            Ok(Piece::Started) => unreachable!("skipped above"),
            Ok(Piece::Text(t)) => {
                json!({"model_name": f.name, "model_version": "1", "text_output": t})
            }
            Ok(Piece::Done {
                finish,
                prompt_tokens,
                generated,
            }) => {
                f.over = true;
                let id = f.st.id.clone();
                f.s.record(&f.name, "http", f.arrived, Ok((id, generated)));
                json!({
                    "model_name": f.name,
                    "model_version": "1",
                    "text_output": "",
                    "finish_reason": finish_name(finish),
                    "prompt_tokens": prompt_tokens,
                    "generated_tokens": generated,
                })
            }
            Err(e) => {
                f.over = true;
                f.s.record(&f.name, "http", f.arrived, Err(&e));
                json!({"error": e.1})
            }
        };
        if let (Some(id), Some(o)) = (&f.st.id, body.as_object_mut())
            && o.contains_key("model_name")
        {
            o.insert("id".into(), Value::String(id.clone()));
        }
        Some((
            Ok::<_, Infallible>(Event::default().data(body.to_string())),
            f,
        ))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

//! The protocol's gRPC form (`proto/inference.proto`, the service `inference.GRPCInferenceService`
//! that KServe and Triton clients call): the same health, metadata and inference as the REST
//! routes, through the same `AppState::run_named`, so the two forms refuse the same things for
//! the same reasons, plus Triton's streaming `ModelStreamInfer` (a decoder's text piece by
//! piece). Errors are gRPC status codes: INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED
//! for overload (with `grpc-retry-pushback-ms`, gRPC's Retry-After), DEADLINE_EXCEEDED,
//! UNAVAILABLE while shutting down. A request's deadline is the earlier of its `timeout`
//! parameter and the client's own gRPC deadline (`grpc-timeout`).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use tonic::{Code, Request, Response, Status};

use super::infer::{self, Answer, Call, Elements, InputTensor, OutData, OutTensor};
use super::{ApiError, AppState, bad};

/// The messages and service trait generated from `proto/inference.proto` by build.rs (public
/// for clients written in Rust: encode these with `prost`).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/inference.rs"));
}

use pb::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use pb::infer_parameter::ParameterChoice;
use pb::model_infer_response::InferOutputTensor;
use pb::model_metadata_response::TensorMetadata;
use pb::*;

/// The gRPC service over the server's state.
pub(crate) struct Grpc {
    state: Arc<AppState>,
}

/// The tower service that the accept loop serves over HTTP/2.
pub(crate) type GrpcService = GrpcInferenceServiceServer<Grpc>;

pub(crate) fn service(state: Arc<AppState>) -> GrpcService {
    let limit = state.cfg.max_body_bytes;
    GrpcInferenceServiceServer::new(Grpc { state })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX)
}

/// An error answer as a gRPC status.
fn status(e: ApiError) -> Status {
    let code = match e.0 {
        StatusCode::NOT_FOUND => Code::NotFound,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::PAYLOAD_TOO_LARGE => Code::ResourceExhausted,
        StatusCode::GATEWAY_TIMEOUT | StatusCode::REQUEST_TIMEOUT => Code::DeadlineExceeded,
        StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
        StatusCode::INTERNAL_SERVER_ERROR => Code::Internal,
        s if s.is_client_error() => Code::InvalidArgument,
        _ => Code::Unknown,
    };
    let mut st = Status::new(code, e.1);
    if e.0 == StatusCode::TOO_MANY_REQUESTS {
        // gRPC's retry pushback: how long a client's retry policy waits (as Retry-After: 1).
        st.metadata_mut()
            .insert("grpc-retry-pushback-ms", "1000".parse().expect("ASCII"));
    }
    st
}

/// The client's gRPC deadline (`grpc-timeout`: at most 8 digits and a unit), if it sent one.
fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    // At most 8 digits, as gRPC's wire format says (so no unit overflows below).
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Protocol parameters as JSON values (as the REST form carries them).
fn json_params(
    params: &HashMap<String, InferParameter>,
) -> serde_json::Map<String, serde_json::Value> {
    params
        .iter()
        .filter_map(|(k, p)| {
            let v = match p.parameter_choice.as_ref()? {
                ParameterChoice::BoolParam(b) => serde_json::Value::from(*b),
                ParameterChoice::Int64Param(i) => serde_json::Value::from(*i),
                ParameterChoice::Uint64Param(u) => serde_json::Value::from(*u),
                ParameterChoice::DoubleParam(d) => serde_json::Value::from(*d),
                ParameterChoice::StringParam(s) => serde_json::Value::from(s.clone()),
            };
            Some((k.clone(), v))
        })
        .collect()
}

/// The typed contents of an input (when the request has no raw contents).
fn typed(name: &str, datatype: &str, c: InferTensorContents) -> Result<Elements, ApiError> {
    Ok(match datatype {
        "BYTES" => Elements::Bytes(c.bytes_contents),
        "UINT8" => Elements::U8(
            c.uint_contents
                .iter()
                .map(|&v| u8::try_from(v).ok())
                .collect::<Option<_>>()
                .ok_or_else(|| bad(format!("input {name:?}: UINT8 elements must be 0-255")))?,
        ),
        "FP32" => Elements::F32(c.fp32_contents),
        other => return Err(infer::unsupported(name, other)),
    })
}

/// A gRPC request as a [`Call`]; `deadline` is the client's gRPC deadline.
fn call(req: ModelInferRequest, deadline: Option<Duration>) -> Result<Call, ApiError> {
    if !req.raw_input_contents.is_empty() && req.raw_input_contents.len() != req.inputs.len() {
        return Err(bad(format!(
            "{} raw_input_contents for {} inputs: one per input",
            req.raw_input_contents.len(),
            req.inputs.len()
        )));
    }
    let mut raw = req.raw_input_contents.into_iter();
    let inputs = req
        .inputs
        .into_iter()
        .map(|i| {
            let data = match raw.next() {
                Some(r) => Elements::from_raw(&i.name, &i.datatype, &r)?,
                None => typed(&i.name, &i.datatype, i.contents.unwrap_or_default())?,
            };
            Ok(InputTensor {
                name: i.name,
                datatype: i.datatype,
                shape: i.shape,
                data,
            })
        })
        .collect::<Result<_, ApiError>>()?;
    // Parameters as JSON values: one reading of them for both protocols.
    let parameters = json_params(&req.parameters);
    let asked = infer::timeout_param(&parameters)?;
    // The earlier of the two deadlines; a client deadline under a microsecond is one.
    let client_us = deadline.map(|d| (d.as_micros() as u64).max(1));
    let timeout_us = match (asked, client_us) {
        (0, c) => c.unwrap_or(0),
        (a, Some(c)) => a.min(c),
        (a, None) => a,
    };
    let outputs = req
        .outputs
        .into_iter()
        .map(|o| infer::requested_output(o.name, &json_params(&o.parameters)))
        .collect::<Result<_, ApiError>>()?;
    Ok(Call {
        id: (!req.id.is_empty()).then_some(req.id),
        timeout_us,
        parameters,
        inputs,
        outputs,
    })
}

/// This server has version "1" of each model; an empty version is the server's choice.
fn check_version(name: &str, version: &str) -> Result<(), ApiError> {
    if version.is_empty() || version == "1" {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("model {name:?} has version \"1\" only, not {version:?}"),
        ))
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for Grpc {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.state.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let r = request.into_inner();
        let ready = self.state.model_is_ready(&r.name).map_err(status)?;
        check_version(&r.name, &r.version).map_err(status)?;
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        let meta = super::server_metadata();
        Ok(Response::new(ServerMetadataResponse {
            name: meta.name.into(),
            version: meta.version.into(),
            extensions: meta.extensions.iter().map(|e| e.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let r = request.into_inner();
        let meta = self.state.metadata(&r.name).map_err(status)?;
        check_version(&r.name, &r.version).map_err(status)?;
        let tensor = |t: super::v2::TensorMeta| TensorMetadata {
            name: t.name.into(),
            datatype: t.datatype.into(),
            shape: t.shape,
        };
        Ok(Response::new(ModelMetadataResponse {
            name: meta.name,
            versions: meta.versions,
            platform: meta.platform.into(),
            inputs: meta.inputs.into_iter().map(tensor).collect(),
            outputs: meta.outputs.into_iter().map(tensor).collect(),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let arrived = Instant::now();
        let s = &self.state;
        let client_deadline = grpc_timeout(request.metadata());
        let req = request.into_inner();
        let name = req.model_name.clone();
        let version = req.model_version.clone();
        let answer = s
            .accounted(&name, "grpc", arrived, async {
                s.find_any(&name)?;
                check_version(&name, &version)?;
                s.run_named(&name, call(req, client_deadline)?, arrived)
                    .await
            })
            .await
            .map_err(status)?;
        Ok(Response::new(infer_response(name, &answer)))
    }

    type ModelStreamInferStream =
        Pin<Box<dyn futures_util::Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

    /// Triton's streaming form. Each request on the stream runs as its own task (so a long
    /// generation does not hold up the requests behind it); a classifier's request gets one
    /// response, a decoder's one response per piece of text, and, when the request asks with
    /// `triton_enable_empty_final_response`, an empty last one flagged
    /// `triton_final_response`. A request's error is a message on the stream, which goes on.
    /// At most [`STREAM_REQUESTS_IN_FLIGHT`] requests of a stream run at once. The client's
    /// gRPC deadline covers the whole stream; a client that goes away cancels every request
    /// still running; a shutdown stops reading requests, answers the running ones and ends the
    /// stream.
    async fn model_stream_infer(
        &self,
        request: Request<tonic::Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let deadline = grpc_timeout(request.metadata()).and_then(|d| Instant::now().checked_add(d));
        let mut inbound = request.into_inner();
        let state = self.state.clone();
        // A few responses of slack; a client that stops reading stalls only its own stream.
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            // Requests of this stream running at once; the next message is read only when one
            // of them has room (a stream cannot queue unbounded work).
            let slots = Arc::new(tokio::sync::Semaphore::new(STREAM_REQUESTS_IN_FLIGHT));
            // Dropping the set (this task ending early) aborts the requests still running.
            let mut running = tokio::task::JoinSet::new();
            loop {
                let slot = tokio::select! {
                    s = slots.clone().acquire_owned() => s.expect("never closed"),
                    _ = tx.closed() => return,
                };
                tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(req)) => {
                            let (state, tx) = (state.clone(), tx.clone());
                            running.spawn(async move {
                                stream_one(state, req, deadline, tx).await;
                                drop(slot);
                            });
                        }
                        Ok(None) => break,
                        Err(e) => {
                            // A broken or oversize message ends the stream with its status.
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    },
                    // Finished requests leave the set as they end (a long stream stays small).
                    Some(_) = running.join_next(), if !running.is_empty() => {}
                    // A shutdown: no new requests; the running ones are answered, then the
                    // stream ends.
                    _ = state.stopping() => break,
                    _ = tx.closed() => return,
                }
            }
            loop {
                tokio::select! {
                    r = running.join_next() => if r.is_none() { return },
                    // The client went away after closing its side: abort what still runs.
                    _ = tx.closed() => return,
                }
            }
        });
        let out =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
            );
        Ok(Response::new(Box::pin(out)))
    }
}

/// An answer as the protocol's response, with raw contents, as Triton answers (its clients read
/// every datatype from them).
fn infer_response(name: String, answer: &Answer) -> ModelInferResponse {
    let mut parameters = HashMap::new();
    if let Some(exit) = answer.exit.clone() {
        parameters.insert(
            "exit".to_string(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::StringParam(exit)),
            },
        );
    }
    ModelInferResponse {
        model_name: name,
        model_version: "1".into(),
        id: answer.id.clone().unwrap_or_default(),
        parameters,
        outputs: answer
            .outputs
            .iter()
            .map(|t| InferOutputTensor {
                name: t.name.into(),
                datatype: t.datatype.into(),
                shape: t.shape.clone(),
                parameters: HashMap::new(),
                contents: None,
            })
            .collect(),
        raw_output_contents: answer.outputs.iter().map(OutTensor::raw).collect(),
    }
}

type StreamSender = tokio::sync::mpsc::Sender<Result<ModelStreamInferResponse, Status>>;

/// Requests of one ModelStreamInfer stream running at once.
const STREAM_REQUESTS_IN_FLIGHT: usize = 256;

/// One request of a ModelStreamInfer stream, answered on `tx`.
async fn stream_one(
    s: Arc<AppState>,
    req: ModelInferRequest,
    deadline: Option<Instant>,
    tx: StreamSender,
) {
    let arrived = Instant::now();
    let name = req.model_name.clone();
    let id = req.id.clone();
    let final_wanted = matches!(
        req.parameters
            .get("triton_enable_empty_final_response")
            .and_then(|p| p.parameter_choice.as_ref()),
        Some(ParameterChoice::BoolParam(true))
    );
    // With `triton_enable_empty_final_response`, a request's last response says so, whether
    // it is an error, a classifier's one answer or a decoder's empty closing one.
    let flagged = |mut r: ModelInferResponse, last: bool| {
        if final_wanted {
            r.parameters.insert(
                "triton_final_response".into(),
                InferParameter {
                    parameter_choice: Some(ParameterChoice::BoolParam(last)),
                },
            );
        }
        r
    };
    let error = |e: &ApiError| ModelStreamInferResponse {
        error_message: e.1.clone(),
        infer_response: Some(flagged(
            ModelInferResponse {
                model_name: name.clone(),
                model_version: "1".into(),
                id: id.clone(),
                ..Default::default()
            },
            true,
        )),
    };
    let response = |r: ModelInferResponse, last: bool| ModelStreamInferResponse {
        error_message: String::new(),
        infer_response: Some(flagged(r, last)),
    };
    let remaining = deadline.map(|d| d.saturating_duration_since(arrived));
    let version = req.model_version.clone();
    let call = match s
        .find_any(&name)
        .and_then(|_| check_version(&name, &version))
        .and_then(|_| call(req, remaining))
    {
        Ok(c) => c,
        Err(e) => {
            s.record(&name, "grpc", arrived, Err(&e));
            let _ = tx.send(Ok(error(&e))).await;
            return;
        }
    };
    let Some(g) = s.generators.iter().find(|g| g.name == name).cloned() else {
        // A classifier: one response.
        let r = s
            .accounted(&name, "grpc", arrived, s.run_named(&name, call, arrived))
            .await;
        let msg = match r {
            Ok(a) => response(infer_response(name.clone(), &a), true),
            Err(e) => error(&e),
        };
        let _ = tx.send(Ok(msg)).await;
        return;
    };
    // A decoder: a response per piece of text.
    let mut generation = match super::generate::start_tensor(&s, &g, &call, arrived).await {
        Ok(started) => started,
        Err(e) => {
            s.record(&name, "grpc", arrived, Err(&e));
            let _ = tx.send(Ok(error(&e))).await;
            return;
        }
    };
    let piece = |text: String, last: bool| {
        let answer = Answer {
            id: call.id.clone(),
            outputs: vec![OutTensor {
                name: "text_output",
                datatype: "BYTES",
                shape: vec![1],
                data: OutData::Strings(if last { Vec::new() } else { vec![text] }),
            }],
            exit: None,
            items: 0,
        };
        let mut r = infer_response(name.clone(), &answer);
        if last {
            r.outputs.clear();
            r.raw_output_contents.clear();
        }
        response(r, last)
    };
    loop {
        match generation.next_piece().await {
            Ok(Some(text)) => {
                // A closed stream drops `generation` on return, which cancels it.
                if tx.send(Ok(piece(text, false))).await.is_err() {
                    return;
                }
            }
            Ok(None) => {
                s.record(
                    &name,
                    "grpc",
                    arrived,
                    Ok((call.id.clone(), generation.generated)),
                );
                if final_wanted {
                    let _ = tx.send(Ok(piece(String::new(), true))).await;
                }
                return;
            }
            Err(e) => {
                s.record(&name, "grpc", arrived, Err(&e));
                let _ = tx.send(Ok(error(&e))).await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_are_read_in_every_unit_and_bad_ones_ignored() {
        let meta = |v: &str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(meta("2S"), Some(Duration::from_secs(2)));
        assert_eq!(meta("150m"), Some(Duration::from_millis(150)));
        assert_eq!(meta("7u"), Some(Duration::from_micros(7)));
        assert_eq!(meta("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(meta("5x"), None);
        assert_eq!(meta("S"), None);
        assert_eq!(meta("123456789S"), None, "more than 8 digits");
        assert_eq!(grpc_timeout(&tonic::metadata::MetadataMap::new()), None);
    }

    #[test]
    fn the_earlier_deadline_wins_and_raw_contents_must_match_inputs() {
        let req = |timeout: Option<i64>| ModelInferRequest {
            parameters: timeout
                .map(|t| {
                    (
                        "timeout".to_string(),
                        InferParameter {
                            parameter_choice: Some(ParameterChoice::Int64Param(t)),
                        },
                    )
                })
                .into_iter()
                .collect(),
            ..Default::default()
        };
        let ms = Some(Duration::from_millis(5));
        assert_eq!(call(req(Some(2_000)), ms).unwrap().timeout_us, 2_000);
        assert_eq!(call(req(Some(9_000)), ms).unwrap().timeout_us, 5_000);
        assert_eq!(call(req(None), ms).unwrap().timeout_us, 5_000);
        assert_eq!(call(req(None), None).unwrap().timeout_us, 0);
        assert!(call(req(Some(-1)), None).unwrap_err().1.contains("timeout"));
        let mut r = req(None);
        r.raw_input_contents = vec![vec![1]];
        assert!(call(r, None).unwrap_err().1.contains("one per input"));
    }
}

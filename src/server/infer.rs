//! One inference request, whichever form carried it (REST JSON, REST with binary tensors,
//! gRPC): its input tensor checked against the model and turned into engine inputs, its
//! deadline and requested outputs, and the answers as columns that each protocol encodes in its
//! own way. The protocol front ends only translate; what is refused, and why, is decided here
//! once.

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use base64::Engine as _;
use serde_json::{Map, Value};

use super::{ApiError, AppState, Model, bad};
use crate::serve::{Exit, Input, InputSpec, RequestOptions, Response};

/// A tensor's elements, decoded from the protocol's form.
#[derive(Debug)]
pub(crate) enum Elements {
    /// BYTES sent as JSON strings. An image model reads them as base64 (JSON has no bytes).
    Strings(Vec<String>),
    /// BYTES sent as bytes (gRPC, binary tensors).
    Bytes(Vec<Vec<u8>>),
    U8(Vec<u8>),
    F32(Vec<f32>),
}

impl Elements {
    fn len(&self) -> usize {
        match self {
            Elements::Strings(v) => v.len(),
            Elements::Bytes(v) => v.len(),
            Elements::U8(v) => v.len(),
            Elements::F32(v) => v.len(),
        }
    }

    /// The elements of a JSON `data` array (nested arrays allowed, row-major, as the
    /// protocol's JSON form says).
    pub fn from_json(name: &str, datatype: &str, data: &Value) -> Result<Elements, ApiError> {
        let data = data
            .as_array()
            .ok_or_else(|| bad(format!("input {name:?}: data must be a JSON array")))?;
        let mut flat = Vec::new();
        fn flatten<'a>(v: &'a [Value], out: &mut Vec<&'a Value>) {
            for x in v {
                match x {
                    Value::Array(a) => flatten(a, out),
                    x => out.push(x),
                }
            }
        }
        flatten(data, &mut flat);
        let each = |what: &str| {
            bad(format!(
                "input {name:?}: {datatype} elements must be {what}"
            ))
        };
        Ok(match datatype {
            "BYTES" => Elements::Strings(
                flat.iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .ok_or_else(|| each("JSON strings"))?,
            ),
            "UINT8" => Elements::U8(
                flat.iter()
                    .map(|v| v.as_u64().and_then(|x| u8::try_from(x).ok()))
                    .collect::<Option<_>>()
                    .ok_or_else(|| each("integers 0-255"))?,
            ),
            "FP32" => Elements::F32(
                flat.iter()
                    .map(|v| v.as_f64().map(|x| x as f32))
                    .collect::<Option<_>>()
                    .ok_or_else(|| each("numbers"))?,
            ),
            other => return Err(unsupported(name, other)),
        })
    }

    /// The elements of a raw tensor (gRPC `raw_input_contents`, binary tensor data): row-major,
    /// little-endian; each BYTES element a 4-byte little-endian length and then its bytes.
    pub fn from_raw(name: &str, datatype: &str, raw: &[u8]) -> Result<Elements, ApiError> {
        Ok(match datatype {
            "BYTES" => {
                let mut items = Vec::new();
                let mut rest = raw;
                while !rest.is_empty() {
                    let (len, tail) = rest
                        .split_first_chunk::<4>()
                        .map(|(l, t)| (u32::from_le_bytes(*l) as usize, t))
                        .ok_or_else(|| {
                            bad(format!(
                                "input {name:?}: raw BYTES end inside an element's 4-byte length"
                            ))
                        })?;
                    if len > tail.len() {
                        return Err(bad(format!(
                            "input {name:?}: a raw BYTES element declares {len} bytes, {} remain",
                            tail.len()
                        )));
                    }
                    items.push(tail[..len].to_vec());
                    rest = &tail[len..];
                }
                Elements::Bytes(items)
            }
            "UINT8" => Elements::U8(raw.to_vec()),
            "FP32" => {
                if !raw.len().is_multiple_of(4) {
                    return Err(bad(format!(
                        "input {name:?}: {} raw bytes are not a whole number of FP32 elements",
                        raw.len()
                    )));
                }
                Elements::F32(
                    raw.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                )
            }
            other => return Err(unsupported(name, other)),
        })
    }
}

pub(crate) fn unsupported(name: &str, datatype: &str) -> ApiError {
    bad(format!(
        "input {name:?}: datatype {datatype}; this server takes BYTES (texts, image files), \
         UINT8 (pixels) or FP32 (normalised values)"
    ))
}

/// One input tensor of a request.
#[derive(Debug)]
pub(crate) struct InputTensor {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    pub data: Elements,
}

/// An output the request asks for, with its classification count if it gave one.
#[derive(Debug)]
pub(crate) struct RequestedOutput {
    pub name: String,
    pub classification: Option<i64>,
}

/// The `timeout` request parameter (microseconds; 0, as in Triton, when none was given).
pub(crate) fn timeout_param(params: &Map<String, Value>) -> Result<u64, ApiError> {
    match params.get("timeout") {
        Some(v) => v
            .as_u64()
            .ok_or_else(|| bad("parameter timeout: microseconds, a non-negative integer")),
        None => Ok(0),
    }
}

/// A requested output with its parameters (`classification: k`).
pub(crate) fn requested_output(
    name: String,
    params: &Map<String, Value>,
) -> Result<RequestedOutput, ApiError> {
    let classification = match params.get("classification") {
        None => None,
        Some(k) => Some(
            k.as_i64()
                .ok_or_else(|| bad("classification: the number of classes, an integer"))?,
        ),
    };
    Ok(RequestedOutput {
        name,
        classification,
    })
}

/// An inference request, protocol aside.
#[derive(Debug)]
pub(crate) struct Call {
    pub id: Option<String>,
    /// The `timeout` parameter, microseconds; 0 (as in Triton) when none was given.
    pub timeout_us: u64,
    /// Every request parameter, as JSON values (a decoder reads its generation settings here).
    pub parameters: Map<String, Value>,
    pub inputs: Vec<InputTensor>,
    /// Empty: every output.
    pub outputs: Vec<RequestedOutput>,
}

/// The outputs every model has: one element per item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Column {
    Label,
    Class,
    Probability,
    Exit,
}

impl Column {
    pub const ALL: [Column; 4] = [
        Column::Label,
        Column::Class,
        Column::Probability,
        Column::Exit,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Column::Label => "label",
            Column::Class => "class",
            Column::Probability => "probability",
            Column::Exit => "exit",
        }
    }

    pub fn datatype(self) -> &'static str {
        match self {
            Column::Label | Column::Exit => "BYTES",
            Column::Class => "INT64",
            Column::Probability => "FP32",
        }
    }
}

/// An output tensor's elements.
#[derive(Debug)]
pub(crate) enum OutData {
    Strings(Vec<String>),
    I64(Vec<i64>),
    F32(Vec<f32>),
}

/// One output tensor of an answer.
#[derive(Debug)]
pub(crate) struct OutTensor {
    pub name: &'static str,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
    pub data: OutData,
}

impl OutTensor {
    /// The elements as JSON values.
    pub fn json(&self) -> Vec<Value> {
        match &self.data {
            OutData::Strings(v) => v.iter().map(|s| Value::String(s.clone())).collect(),
            OutData::I64(v) => v.iter().map(|&x| Value::from(x)).collect(),
            OutData::F32(v) => v.iter().map(|&x| Value::from(x)).collect(),
        }
    }

    /// The elements as a raw tensor, encoded as [`Elements::from_raw`] reads one.
    pub fn raw(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match &self.data {
            OutData::Strings(v) => {
                for s in v {
                    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                    out.extend_from_slice(s.as_bytes());
                }
            }
            OutData::I64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            OutData::F32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        }
        out
    }
}

/// What the model answered.
pub(crate) struct Answer {
    pub id: Option<String>,
    pub outputs: Vec<OutTensor>,
    /// The `exit` response parameter: where a single item's answer came from (a batch's items
    /// may differ; the `exit` output has each).
    pub exit: Option<String>,
    /// What the request log counts: answers, or tokens generated.
    pub items: usize,
}

/// Where an answer came from, as the `exit` output says it: the ramp's point, or `final`.
pub(crate) fn exit_name(e: &Exit) -> String {
    match e {
        Exit::Ramp { point, .. } => point.clone(),
        Exit::Final => "final".to_string(),
    }
}

/// The classifier's answers as the requested columns; `classification`: the label column as
/// Triton's classification extension writes it, "score:index:label".
fn column_tensors(
    answers: &[Response],
    columns: &[Column],
    classification: bool,
) -> Vec<OutTensor> {
    let n = answers.len() as i64;
    let strings =
        |f: &dyn Fn(&Response) -> String| OutData::Strings(answers.iter().map(f).collect());
    columns
        .iter()
        .map(|&c| OutTensor {
            name: c.name(),
            datatype: c.datatype(),
            shape: vec![n],
            data: match c {
                Column::Label if classification => {
                    strings(&|a| format!("{}:{}:{}", a.confidence, a.class, a.label))
                }
                Column::Label => strings(&|a| a.label.clone()),
                Column::Exit => strings(&|a| exit_name(&a.exit)),
                Column::Class => OutData::I64(answers.iter().map(|a| a.class as i64).collect()),
                Column::Probability => OutData::F32(answers.iter().map(|a| a.confidence).collect()),
            },
        })
        .collect()
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

/// The name of a model's input tensor.
pub(crate) fn input_name(spec: InputSpec) -> &'static str {
    match spec {
        InputSpec::Text => "text",
        InputSpec::Image { .. } => "image",
    }
}

/// The request's input tensor as engine inputs, checked against the model.
fn engine_inputs(spec: InputSpec, mut inputs: Vec<InputTensor>) -> Result<Vec<Input>, ApiError> {
    let want = input_name(spec);
    if inputs.len() != 1 {
        return Err(bad(format!(
            "{} inputs: the model takes exactly one ({want})",
            inputs.len()
        )));
    }
    let input = inputs.remove(0);
    if input.name != want {
        return Err(bad(format!(
            "input {:?}: the model's input is named {want:?}",
            input.name
        )));
    }
    let n = elements(&input.shape)?;
    if input.data.len() != n {
        return Err(bad(format!(
            "input {:?}: shape {:?} holds {n} elements, data has {}",
            input.name,
            input.shape,
            input.data.len()
        )));
    }
    let name = &input.name;
    match spec {
        InputSpec::Text => match input.data {
            Elements::Strings(s) => Ok(s.into_iter().map(Input::Text).collect()),
            Elements::Bytes(b) => b
                .into_iter()
                .map(|b| {
                    String::from_utf8(b)
                        .map(Input::Text)
                        .map_err(|_| bad(format!("input {name:?}: a text is not UTF-8")))
                })
                .collect(),
            _ => Err(bad(format!(
                "input {name:?}: datatype {}, the model takes BYTES (text)",
                input.datatype
            ))),
        },
        InputSpec::Image {
            height,
            width,
            channels,
        } => {
            if let Elements::Strings(_) | Elements::Bytes(_) = input.data {
                // Image files, one per element: shape [batch] or [batch, 1].
                if !matches!(input.shape.as_slice(), [_] | [_, 1]) {
                    return Err(bad(format!(
                        "input {name:?}: shape {:?}; BYTES images are image files, shape [batch]",
                        input.shape
                    )));
                }
                return match input.data {
                    Elements::Bytes(b) => Ok(b.into_iter().map(Input::Encoded).collect()),
                    Elements::Strings(s) => s
                        .iter()
                        .enumerate()
                        .map(|(i, s)| {
                            base64::engine::general_purpose::STANDARD
                                .decode(s.trim())
                                .map(Input::Encoded)
                                .map_err(|e| {
                                    bad(format!(
                                        "input {name:?}: element {i} is not base64 ({e}); JSON \
                                         carries image files as base64 strings"
                                    ))
                                })
                        })
                        .collect(),
                    _ => unreachable!("matched above"),
                };
            }
            let per = height * width * channels;
            let tail = [height as i64, width as i64, channels as i64];
            if !(input.shape.as_slice() == tail
                || input.shape.len() == 4 && input.shape[1..] == tail)
            {
                return Err(bad(format!(
                    "input {name:?}: shape {:?}, the model takes [batch, {height}, {width}, {channels}]",
                    input.shape
                )));
            }
            Ok(match input.data {
                Elements::U8(p) => p
                    .chunks(per.max(1))
                    .map(|c| Input::Pixels(c.to_vec()))
                    .collect(),
                Elements::F32(v) => v
                    .chunks(per.max(1))
                    .map(|c| Input::Normalized(c.to_vec()))
                    .collect(),
                _ => unreachable!("BYTES handled above"),
            })
        }
    }
}

impl AppState {
    /// A request's deadline: its `timeout` parameter in microseconds (0, as in Triton, means
    /// none given), else the model's default, else the server's. A deadline beyond what the
    /// clock can represent is none.
    pub(crate) fn deadline(
        &self,
        timeout_us: u64,
        model_default: Option<Duration>,
        arrived: Instant,
    ) -> Option<Instant> {
        let after = match timeout_us {
            0 => model_default.or(self.cfg.default_timeout),
            us => Some(Duration::from_micros(us)),
        };
        after.and_then(|d| arrived.checked_add(d))
    }

    /// Runs one inference request on model `name`, a classifier or a decoder.
    pub(crate) async fn run_named(
        &self,
        name: &str,
        call: Call,
        arrived: Instant,
    ) -> Result<Answer, ApiError> {
        if let Some(g) = self.generators.iter().find(|g| g.name == name) {
            return super::generate::run_tensors(self, g, call, arrived).await;
        }
        self.run(self.model(name)?, call, arrived).await
    }

    /// Runs one inference request on classifier `m`.
    pub(crate) async fn run(
        &self,
        m: &Model,
        call: Call,
        arrived: Instant,
    ) -> Result<Answer, ApiError> {
        if !self.is_accepting() {
            return Err(ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down".into(),
            ));
        }
        let inputs = engine_inputs(m.engine.input_spec(), call.inputs)?;
        // Classification extension: `classification: k` on the label output asks for
        // "probability:class:label" strings; the engine answers its top class only.
        let mut classification = false;
        let mut columns = Vec::new();
        for o in &call.outputs {
            let Some(c) = Column::ALL.into_iter().find(|c| c.name() == o.name) else {
                return Err(bad(format!(
                    "no output named {:?} (label, class, probability, exit)",
                    o.name
                )));
            };
            match o.classification {
                None => {}
                Some(1) => classification = true,
                Some(_) => {
                    return Err(bad(
                        "classification: this engine answers the top class only (k = 1)",
                    ));
                }
            }
            if !columns.contains(&c) {
                columns.push(c);
            }
        }
        if columns.is_empty() {
            columns = Column::ALL.to_vec();
        }
        let opts = RequestOptions {
            deadline: self.deadline(call.timeout_us, m.default_timeout, arrived),
        };
        // Submit every item before awaiting any, so a batch request is batched by the engine.
        // Image files are decoded as they are submitted: off the async workers, one per
        // decoding slot (as many as cores), each slot taken before its decode starts, so a
        // body of many large images queues for the slots instead of filling memory, and a
        // client that goes away stops the decodes not yet started.
        let mut futures = Vec::with_capacity(inputs.len());
        for input in inputs {
            if !matches!(input, Input::Encoded(_)) {
                futures.push(m.engine.infer_with(input, opts));
                continue;
            }
            let slot = self
                .decode_slots
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| {
                    ApiError(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the server is shutting down".into(),
                    )
                })?;
            let engine = m.engine.clone();
            let submitted = tokio::task::spawn_blocking(move || {
                let f = engine.infer_with(input, opts);
                drop(slot);
                f
            })
            .await
            .map_err(|e| {
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("decoding an image failed: {e}"),
                )
            })?;
            futures.push(submitted);
        }
        let mut answers = Vec::with_capacity(futures.len());
        for f in futures {
            answers.push(f.await?);
        }
        Ok(Answer {
            id: call.id,
            outputs: column_tensors(&answers, &columns, classification),
            exit: match answers.as_slice() {
                [a] => Some(exit_name(&a.exit)),
                _ => None,
            },
            items: answers.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_bytes_elements_round_trip_and_truncation_is_named() {
        let mut raw = Vec::new();
        for s in ["a", "", "héllo"] {
            raw.extend_from_slice(&(s.len() as u32).to_le_bytes());
            raw.extend_from_slice(s.as_bytes());
        }
        match Elements::from_raw("text", "BYTES", &raw).unwrap() {
            Elements::Bytes(b) => assert_eq!(b, vec![b"a".to_vec(), vec![], "héllo".into()]),
            other => panic!("{other:?}"),
        }
        let e = Elements::from_raw("text", "BYTES", &raw[..raw.len() - 1]).unwrap_err();
        assert!(e.1.contains("declares 6 bytes, 5 remain"), "{}", e.1);
        let e = Elements::from_raw("text", "BYTES", &raw[..2]).unwrap_err();
        assert!(e.1.contains("4-byte length"), "{}", e.1);
        let e = Elements::from_raw("image", "FP32", &[0; 7]).unwrap_err();
        assert!(e.1.contains("whole number of FP32"), "{}", e.1);
        let e = Elements::from_raw("image", "INT8", &[0; 7]).unwrap_err();
        assert!(e.1.contains("datatype INT8"), "{}", e.1);
    }

    #[test]
    fn inputs_are_checked_against_the_model() {
        let img = InputSpec::Image {
            height: 2,
            width: 2,
            channels: 3,
        };
        let t = |name: &str, shape: Vec<i64>, data| InputTensor {
            name: name.into(),
            datatype: "UINT8".into(),
            shape,
            data,
        };
        let ok = engine_inputs(
            img,
            vec![t("image", vec![2, 2, 2, 3], Elements::U8(vec![7; 24]))],
        );
        assert_eq!(ok.unwrap().len(), 2);
        let e = engine_inputs(
            img,
            vec![t("image", vec![2, 4, 3], Elements::U8(vec![7; 24]))],
        );
        assert!(e.unwrap_err().1.contains("[batch, 2, 2, 3]"));
        let e = engine_inputs(img, vec![t("text", vec![1], Elements::U8(vec![7]))]);
        assert!(e.unwrap_err().1.contains("named \"image\""));
        let e = engine_inputs(img, vec![t("image", vec![-1], Elements::U8(vec![]))]);
        assert!(e.unwrap_err().1.contains("non-negative"));
        let files = Elements::Strings(vec!["not base64!".into()]);
        let e = engine_inputs(img, vec![t("image", vec![1], files)]);
        assert!(e.unwrap_err().1.contains("not base64"));
        let e = engine_inputs(
            InputSpec::Text,
            vec![t("text", vec![1], Elements::Bytes(vec![vec![0xff]]))],
        );
        assert!(e.unwrap_err().1.contains("not UTF-8"));
        let e = engine_inputs(InputSpec::Text, vec![]);
        assert!(e.unwrap_err().1.contains("exactly one"));
    }
}

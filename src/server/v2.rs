//! The JSON messages of the Open Inference Protocol (KServe v2) REST API that the server
//! speaks: the inference request and response, metadata, and errors.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `POST /v2/models/{name}/infer`.
#[derive(Debug, Deserialize)]
pub struct InferRequest {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub parameters: Map<String, Value>,
    pub inputs: Vec<RequestInput>,
    #[serde(default)]
    pub outputs: Vec<RequestOutput>,
}

#[derive(Debug, Deserialize)]
pub struct RequestInput {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// Absent when the tensor comes as binary data (`parameters.binary_data_size`).
    #[serde(default)]
    pub data: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct RequestOutput {
    pub name: String,
    #[serde(default)]
    pub parameters: Map<String, Value>,
}

#[derive(Debug, Serialize)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub parameters: Map<String, Value>,
    pub outputs: Vec<ResponseOutput>,
}

#[derive(Debug, Serialize)]
pub struct ResponseOutput {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: &'static str,
    pub data: Vec<Value>,
}

/// One tensor of model metadata.
#[derive(Debug, Serialize)]
pub struct TensorMeta {
    pub name: &'static str,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

#[derive(Debug, Serialize)]
pub struct ModelMeta {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: &'static str,
    pub inputs: Vec<TensorMeta>,
    pub outputs: Vec<TensorMeta>,
}

#[derive(Debug, Serialize)]
pub struct ServerMeta {
    pub name: &'static str,
    pub version: &'static str,
    pub extensions: Vec<&'static str>,
}

/// Every error answer: `{"error": "..."}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: String,
}

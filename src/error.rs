//! One error type for the whole library. Every variant names the thing that is wrong
//! (a file, a tensor, an input) so that a message alone tells the user what to fix.

use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read or written at all.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file is not a well-formed model or ramps file (container, header or metadata).
    #[error("{}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },

    /// One tensor of an otherwise readable file is wrong (missing, extra, dtype, shape, values).
    #[error("{}: tensor `{tensor}`: {reason}", path.display())]
    Tensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },

    /// A ramps file was trained for a different backbone than the one it is loaded with.
    #[error(
        "{}: these ramps were trained for a backbone with sha256 {expected}, but the model has sha256 {actual}; retrain the ramps for this model",
        path.display()
    )]
    BackboneMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },

    /// Tokenizer construction or encoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A request or batch handed to the engine is malformed (empty, too long, bad token id ...).
    #[error("invalid input: {0}")]
    Input(String),

    /// An op was handed arguments that do not fit together (shapes, lengths, geometry, ids),
    /// found by `backend::op_check` before any backend runs it, so every backend reports the
    /// same thing the same way.
    #[error("{op}: {what}: expected {expected}, got {got}")]
    Shape {
        op: &'static str,
        what: String,
        expected: String,
        got: String,
    },

    /// A device (emulated or real) refused or failed a call: memory, copies, synchronisation,
    /// the driver or NVRTC not loading.
    #[error("backend `{backend}`: {what}: {reason}")]
    Device {
        backend: &'static str,
        what: String,
        reason: String,
    },

    /// One kernel could not be launched or failed while it ran (bad launch geometry, a kernel
    /// that is not there, a deadlock the emulated device detected, a compile error).
    #[error("backend `{backend}`: kernel `{kernel}`: {reason}")]
    Kernel {
        backend: &'static str,
        kernel: String,
        reason: String,
    },

    /// The key/value cache of a decoder has no room for a new sequence or more tokens of one;
    /// nothing that was running has been evicted to make room.
    #[error("key/value cache full: {0}")]
    CacheFull(String),

    /// A setting outside the range that makes sense; the library API checks the same ranges
    /// the command line does.
    #[error("{knob} = {value} is outside {range}")]
    Config {
        knob: String,
        value: String,
        range: String,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn tensor(
        path: impl Into<PathBuf>,
        tensor: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::Tensor {
            path: path.into(),
            tensor: tensor.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn shape(
        op: &'static str,
        what: impl Into<String>,
        expected: impl std::fmt::Display,
        got: impl std::fmt::Display,
    ) -> Self {
        Error::Shape {
            op,
            what: what.into(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }

    pub(crate) fn device(
        backend: &'static str,
        what: impl Into<String>,
        reason: impl std::fmt::Display,
    ) -> Self {
        Error::Device {
            backend,
            what: what.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn kernel(
        backend: &'static str,
        kernel: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::Kernel {
            backend,
            kernel: kernel.into(),
            reason: reason.into(),
        }
    }

    /// A knob outside its range: `range` says what is accepted (`1..=1024`).
    pub fn config(
        knob: impl Into<String>,
        value: impl std::fmt::Display,
        range: impl Into<String>,
    ) -> Self {
        Error::Config {
            knob: knob.into(),
            value: value.to_string(),
            range: range.into(),
        }
    }
}

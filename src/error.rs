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

    /// A backend could not be created or failed to run an op.
    #[error("backend `{backend}`: {reason}")]
    Backend {
        backend: &'static str,
        reason: String,
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
}

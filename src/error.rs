//! One error type for the library: every variant names what was wrong and where.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration field has an invalid value (or the JSON is malformed).
    #[error("config: {0}")]
    Config(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file is not a valid safetensors file.
    #[error("{path}: not a valid safetensors file: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A tensor is missing, or has the wrong dtype or shape.
    #[error("tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },
    /// An argument of a call (lengths, sequence boundaries, slots) is invalid.
    #[error("{0}")]
    Invalid(String),
    /// A backend is not built in, has no device, or failed.
    #[error("backend {backend}: {msg}")]
    Backend { backend: &'static str, msg: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }

    pub(crate) fn tensor(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor {
            name: name.into(),
            msg: msg.into(),
        }
    }

    /// A tensor whose shape is not the one expected.
    pub(crate) fn shape(name: impl Into<String>, expected: &[usize], got: &[usize]) -> Self {
        Error::tensor(name, format!("expected shape {expected:?}, got {got:?}"))
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}

//! The store's errors.

use std::path::PathBuf;

/// What can go wrong in the environment store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The spec is malformed or asks for something the store refuses.
    #[error("invalid environment spec: {0}")]
    InvalidSpec(String),
    /// No local interpreter has the requested Python version.
    #[error("Python {requested} is not installed on this machine (interpreter downloads are off); available: {}", if available.is_empty() { "none".to_string() } else { available.join(", ") })]
    PythonNotFound {
        /// The version the spec asks for.
        requested: String,
        /// The versions found, with their paths.
        available: Vec<String>,
    },
    /// The uv binary is missing.
    #[error("uv was not found: set QUIVER_UV or the store's uv path, or run scripts/setup")]
    UvNotFound,
    /// uv could not resolve the requirements; the message is uv's own.
    #[error("could not resolve the environment:\n{0}")]
    Resolve(String),
    /// uv could not build the resolved environment; the message is uv's own.
    #[error("could not build the environment ({step}):\n{message}")]
    Build {
        /// The step that failed: creating the venv, installing packages.
        step: &'static str,
        /// uv's explanation.
        message: String,
    },
    /// No environment has this key.
    #[error("no environment {0} in the store")]
    NotFound(String),
    /// An environment's manifest cannot be read.
    #[error("environment manifest {path} is unreadable: {source}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// Why it does not parse.
        source: serde_json::Error,
    },
    /// A file-system operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the store was doing.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Wraps an I/O error with what was being done.
pub(crate) fn io(context: impl FnOnce() -> String) -> impl FnOnce(std::io::Error) -> StoreError {
    move |source| StoreError::Io { context: context(), source }
}

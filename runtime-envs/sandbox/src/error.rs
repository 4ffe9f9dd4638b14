use std::path::PathBuf;

/// Why a sandbox could not be built or entered.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The errno.
        source: nix::errno::Errno,
    },
    /// The spec asks for something unsafe or impossible.
    #[error("sandbox spec: {0}")]
    Spec(String),
    /// The seccomp filter could not be built or installed.
    #[error("seccomp: {0}")]
    Seccomp(String),
    /// Landlock refused the rules.
    #[error("landlock: {0}")]
    Landlock(String),
    /// A cgroup file could not be written or read.
    #[error("cgroup {path}: {source}")]
    Cgroup {
        /// The file or folder.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl SandboxError {
    pub(crate) fn sys(what: impl Into<String>, source: nix::errno::Errno) -> Self {
        SandboxError::Sys { what: what.into(), source }
    }
}

/// Result with [`SandboxError`].
pub type Result<T> = std::result::Result<T, SandboxError>;

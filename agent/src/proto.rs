//! The messages between the agent and a worker process, over a `SOCK_SEQPACKET` socketpair on
//! the worker's fd 3. Each message is JSON bytes (with no fds) sent with
//! `quiver_shm::transport`; tables travel as SIPC messages right after the message naming them.
//!
//! ```text
//! agent  -> worker   Request (JSON), then one SIPC table per input, in `inputs` order
//! worker -> agent    Hello (JSON), as soon as it has the request
//! worker -> agent    Reply (JSON); after Reply::Table, the output as one SIPC table
//! ```

use std::os::fd::BorrowedFd;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::plan::{Edges, Task};

/// Largest JSON message either side accepts.
pub const MAX_MESSAGE: usize = 16 << 20;

/// What the agent asks a worker to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// Run and node, for the worker's process name and messages.
    pub run: String,
    /// The node's name.
    pub node: String,
    /// What to run.
    pub task: Task,
    /// Names under which the inputs are visible (the parents' node names).
    pub inputs: Vec<String>,
    /// Where a materialization stages its files.
    pub staging: Option<PathBuf>,
    /// How the output is handed on.
    #[serde(default)]
    pub edges: Edges,
}

/// The worker's first message.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Hello {
    /// When it received its request, on [`monotonic_ns`]'s clock: the end of the agent's
    /// per-node overhead (a worker started for the node gets it right after its `main` begins;
    /// a waiting one, as soon as it is sent).
    pub started_ns: u64,
}

/// CLOCK_MONOTONIC in ns: one clock for every process on the machine, so the agent can compare
/// a worker's start with its own events.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Bytes a node handed on, per way.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Bytes {
    /// Referenced in place (zero copy).
    pub referenced: u64,
    /// Copied into the output segments.
    pub copied: u64,
    /// Moved into a segment by the quiver-kzero module (whole pages, no copy).
    #[serde(default)]
    pub moved: u64,
}

/// What the worker answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    /// Success; the output table follows.
    Table {
        /// Rows of the output.
        rows: u64,
        /// How its buffers were handed on.
        bytes: Bytes,
    },
    /// Success without a table output (a materialization).
    Staged {
        /// Rows written.
        rows: u64,
        /// Files written and synced, ready to publish.
        files: Vec<PathBuf>,
    },
    /// Success of an expectation that returned `True` (no table follows).
    Passed,
    /// The function failed.
    Failed {
        /// The user's mistake (bad SQL, a missing column), not the system's.
        user: bool,
        /// What went wrong.
        message: String,
    },
}

/// Sends one JSON message.
pub fn send_json<T: Serialize>(sock: BorrowedFd<'_>, msg: &T) -> quiver_shm::Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(|e| quiver_shm::ShmError::Protocol(e.to_string()))?;
    quiver_shm::transport::send(sock, &bytes, &[])
}

/// Receives one JSON message (no fds allowed).
pub fn recv_json<T: for<'de> Deserialize<'de>>(sock: BorrowedFd<'_>) -> quiver_shm::Result<T> {
    let limits = quiver_shm::transport::RecvLimits { max_descriptor_bytes: MAX_MESSAGE, max_fds: 0 };
    let (bytes, _) = quiver_shm::transport::recv(sock, &limits)?;
    serde_json::from_slice(&bytes).map_err(|e| quiver_shm::ShmError::Protocol(format!("bad message: {e}")))
}

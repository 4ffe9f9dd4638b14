//! The messages between the agent and a worker process, over a `SOCK_SEQPACKET` socketpair on
//! the worker's fd 3. Each message is JSON bytes (with no fds) sent with
//! `quiver_shm::transport`; tables travel as SIPC messages right after the message naming them.
//!
//! ```text
//! agent  -> worker   Request (JSON), then one SIPC table per input, in `inputs` order
//! worker -> agent    Hello (JSON), as soon as it has the request
//! worker -> agent    Reply (JSON); after Reply::Table, the output as one SIPC table
//! ```
//!
//! A scan with `cache` set talks with the agent's deserialization cache between Hello and
//! Reply:
//!
//! ```text
//! worker -> agent    ScanUp::Plan: the files (with their identity) and the chunks it needs
//! agent  -> worker   Round: chunks given (one SIPC table each follows) and chunks to decode
//! worker -> agent    ScanUp::Decoded, then one SIPC table per decoded chunk, in Round order
//!                    (rounds repeat until one is `last`)
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
    /// A scan takes and gives column chunks through the agent's cache (the rounds above).
    #[serde(default)]
    pub cache: bool,
}

/// The decoding options every cached chunk was made with; part of a chunk's key, so a change
/// of them never serves chunks decoded differently.
pub const DECODE_OPTIONS: &str = "arrow-rs-60;batch=131072;v1";

/// A file's identity as `stat` gives it: a rewritten file gets a new one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub struct FileIdent {
    /// The path the scan opened.
    pub path: PathBuf,
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
}

impl FileIdent {
    /// The identity of `path` from its metadata (of the open file, in a worker).
    pub fn of(path: &std::path::Path, m: &std::fs::Metadata) -> FileIdent {
        use std::os::unix::fs::MetadataExt;
        FileIdent {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec()),
        }
    }
}

/// One column chunk a scan needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkReq {
    /// Index into the plan's files.
    pub file: u32,
    /// Row group.
    pub row_group: u32,
    /// Root column index in the file's schema.
    pub column: u32,
    /// The column's name.
    pub name: String,
    /// Rows of the row group.
    pub rows: u64,
}

/// What a caching scan worker says between Hello and Reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ScanUp {
    /// The chunks the scan needs, after projection and row-group pruning.
    Plan {
        /// Its files.
        files: Vec<FileIdent>,
        /// Its chunks.
        chunks: Vec<ChunkReq>,
    },
    /// The chunks of the last round's `decode`, as SIPC tables right after this message.
    Decoded {
        /// How many follow.
        count: u32,
    },
    /// The scan failed (the same JSON as [`Reply::Failed`]).
    Failed {
        /// The user's mistake.
        user: bool,
        /// What went wrong.
        message: String,
    },
}

/// The agent's answer to a plan, or to the chunks decoded in the last round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Round {
    /// Chunks (plan indices) given from the cache; one SIPC table each follows, in order.
    pub give: Vec<u32>,
    /// Chunks to decode and send back.
    pub decode: Vec<u32>,
    /// No round follows: after its decoded chunks, the worker assembles its output.
    pub last: bool,
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

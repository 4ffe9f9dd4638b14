//! `quiver worker`: one function invocation in its own process. It reads its request and input
//! tables from fd 3, runs the task, and answers with its output. The agent never parses table
//! data itself; every scan, query and write happens here.

mod cached;
mod ipc;
mod materialize;
mod scan;

pub use scan::parquet_files;
mod sql;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use quiver_shm::sipc::{ReadOptions, SipcRead, TableWriter, read_table};
use quiver_shm::transport::{RecvLimits, recv, send_table};

use crate::plan::{Edges, Task};
use crate::proto::{Bytes, Hello, Reply, Request, recv_json, send_json};

/// A failure of the function, told apart from a failure of the system.
#[derive(Debug, thiserror::Error)]
pub enum WorkError {
    /// The user's mistake: bad SQL, a missing column, a missing file.
    #[error("{0}")]
    User(String),
    /// Something else broke.
    #[error("{0}")]
    System(String),
}

impl WorkError {
    fn system(e: impl std::fmt::Display) -> Self {
        WorkError::System(e.to_string())
    }
}

/// Where a task's output goes.
pub enum Output {
    /// A table to hand on.
    Table(Vec<RecordBatch>, arrow_schema::SchemaRef),
    /// Files staged for publishing.
    Staged(u64, Vec<std::path::PathBuf>),
}

/// Runs the worker on fd 3; returns the process exit code.
pub fn main() -> i32 {
    // SAFETY: the agent passes the socket as fd 3; nothing else in this process owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(3) };
    // A function, not the agent, is what the OOM killer should pick.
    crate::memory::adopt_function_oom_score();
    // Before any thread or input exists: what a decoder or DuckDB bug exploited by crafted
    // data could reach. Without it the worker does not run.
    if let Err(e) = isolate() {
        eprintln!("quiver worker: cannot leave the host's namespaces: {e}");
        return 2;
    }
    if let Err(e) = quiver_sandbox::restrict_syscalls(false) {
        eprintln!("quiver worker: cannot restrict its system calls: {e}");
        return 2;
    }
    set_process_name("quiver:idle");
    match serve(sock.as_fd()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("quiver worker: {e}");
            2
        }
    }
}

/// The environment variable that names the fd of the empty network namespace a worker joins.
pub const NETNS_FD_ENV: &str = "QUIVER_NETNS_FD";

/// Joins the agent's empty network namespace (no interface, no abstract Unix socket of the
/// host) when the agent passed one, and, as root, new IPC and UTS namespaces. The seccomp
/// filter installed next refuses both calls from then on.
fn isolate() -> Result<(), String> {
    if let Some(fd) = std::env::var(NETNS_FD_ENV).ok().and_then(|v| v.parse::<i32>().ok()) {
        // SAFETY: the agent passed this fd for this purpose and nothing else in the process
        // owns it; it is closed right after.
        let ns = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: setns takes an fd and flags and has no memory effects.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("joining the empty network namespace: {}", std::io::Error::last_os_error()));
        }
    }
    // SAFETY: geteuid has no preconditions; unshare takes flags and has no memory effects.
    if unsafe { libc::geteuid() } == 0 && unsafe { libc::unshare(libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) } != 0 {
        return Err(format!("unshare(ipc, uts): {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn serve(sock: BorrowedFd<'_>) -> quiver_shm::Result<()> {
    // A worker may be started ahead of need; its function begins when the request arrives.
    let req: Request = recv_json(sock)?;
    send_json(sock, &Hello { started_ns: crate::proto::monotonic_ns() })?;
    set_process_name(&format!("quiver:{}", req.node));
    // Still one thread: what the task's files allow binds every thread it will start.
    if let Err(e) = restrict_files(&req) {
        return send_json(sock, &Reply::Failed { user: false, message: format!("confining the worker to its files: {e}") });
    }
    let limits = RecvLimits::default();
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for name in &req.inputs {
        let (desc, fds) = recv(sock, &limits)?;
        // Inputs come from other function processes: validate them fully.
        let t = read_table(&desc, fds, &ReadOptions::default())
            .map_err(|e| quiver_shm::ShmError::Protocol(format!("input {name}: {e}")))?;
        inputs.push((name.clone(), t));
    }
    // Inputs stay mapped until the process exits (and for QUIVER_DEBUG_STOP_NODE).
    let answered = match run(&req, &inputs, sock) {
        Ok(Output::Table(batches, schema)) => {
            let (batches, ipc_copied) = match req.edges {
                Edges::Arena => (batches, 0),
                Edges::Ipc => {
                    let (copies, n) = ipc::copy(&batches, &schema)?;
                    // The originals are DuckDB's or the scan's; see the forget below.
                    std::mem::forget(batches);
                    (copies, n)
                }
            };
            let mut w = TableWriter::new(schema);
            for b in &batches {
                w.write(b)?;
            }
            let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
            let t = w.finish()?;
            let bytes = Bytes { referenced: t.stats.bytes_referenced, copied: t.stats.bytes_copied + ipc_copied, moved: t.stats.bytes_moved };
            send_json(sock, &Reply::Table { rows, bytes })?;
            send_table(sock, &t)?;
            stop_if_asked(&req.node);
            // The process exits next. Releasing the batches would let DuckDB write to its array
            // holders, which were allocated in the arena beside the buffers and are read-only
            // now that the table is sealed.
            std::mem::forget(batches);
            Ok(())
        }
        Ok(Output::Staged(rows, files)) => send_json(sock, &Reply::Staged { rows, files }),
        Err(e) => send_json(sock, &Reply::Failed { user: matches!(e, WorkError::User(_)), message: e.to_string() }),
    };
    // What is left is tearing down (unmapping the inputs can take milliseconds): let the nodes
    // that start now have the CPU first. Lowering one's own priority needs no privilege.
    // SAFETY: setpriority has no memory effects.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
    answered
}

/// Paths every worker may read: what the runtime and DuckDB consult about the machine (CPUs,
/// memory, cgroup limits) and time zones.
const SYSTEM_READS: [&str; 4] = ["/proc", "/sys", "/usr/share/zoneinfo", "/etc/localtime"];

/// Landlock for the task at hand: a scan reads its source, a materialization writes its
/// staging folder, SQL reads no file (DuckDB's `read_csv`, `COPY ... TO` and the like reach
/// only /tmp); all may write /tmp and /dev. Kernels without landlock keep the other layers.
fn restrict_files(req: &Request) -> Result<(), String> {
    let mut read: Vec<PathBuf> = SYSTEM_READS.iter().map(PathBuf::from).collect();
    let mut write: Vec<PathBuf> = vec![PathBuf::from("/tmp"), PathBuf::from("/dev")];
    match &req.task {
        Task::Scan { path, .. } => read.push(PathBuf::from(path)),
        Task::Materialize { .. } => {
            if let Some(staging) = &req.staging {
                std::fs::create_dir_all(staging).map_err(|e| format!("{}: {e}", staging.display()))?;
                write.push(staging.clone());
            }
        }
        Task::Sql { .. } | Task::Python(_) => {}
    }
    // A rule needs its path to exist; a missing source fails the scan with its own message.
    let read: Vec<&Path> = read.iter().map(PathBuf::as_path).filter(|p| p.exists()).collect();
    let write: Vec<&Path> = write.iter().map(PathBuf::as_path).filter(|p| p.exists()).collect();
    match quiver_sandbox::restrict_files(&read, &write, false) {
        Ok(true) => Ok(()),
        Ok(false) => {
            eprintln!("quiver worker: landlock is not available on this kernel: files are not confined");
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

fn run(req: &Request, inputs: &[(String, SipcRead)], sock: BorrowedFd<'_>) -> Result<Output, WorkError> {
    match &req.task {
        Task::Scan { path, columns, filter } if req.cache => cached::run(sock, path, columns.as_deref(), filter.as_ref()),
        Task::Scan { path, columns, filter } => scan::run(path, columns.as_deref(), filter.as_ref()),
        Task::Sql { sql } => sql::run(sql, inputs),
        Task::Materialize { table, .. } => {
            let staging = req.staging.as_ref().ok_or_else(|| WorkError::System("no staging folder given".into()))?;
            let (_, input) = inputs.first().ok_or_else(|| WorkError::System("materialize without input".into()))?;
            materialize::run(table, input, staging)
        }
        Task::Python(_) => Err(WorkError::System("a Python task reached a native worker".into())),
    }
}

/// A debugging aid: with `QUIVER_DEBUG_STOP_NODE=NAME[,NAME...]` in the agent's environment, the
/// worker of each node named stops itself (SIGSTOP) after handing over its output, its inputs
/// still mapped, so its memory can be inspected (`/proc/PID/maps`, `pagemap`) before `kill -CONT`.
fn stop_if_asked(node: &str) {
    if std::env::var("QUIVER_DEBUG_STOP_NODE").is_ok_and(|v| v.split(',').any(|n| n == node)) {
        // SAFETY: raise has no memory effects.
        unsafe { libc::raise(libc::SIGSTOP) };
    }
}

/// Names the process (`ps`, `top`) after its node.
fn set_process_name(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from buf.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr()) };
}

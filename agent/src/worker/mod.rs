//! `quiver worker`: one function invocation in its own process. It reads its request and input
//! tables from fd 3, runs the task, and answers with its output. The agent never parses table
//! data itself; every scan, query and write happens here.

mod cached;
mod ipc;
mod materialize;
mod scan;
mod source;
mod sql;

pub use scan::parquet_files;

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use quiver_sandbox::HostRoot;

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
    let host = match HostRoot::open() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("quiver worker: {e}");
            return 2;
        }
    };
    let user = match isolate(&host) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("quiver worker: cannot leave the host's namespaces: {e}");
            return 2;
        }
    };
    if let Err(e) = quiver_sandbox::restrict_syscalls(false) {
        eprintln!("quiver worker: cannot restrict its system calls: {e}");
        return 2;
    }
    set_process_name("quiver:idle");
    match serve(sock.as_fd(), host, user) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("quiver worker: {e}");
            2
        }
    }
}

/// The environment variable that names the fd of the empty network namespace a worker joins.
pub const NETNS_FD_ENV: &str = "QUIVER_NETNS_FD";

/// The environment variable that carries the sandbox a worker enters (a
/// [`quiver_sandbox::Spec`] as JSON); an agent running as root sets it.
pub const SANDBOX_ENV: &str = "QUIVER_WORKER_SANDBOX";

/// The unprivileged user a sandboxed worker becomes once it has opened its task's files.
#[derive(Debug, Clone, Copy)]
struct Ids {
    uid: u32,
    gid: u32,
}

/// Leaves the host while waiting for a request. With a sandbox spec (the agent is root): new
/// mount, pid, IPC and UTS namespaces, the agent's empty network namespace, a fork (this
/// process waits and exits as its child does; the child is the pid namespace's first process)
/// and a new root holding only the spec's read-only binds, a private /tmp, /proc and a few
/// devices; still root, with `host` open, until the request names the files. Without one
/// (an unprivileged agent): the empty network namespace when passed, nothing else. The
/// seccomp filter installed next refuses every namespace and mount call from then on.
fn isolate(host: &HostRoot) -> Result<Option<Ids>, String> {
    let net = std::env::var(NETNS_FD_ENV).ok().and_then(|v| v.parse::<i32>().ok()).map(|fd| {
        // SAFETY: the agent passed this fd for this purpose and nothing else in the process
        // owns it; it is closed once joined.
        unsafe { OwnedFd::from_raw_fd(fd) }
    });
    let Some(json) = std::env::var_os(SANDBOX_ENV) else {
        if let Some(ns) = net {
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| format!("joining the empty network namespace: {e}"))?;
        }
        return Ok(None);
    };
    let mut spec: quiver_sandbox::Spec =
        serde_json::from_slice(json.as_encoded_bytes()).map_err(|e| format!("the sandbox spec in {SANDBOX_ENV}: {e}"))?;
    quiver_sandbox::enter_namespaces(&[], net.as_ref().map(|n| n.as_fd())).map_err(|e| e.to_string())?;
    drop(net);
    // SAFETY: the worker is single-threaded here (no thread is started before `serve`), so
    // the child may run any code.
    match unsafe { nix::unistd::fork() }.map_err(|e| format!("fork: {e}"))? {
        nix::unistd::ForkResult::Parent { child } => {
            // The agent ends a worker by killing its process group: the child is left in it and
            // this process moves to the agent's own group, so it outlives the kill, reaps the
            // child and exits as it did (a parent killed together with its child would leave
            // the child for init to reap). Terminal signals to that group are the agent's.
            let _ = nix::unistd::getpgid(Some(nix::unistd::getppid())).and_then(|g| nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), g));
            for sig in [nix::sys::signal::Signal::SIGINT, nix::sys::signal::Signal::SIGQUIT] {
                // SAFETY: SIG_IGN installs no handler code.
                let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn) };
            }
            quiver_sandbox::wait_and_exit(child)
        }
        nix::unistd::ForkResult::Child => {}
    }
    spec.keep_fds = vec![3, host.raw()];
    quiver_sandbox::confine_root(&spec).map_err(|e| e.to_string())?;
    Ok(Some(Ids { uid: spec.uid, gid: spec.gid }))
}

/// What a task reads or writes on the host, opened before the worker gives up root and enters
/// landlock.
enum TaskFiles {
    None,
    /// A scan's Parquet files.
    Sources(Vec<source::Source>),
    /// A materialization's file in its staging folder.
    Staged(materialize::Staged),
}

/// Opens the files `req` names through `host`.
fn open_files(req: &Request, host: &HostRoot) -> Result<TaskFiles, WorkError> {
    match &req.task {
        Task::Scan { path, .. } => source::open(host, Path::new(path)).map(TaskFiles::Sources),
        Task::Materialize { table, .. } => {
            let staging = req.staging.as_ref().ok_or_else(|| WorkError::System("no staging folder given".into()))?;
            let dir = host.open_dir(staging).map_err(|e| WorkError::System(format!("{}: {e}", staging.display())))?;
            materialize::create(table, staging, dir).map(TaskFiles::Staged)
        }
        Task::Sql { .. } | Task::Python(_) => Ok(TaskFiles::None),
    }
}

fn serve(sock: BorrowedFd<'_>, host: HostRoot, user: Option<Ids>) -> quiver_shm::Result<()> {
    // A worker may be started ahead of need; its function begins when the request arrives.
    let req: Request = recv_json(sock)?;
    send_json(sock, &Hello { started_ns: crate::proto::monotonic_ns() })?;
    set_process_name(&format!("quiver:{}", req.node));
    let files = open_files(&req, &host);
    // The host stays out of reach from here on, whatever the task.
    drop(host);
    let files = match files {
        Ok(f) => f,
        Err(e) => return fail_early(sock, &req, matches!(e, WorkError::User(_)), e.to_string()),
    };
    if let Some(Ids { uid, gid }) = user
        && let Err(e) = quiver_sandbox::drop_privileges(uid, gid)
    {
        return fail_early(sock, &req, false, format!("dropping root: {e}"));
    }
    // Still one thread: what the task's files allow binds every thread it will start.
    if let Err(e) = restrict_files() {
        return fail_early(sock, &req, false, format!("confining the worker to its files: {e}"));
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
    let answered = match run(&req, &inputs, sock, &files) {
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

/// Answers a failure found before the inputs were read. The agent is still sending them: they
/// are taken off the socket unparsed (their fds closed), so the agent reads the answer instead
/// of a reset connection.
fn fail_early(sock: BorrowedFd<'_>, req: &Request, user: bool, message: String) -> quiver_shm::Result<()> {
    let limits = RecvLimits::default();
    for _ in &req.inputs {
        recv(sock, &limits)?;
    }
    send_json(sock, &Reply::Failed { user, message })
}

/// Paths every worker may read: what the runtime and DuckDB consult about the machine (CPUs,
/// memory, cgroup limits) and time zones.
const SYSTEM_READS: [&str; 4] = ["/proc", "/sys", "/usr/share/zoneinfo", "/etc/localtime"];

/// Landlock: whatever the task, no file beyond the system's own reads and /tmp and /dev
/// (DuckDB's `read_csv`, `COPY ... TO` and the like reach only /tmp); a scan's sources and a
/// materialization's staging folder are already open. Inside the sandbox's root most of these
/// paths do not exist; an unprivileged agent's workers, which keep the host's root, rely on
/// this layer alone. Kernels without landlock keep the other layers.
fn restrict_files() -> Result<(), String> {
    let read: Vec<PathBuf> = SYSTEM_READS.iter().map(PathBuf::from).collect();
    let write: Vec<PathBuf> = vec![PathBuf::from("/tmp"), PathBuf::from("/dev")];
    // A rule needs its path to exist.
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

fn run(req: &Request, inputs: &[(String, SipcRead)], sock: BorrowedFd<'_>, files: &TaskFiles) -> Result<Output, WorkError> {
    let unopened = || WorkError::System("the task's files were not opened".into());
    match (&req.task, files) {
        (Task::Scan { columns, filter, .. }, TaskFiles::Sources(s)) if req.cache => cached::run(sock, s, columns.as_deref(), filter.as_ref()),
        (Task::Scan { columns, filter, .. }, TaskFiles::Sources(s)) => scan::run(s, columns.as_deref(), filter.as_ref()),
        (Task::Sql { sql }, _) => sql::run(sql, inputs),
        (Task::Materialize { .. }, TaskFiles::Staged(out)) => {
            let (_, input) = inputs.first().ok_or_else(|| WorkError::System("materialize without input".into()))?;
            materialize::run(input, out)
        }
        (Task::Python(_), _) => Err(WorkError::System("a Python task reached a native worker".into())),
        _ => Err(unopened()),
    }
}

/// A debugging aid: with `QUIVER_DEBUG_STOP_NODE=NAME[,NAME...]` in the agent's environment, the
/// worker of each node named waits for SIGCONT after handing over its output, its inputs still
/// mapped, so its memory can be inspected (`/proc/PID/maps`, `pagemap`) before `kill -CONT`.
/// A sandboxed worker is the first process of its pid namespace, which cannot stop itself
/// (the kernel drops signals it sends itself without a handler), so it waits in `sigsuspend`
/// with a SIGCONT handler, which shows in `SigCgt` of `/proc/PID/status`.
fn stop_if_asked(node: &str) {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal, sigaction};
    static CONTINUED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    extern "C" fn on_cont(_: libc::c_int) {
        CONTINUED.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    if !std::env::var("QUIVER_DEBUG_STOP_NODE").is_ok_and(|v| v.split(',').any(|n| n == node)) {
        return;
    }
    let mut cont = SigSet::empty();
    cont.add(Signal::SIGCONT);
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&cont), None);
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    let _ = unsafe { sigaction(Signal::SIGCONT, &SigAction::new(SigHandler::Handler(on_cont), SaFlags::empty(), SigSet::empty())) };
    while !CONTINUED.load(std::sync::atomic::Ordering::SeqCst) {
        SigSet::empty().suspend().ok();
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

//! Starting one function invocation: a `quiver worker` process fed over a socketpair, its
//! inputs sent as SIPC tables, its output received and checked, with a timeout and
//! cancellation that kill the whole process group.
//!
//! This is the seam the sandbox and zygotes (runtime-envs) plug into: how the process is made
//! changes; the conversation over the socket does not.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use quiver_shm::SealedSegment;
use quiver_shm::sipc::{Limits, RawDescriptor};
use quiver_shm::transport::{RecvLimits, recv, send};
use tokio::sync::watch;

use crate::proto::{Bytes, Hello, Reply, Request, monotonic_ns, recv_json, send_json};
use crate::tables::StoredTable;
use crate::telemetry::{KernelTelemetry, PendingFigures, WorkerCgroup};

/// How a node ended, when it did not succeed.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum NodeError {
    /// The function's own mistake.
    #[error("{0}")]
    User(String),
    /// A failure of the worker process or the system.
    #[error("{0}")]
    System(String),
    /// Past its wall-clock limit.
    #[error("timed out after {0:.1} s")]
    Timeout(f64),
    /// Cancelled (the run failed elsewhere, was cancelled, or the agent is stopping).
    #[error("cancelled")]
    Cancelled,
}

/// What a finished node produced.
#[derive(Debug)]
pub enum NodeOutput {
    /// A table in sealed segments.
    Table(StoredTable, Bytes),
    /// Files staged for publishing.
    Staged(u64, Vec<PathBuf>),
}

/// When a worker started and when its output was in the agent's hands ([`monotonic_ns`]).
#[derive(Debug)]
pub struct Timing {
    /// A slot was granted (set by the executor).
    pub slot_ns: u64,
    /// The worker's first instruction.
    pub started_ns: u64,
    /// Its answer (and output) received.
    pub done_ns: u64,
    /// How a Python function started: `preforked` (forked ahead, before its node was ready),
    /// `zygote` (forked from a warm one when ready) or `cold` (its zygote had to be started).
    pub start: Option<&'static str>,
    /// Peak memory of the function's cgroup, when the kernel reports one.
    pub memory_peak: Option<u64>,
    /// The kernel's figures, ready once the function process has exited (telemetry on).
    pub kernel: Option<PendingFigures>,
    /// A scan through the cache: its chunks hit and decoded.
    pub cache: Option<crate::cache::ScanStats>,
}

/// The cache a scan talks to, and the memory manager that bounds it.
pub type CacheLink = Option<(Arc<crate::cache::Cache>, Arc<crate::memory::Memory>)>;

/// A started worker waiting for its request on `sock`.
#[derive(Debug)]
struct Started {
    child: std::process::Child,
    sock: OwnedFd,
    /// Its own watched cgroup (telemetry on).
    cgroup: Option<WorkerCgroup>,
}

/// How native workers are started: what they are counted by and what they enter.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Telemetry: each worker's watched cgroup and copy meter.
    pub kernel: Arc<KernelTelemetry>,
    /// The empty network namespace workers join (None without root).
    pub netns: Option<Arc<OwnedFd>>,
    /// The sandbox workers enter, as the JSON of a [`quiver_sandbox::Spec`] (None without
    /// root: workers then keep the host's root and user, confined by seccomp and landlock).
    pub sandbox: Option<Arc<str>>,
}

/// The empty folder each function process mounts its new root on (inside its own mount
/// namespace, so they never see each other's).
pub const SANDBOX_ROOT: &str = "/run/quiver/sandbox";

impl Setup {
    /// The sandbox native workers enter when the agent runs as root: nothing of the host but
    /// the time zones, a private /tmp of `[python] tmp_bytes`, running as `[python] uid`/`gid`.
    /// None for an unprivileged agent, which cannot make namespaces.
    pub fn worker_sandbox(cfg: &crate::config::PythonConfig) -> Result<Option<Arc<str>>, String> {
        if !nix::unistd::Uid::effective().is_root() {
            return Ok(None);
        }
        std::fs::create_dir_all(SANDBOX_ROOT).map_err(|e| format!("creating {SANDBOX_ROOT}: {e}"))?;
        let binds = ["/usr/share/zoneinfo", "/etc/localtime"]
            .into_iter()
            .filter(|p| std::fs::symlink_metadata(p).is_ok())
            .map(quiver_sandbox::Bind::ro)
            .collect();
        let spec = quiver_sandbox::Spec {
            root: PathBuf::from(SANDBOX_ROOT),
            binds,
            tmp_bytes: cfg.tmp_bytes,
            uid: cfg.uid,
            gid: cfg.gid,
            hostname: "quiver".into(),
            // A cached scan of a large table holds a memfd per decoded chunk: as many fds as
            // the agent may have, not a function's default.
            limits: quiver_sandbox::Limits { open_files: open_files_limit().max(quiver_sandbox::Limits::default().open_files), ..quiver_sandbox::Limits::default() },
            keep_fds: Vec::new(),
            network: false,
            workdir: PathBuf::from("/tmp"),
        };
        spec.validate().map_err(|e| e.to_string())?;
        serde_json::to_string(&spec).map(|s| Some(s.into())).map_err(|e| e.to_string())
    }
}

/// The hard limit on open files this process may raise itself to.
fn open_files_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(0, |(_, hard)| hard)
}

type LaunchReply = (Setup, std::sync::mpsc::Sender<Result<Started, NodeError>>);

/// Starts a worker from the launcher thread. Workers must be forked by a thread that lives as
/// long as the agent: PR_SET_PDEATHSIG fires when the *thread* that forked a child exits, so a
/// worker forked by a short-lived or pooled thread would be killed when that thread ends.
fn start_worker(setup: &Setup) -> Result<Started, NodeError> {
    static LAUNCHER: OnceLock<Option<std::sync::mpsc::Sender<LaunchReply>>> = OnceLock::new();
    let launcher = LAUNCHER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<LaunchReply>();
        std::thread::Builder::new()
            .name("quiver-launcher".into())
            .spawn(move || {
                for (setup, reply) in rx {
                    let _ = reply.send(fork_worker(&setup));
                }
            })
            .ok()
            .map(|_| tx)
    });
    let gone = || NodeError::System("the worker launcher thread is gone".into());
    let (tx, rx) = std::sync::mpsc::channel();
    launcher.as_ref().ok_or_else(gone)?.send((setup.clone(), tx)).map_err(|_| gone())?;
    let mut w = rx.recv().map_err(|_| gone())??;
    // Attaching the copy meter takes milliseconds: here, not on the launcher thread, which
    // other launches wait for. A sandboxed worker's work is done by the child it forks into
    // its pid namespace.
    if let Some(cg) = &mut w.cgroup
        && setup.kernel.metering()
    {
        let pid = w.child.id();
        let target = if setup.sandbox.is_some() { namespace_child(pid) } else { Some(pid) };
        match target {
            Some(p) => cg.meter(&setup.kernel, p),
            None => tracing::warn!(pid, "the sandboxed worker did not fork its child in time: no copy meter"),
        }
    }
    Ok(w)
}

/// The process a sandboxed worker `pid` forked into its new pid namespace, once it exists.
fn namespace_child(pid: u32) -> Option<u32> {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        if let Some(c) = children.split_whitespace().next().and_then(|c| c.parse().ok()) {
            return Some(c);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

/// Where a worker finds the empty network namespace to join.
const NETNS_FD: i32 = 4;

/// Forks and execs a `quiver worker` fed over a socketpair on its fd 3, in its own process
/// group and, with telemetry, its own watched cgroup (on the launcher thread).
fn fork_worker(setup: &Setup) -> Result<Started, NodeError> {
    let sys = |what: &str, e: &dyn std::fmt::Display| NodeError::System(format!("{what}: {e}"));
    let cgroup = setup.kernel.worker_cgroup().map_err(NodeError::System)?;
    let procs = match &cgroup {
        Some(cg) => Some(std::fs::OpenOptions::new().write(true).open(cg.procs()).map_err(|e| sys("opening the worker's cgroup", &e))?),
        None => None,
    };
    let procs_fd = procs.as_ref().map(|f| f.as_raw_fd());
    let (ours, theirs) = quiver_shm::transport::socketpair().map_err(|e| sys("socketpair", &e))?;
    let exe = std::env::current_exe().map_err(|e| sys("finding the quiver binary", &e))?;
    let mut cmd = Command::new(exe);
    cmd.arg("worker").stdin(Stdio::null());
    // The worker raises its own OOM score first thing (no privilege needed), before it makes
    // itself non-dumpable, which would keep a non-root agent from doing it.
    cmd.env(crate::memory::OOM_ENV, crate::memory::function_oom_score_adj().to_string());
    let raw = theirs.as_raw_fd();
    let net = setup.netns.as_ref().map(|n| n.as_raw_fd());
    if net.is_some() {
        cmd.env(crate::worker::NETNS_FD_ENV, NETNS_FD.to_string());
    }
    if let Some(spec) = &setup.sandbox {
        cmd.env(crate::worker::SANDBOX_ENV, &**spec);
    }
    // SAFETY: between fork and exec only async-signal-safe calls: write moves the worker into
    // its watched cgroup before it runs anything; fcntl and dup2 give it its socket as fd 3 and
    // the empty network namespace as fd 4 (through copies above 10, so that neither source can
    // be one of the targets); setpgid(0, 0) puts it in its own process group so a kill reaches
    // any process it starts; PR_SET_PDEATHSIG kills it if the agent dies.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = procs_fd
                && libc::write(fd, b"0".as_ptr().cast(), 1) != 1
            {
                return Err(std::io::Error::last_os_error());
            }
            let sock = libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, 10);
            let ns = net.map(|n| libc::fcntl(n, libc::F_DUPFD_CLOEXEC, 10));
            if sock < 0 || ns.is_some_and(|n| n < 0) || libc::dup2(sock, 3) < 0 || ns.is_some_and(|n| libc::dup2(n, NETNS_FD) < 0) {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setpgid(0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    };
    let child = cmd.spawn().map_err(|e| sys("starting the worker", &e))?;
    drop(procs);
    crate::children::register(child.id() as i32);
    crate::memory::mark_function(child.id() as i32);
    Ok(Started { child, sock: ours, cgroup })
}

/// Workers started ahead of need, so a ready node launches without a fork and exec.
#[derive(Debug)]
pub struct Pool {
    idle: Mutex<Vec<Started>>,
    target: usize,
    setup: Setup,
    /// Set by `drain`: no more workers are started.
    closed: std::sync::atomic::AtomicBool,
}

impl Pool {
    /// A pool that keeps `target` workers waiting (filled by [`Pool::fill`]).
    pub fn new(target: usize, setup: Setup) -> Arc<Pool> {
        Arc::new(Pool { idle: Mutex::new(Vec::new()), target, setup, closed: Default::default() })
    }

    /// Starts workers until `target` wait (blocking: a fork and exec each).
    pub fn fill(&self) {
        let closed = || self.closed.load(std::sync::atomic::Ordering::Acquire);
        while !closed() && self.idle.lock().unwrap_or_else(|e| e.into_inner()).len() < self.target {
            match start_worker(&self.setup) {
                Ok(w) => {
                    let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                    if idle.len() < self.target && !closed() {
                        idle.push(w);
                        continue;
                    }
                    drop(idle);
                    // Another fill got there first, or the agent is stopping.
                    stop(w);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not start a waiting worker");
                    return;
                }
            }
        }
    }

    /// A waiting worker that is still alive.
    fn take(&self) -> Option<Started> {
        loop {
            let mut w = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
            if matches!(w.child.try_wait(), Ok(None)) {
                return Some(w);
            }
            // Died while waiting (killed from outside): reaped by try_wait, forget it.
            crate::children::unregister(w.child.id() as i32);
        }
    }

    /// Kills and reaps every waiting worker (the agent is stopping).
    pub fn drain(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::Release);
        let all: Vec<Started> = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
        all.into_iter().for_each(stop);
    }

    /// Workers waiting now.
    pub fn idle(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Kills and reaps a worker that never got a request.
fn stop(mut w: Started) {
    let pid = w.child.id() as i32;
    // SAFETY: kill has no memory effects; the group is the worker's own.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let _ = w.child.wait();
    crate::children::unregister(pid);
}

/// Runs one request in a worker process: a waiting one from `pool`, else a fresh one.
pub async fn run_worker(
    pool: &Arc<Pool>,
    req: Request,
    inputs: Vec<std::sync::Arc<StoredTable>>,
    cache: CacheLink,
    timeout: Duration,
    mut cancel: watch::Receiver<bool>,
) -> Result<(NodeOutput, Timing), NodeError> {
    let sys = |what: &str, e: &dyn std::fmt::Display| NodeError::System(format!("{what}: {e}"));
    let w = match pool.take() {
        Some(w) => w,
        None => {
            let setup = pool.setup.clone();
            tokio::task::spawn_blocking(move || start_worker(&setup)).await.map_err(|e| sys("starting the worker", &e))??
        }
    };
    let Started { child, sock: ours, cgroup } = w;
    let pid = child.id() as i32;
    let refill = (pool.target > 0).then(|| pool.clone());
    let outcome = talk(ours, req, inputs, refill, cache, timeout, &mut cancel).await;
    let err = match outcome {
        Ok((out, timing)) => {
            // The output is admitted (sealed, checked): the node is done. The worker's exit
            // (unmapping its inputs can take milliseconds) is reaped, and its kernel figures
            // read, off the children's path.
            let kernel = tokio::task::spawn_blocking(move || {
                let mut child = child;
                match child.wait() {
                    Ok(st) if !st.success() => tracing::warn!(pid, status = %st, "worker exited abnormally after answering"),
                    Err(e) => tracing::warn!(pid, error = %e, "waiting for a worker"),
                    Ok(_) => {}
                }
                crate::children::unregister(pid);
                cgroup.and_then(WorkerCgroup::take)
            });
            return Ok((out, Timing { kernel: Some(kernel), ..timing }));
        }
        Err(e) => e,
    };
    // SAFETY: kill has no memory effects; the group is the worker's own.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let status = tokio::task::spawn_blocking(move || {
        let mut child = child;
        child.wait()
    })
    .await
    .map_err(|e| sys("waiting for the worker", &e))?
    .map_err(|e| sys("waiting for the worker", &e))?;
    crate::children::unregister(pid);
    match err {
        NodeError::System(m) if killed_by(status).is_some() => {
            Err(NodeError::System(format!("worker killed by signal {} ({m})", killed_by(status).unwrap_or(0))))
        }
        e => Err(e),
    }
}

/// The signal that ended a worker: its own, or, for a sandboxed worker, its namespace child's,
/// which the waiting parent passes on as exit status 128 + signal (a worker itself exits with
/// 0 or 2).
fn killed_by(status: std::process::ExitStatus) -> Option<i32> {
    status.signal().or_else(|| status.code().filter(|&c| c > 128).map(|c| c - 128))
}

/// The conversation with a started function process on `ours`, within `timeout` and until
/// `cancel`.
pub async fn talk(
    ours: OwnedFd,
    req: Request,
    inputs: Vec<std::sync::Arc<StoredTable>>,
    refill: Option<Arc<Pool>>,
    cache: CacheLink,
    timeout: Duration,
    cancel: &mut watch::Receiver<bool>,
) -> Result<(NodeOutput, Timing), NodeError> {
    let talk = tokio::task::spawn_blocking(move || converse(ours, req, inputs, refill, cache));
    tokio::select! {
        r = talk => r.map_err(|e| NodeError::System(format!("worker thread: {e}"))).and_then(|r| r),
        _ = tokio::time::sleep(timeout) => Err(NodeError::Timeout(timeout.as_secs_f64())),
        _ = cancel.wait_for(|c| *c) => Err(NodeError::Cancelled),
    }
}

/// The blocking conversation with the worker.
fn converse(
    sock: OwnedFd,
    req: Request,
    inputs: Vec<std::sync::Arc<StoredTable>>,
    refill: Option<Arc<Pool>>,
    cache: CacheLink,
) -> Result<(NodeOutput, Timing), NodeError> {
    let lost = |e: quiver_shm::ShmError| NodeError::System(format!("worker connection: {e}"));
    send_json(sock.as_fd(), &req).map_err(lost)?;
    for t in &inputs {
        let fds: Vec<_> = t.segments.iter().map(|s| s.as_fd()).collect();
        send(sock.as_fd(), &t.descriptor, &fds).map_err(lost)?;
    }
    let hello: Hello = recv_json(sock.as_fd()).map_err(lost)?;
    if let Some(p) = refill {
        // Replace the worker once it has started its function, so starting the next one (a fork
        // and exec) does not compete with this one's start for the CPU.
        std::thread::spawn(move || p.fill());
    }
    // A caching scan's rounds; the chunks it was given stay pinned until its output is in.
    let (scan_stats, _pinned) = match (&req.task, &cache) {
        (crate::plan::Task::Scan { path, .. }, Some((c, m))) if req.cache => {
            let (st, pins) = crate::cache::serve::serve_scan(c, m, sock.as_fd(), path)?;
            (Some(st), pins)
        }
        _ => (None, Vec::new()),
    };
    let reply: Reply = recv_json(sock.as_fd()).map_err(lost)?;
    let out = match reply {
        Reply::Failed { user: true, message } => Err(NodeError::User(message)),
        Reply::Failed { user: false, message } => Err(NodeError::System(message)),
        Reply::Staged { rows, files } => Ok(NodeOutput::Staged(rows, files)),
        Reply::Passed => Ok(NodeOutput::Staged(0, Vec::new())),
        Reply::Table { rows, bytes } => {
            let (desc, fds) = recv(sock.as_fd(), &RecvLimits::default()).map_err(lost)?;
            let table = admit(desc, fds, rows).map_err(|e| NodeError::System(format!("worker sent a bad table: {e}")))?;
            Ok(NodeOutput::Table(table, bytes))
        }
    }?;
    Ok((out, Timing { slot_ns: 0, started_ns: hello.started_ns, done_ns: monotonic_ns(), start: None, memory_peak: None, kernel: None, cache: scan_stats }))
}

/// Checks a table from an untrusted worker without reading its data: the descriptor parses
/// within limits, one sealed memfd per segment, of the declared sizes.
pub fn admit(desc: Vec<u8>, fds: Vec<OwnedFd>, rows: u64) -> Result<StoredTable, String> {
    let raw = RawDescriptor::decode(&desc, &Limits::default()).map_err(|e| e.to_string())?;
    if raw.segment_sizes.len() != fds.len() {
        return Err(format!("{} segments described, {} fds sent", raw.segment_sizes.len(), fds.len()));
    }
    let claimed: u64 = raw.batches.iter().map(|b| b.rows).sum();
    if claimed != rows {
        return Err(format!("reply says {rows} rows, the descriptor {claimed}"));
    }
    let mut segments = Vec::with_capacity(fds.len());
    for (fd, &size) in fds.into_iter().zip(&raw.segment_sizes) {
        let s = SealedSegment::from_fd(fd).map_err(|e| e.to_string())?;
        if s.size() != size {
            return Err(format!("segment of {} bytes described as {size}", s.size()));
        }
        segments.push(s);
    }
    Ok(StoredTable::new(desc, segments, rows, raw.schema_ipc))
}

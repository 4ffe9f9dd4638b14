//! The agent's books: runs with their per-node state and event log, the tables it holds, and
//! counters for `/metrics`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::{broadcast, watch};

use crate::config::Config;
use crate::plan::{NodeKind, Task, ValidPlan};
use crate::tables::TableRef;
use crate::telemetry::{KernelFigures, KernelTelemetry, TelemetryStatus};

/// State of a run.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Waiting or running.
    Running,
    /// Every node succeeded and materializations are published.
    Succeeded,
    /// A node failed.
    Failed,
    /// Cancelled by a client or by the agent stopping.
    Cancelled,
}

/// State of a node.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    /// Waiting for its parents or a slot.
    Pending,
    /// Its function is running.
    Running,
    /// Done.
    Succeeded,
    /// Its function failed.
    Failed,
    /// Stopped because the run was cancelled or failed elsewhere.
    Cancelled,
    /// Past its time limit.
    TimedOut,
    /// Not run because a parent failed.
    Skipped,
}

/// Who is to blame for a failure.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The user's function or query.
    User,
    /// The system.
    System,
}

/// A node as run status shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeState {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: NodeKind,
    /// State.
    pub state: NodeStatus,
    /// Start, in ms since the run was submitted.
    pub started_ms: Option<f64>,
    /// Wall time of the function, ms.
    pub wall_ms: Option<f64>,
    /// Time waiting for a free slot, ms, once the node could start (its last parent's output
    /// received, or the run submitted).
    pub queued_ms: Option<f64>,
    /// The agent's overhead, ms: from the moment the node could start and had a slot to its
    /// worker's first instruction.
    pub overhead_ms: Option<f64>,
    /// Rows of its output.
    pub rows: u64,
    /// Output bytes handed on by reference.
    pub bytes_referenced: u64,
    /// Output bytes copied.
    pub bytes_copied: u64,
    /// Output bytes whose pages the quiver-kzero module moved (0 without the module).
    pub bytes_moved: u64,
    /// Python: `preforked` (forked ahead while its parents ran), `zygote` (forked from a warm
    /// zygote when ready) or `cold` (the zygote was started for it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<&'static str>,
    /// Peak memory of the function's cgroup, bytes (Python functions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_peak_bytes: Option<u64>,
    /// What the kernel counted for the function's process (null without telemetry, or for a
    /// node that did not succeed).
    pub kernel: Option<KernelFigures>,
    /// Scans through the cache: chunks hit, chunks decoded, bytes decoded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<crate::cache::ScanStats>,
    /// Failure, if any.
    pub error: Option<String>,
    /// Whose failure.
    pub error_kind: Option<ErrorKind>,
}

/// A run as status shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RunState {
    /// Id.
    pub id: String,
    /// Label.
    pub name: Option<String>,
    /// Priority.
    pub priority: i32,
    /// State.
    pub status: RunStatus,
    /// Submission time, seconds since the epoch.
    pub submitted_at: f64,
    /// Wall time of the run, ms (when finished).
    pub wall_ms: Option<f64>,
    /// First failure.
    pub error: Option<String>,
    /// Nodes, parents first.
    pub nodes: Vec<NodeState>,
    /// Tables kept after the run (pinned nodes), by name.
    pub tables: Vec<String>,
    /// Whether the nodes carry kernel-measured figures, and why not.
    pub telemetry: TelemetryStatus,
}

/// One event of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Position in the run's event log.
    pub seq: u64,
    /// ms since submission.
    pub at_ms: f64,
    /// What happened: node_started, node_succeeded, node_failed, node_cancelled,
    /// node_timed_out, node_skipped, run_succeeded, run_failed, run_cancelled.
    pub event: &'static str,
    /// The node, for node events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Details (the error, row counts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Whose failure, for failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<ErrorKind>,
}

/// A run.
#[derive(Debug)]
pub struct Run {
    /// Id.
    pub id: String,
    /// The plan.
    pub plan: ValidPlan,
    /// When it was submitted.
    pub t0: Instant,
    /// The same moment on `proto::monotonic_ns`'s clock.
    pub t0_ns: u64,
    state: Mutex<RunState>,
    log: Mutex<Vec<Event>>,
    /// Live events.
    pub events: broadcast::Sender<Event>,
    /// Set to cancel the run's nodes.
    pub cancel: watch::Sender<bool>,
}

impl Run {
    /// A new run of a validated plan.
    pub fn new(id: String, plan: ValidPlan, telemetry: TelemetryStatus) -> Arc<Run> {
        let nodes = plan
            .nodes
            .iter()
            .map(|n| NodeState {
                name: n.name.clone(),
                kind: match n.task {
                    Task::Scan { .. } => NodeKind::Scan,
                    Task::Sql { .. } => NodeKind::Sql,
                    Task::Materialize { .. } => NodeKind::Materialize,
                    Task::Python(_) => NodeKind::Python,
                },
                state: NodeStatus::Pending,
                started_ms: None,
                wall_ms: None,
                queued_ms: None,
                overhead_ms: None,
                rows: 0,
                bytes_referenced: 0,
                bytes_copied: 0,
                bytes_moved: 0,
                start: None,
                memory_peak_bytes: None,
                kernel: None,
                cache: None,
                error: None,
                error_kind: None,
            })
            .collect();
        let submitted_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let state = RunState {
            id: id.clone(),
            name: plan.name.clone(),
            priority: plan.priority,
            status: RunStatus::Running,
            submitted_at,
            wall_ms: None,
            error: None,
            nodes,
            tables: Vec::new(),
            telemetry,
        };
        let (events, _) = broadcast::channel(1024);
        let (cancel, _) = watch::channel(false);
        Arc::new(Run { id, plan, t0: Instant::now(), t0_ns: crate::proto::monotonic_ns(), state: Mutex::new(state), log: Mutex::new(Vec::new()), events, cancel })
    }

    /// ms since submission.
    pub fn ms(&self) -> f64 {
        self.t0.elapsed().as_secs_f64() * 1e3
    }

    /// A copy of the current state.
    pub fn snapshot(&self) -> RunState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Changes the state under its lock.
    pub fn update<R>(&self, f: impl FnOnce(&mut RunState) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Records and broadcasts an event.
    pub fn emit(&self, event: &'static str, node: Option<&str>, message: Option<String>, kind: Option<ErrorKind>) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let e = Event { seq: log.len() as u64, at_ms: self.ms(), event, node: node.map(str::to_owned), message, kind };
        log.push(e.clone());
        // Nobody listening is fine.
        let _ = self.events.send(e);
    }

    /// Events so far, and a receiver for the rest (subscribed under the log lock, so nothing
    /// falls between the two).
    pub fn subscribe(&self) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        (log.clone(), self.events.subscribe())
    }

    /// Whether the run has finished.
    pub fn finished(&self) -> bool {
        self.snapshot().status != RunStatus::Running
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Runs submitted.
    pub runs_submitted: AtomicU64,
    /// Runs by outcome.
    pub runs_succeeded: AtomicU64,
    /// Runs failed.
    pub runs_failed: AtomicU64,
    /// Runs cancelled.
    pub runs_cancelled: AtomicU64,
    /// Function processes started.
    pub workers_started: AtomicU64,
    /// Nodes failed.
    pub nodes_failed: AtomicU64,
    /// Bytes handed on by reference.
    pub bytes_referenced: AtomicU64,
    /// Bytes copied.
    pub bytes_copied: AtomicU64,
    /// Kernel-measured: page faults of function processes.
    pub page_faults: AtomicU64,
    /// Kernel-measured: bytes function processes passed to memcpy/memmove.
    pub memcpy_bytes: AtomicU64,
    /// Kernel-measured: memcpy/memmove calls of function processes.
    pub memcpy_calls: AtomicU64,
    /// Kernel-measured: mmap calls of function processes.
    pub mmaps: AtomicU64,
    /// Kernel-measured: bytes those mmap calls asked for.
    pub mmap_bytes: AtomicU64,
    /// Requests refused as malformed.
    pub bad_requests: AtomicU64,
}

impl Metrics {
    /// Adds to a counter.
    pub fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Ordering::Relaxed);
    }
}

/// The agent.
#[derive(Debug)]
pub struct Agent {
    /// Configuration.
    pub config: Config,
    runs: Mutex<BTreeMap<u64, Arc<Run>>>,
    next_run: AtomicU64,
    /// Tables kept by name.
    pub tables: Mutex<BTreeMap<String, TableRef>>,
    /// Workers started ahead of need.
    pub pool: Arc<crate::launch::Pool>,
    /// Slots for function processes.
    pub slots: Arc<crate::slots::Slots>,
    /// Counters.
    pub metrics: Metrics,
    /// Set when the agent is stopping.
    pub stopping: watch::Sender<bool>,
    /// Python functions: environments, zygotes, sandbox.
    pub python: Arc<crate::python::PythonRuntime>,
    /// Kernel-measured figures per function process.
    pub kernel: Arc<KernelTelemetry>,
    /// Decoded Parquet column chunks shared by scans.
    pub cache: Arc<crate::cache::Cache>,
    /// The node's memory budget and admission control.
    pub memory: Arc<crate::memory::Memory>,
}

impl Agent {
    /// A fresh agent.
    pub fn new(mut config: Config) -> Arc<Agent> {
        // Workers reach the warehouse's staging folders by absolute path, from their own root.
        if let Ok(w) = std::path::absolute(&config.warehouse) {
            config.warehouse = w;
        }
        let (stopping, _) = watch::channel(false);
        let kernel = Arc::new(KernelTelemetry::start(&config.telemetry));
        // One empty network namespace, prepared once (creating one per call is slow), that
        // every function process joins unless it may use the network.
        let netns = match quiver_sandbox::netns::empty() {
            Ok(fd) => Some(Arc::new(fd)),
            Err(e) => {
                tracing::warn!(error = %e, "no empty network namespace (needs root): Python functions cannot run, native workers keep the host's");
                None
            }
        };
        let sandbox = if config.sandbox_workers {
            crate::launch::Setup::worker_sandbox(&config.python).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "native workers cannot enter the sandbox: they keep the host's root and user");
                None
            })
        } else {
            tracing::warn!("sandbox_workers = false: native workers keep the host's root and user");
            None
        };
        Arc::new(Agent {
            slots: crate::slots::Slots::new(config.max_parallel),
            pool: crate::launch::Pool::new(config.idle_workers, crate::launch::Setup { kernel: kernel.clone(), netns: netns.clone(), sandbox }),
            python: crate::python::PythonRuntime::new(&config.python, kernel.clone(), netns),
            kernel,
            cache: crate::cache::Cache::new(&config.cache),
            memory: Arc::new(crate::memory::Memory::new(&config.memory)),
            config,
            runs: Mutex::new(BTreeMap::new()),
            next_run: AtomicU64::new(1),
            tables: Mutex::new(BTreeMap::new()),
            metrics: Metrics::default(),
            stopping,
        })
    }

    /// Registers a run; evicts the oldest finished runs beyond the configured number.
    pub fn add_run(&self, plan: ValidPlan) -> Arc<Run> {
        let n = self.next_run.fetch_add(1, Ordering::Relaxed);
        let run = Run::new(format!("r{n:06}"), plan, self.kernel.status().clone());
        let mut runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        runs.insert(n, run.clone());
        while runs.len() > self.config.keep_runs {
            let Some((&k, _)) = runs.iter().find(|(_, r)| r.finished()) else { break };
            runs.remove(&k);
        }
        Metrics::add(&self.metrics.runs_submitted, 1);
        run
    }

    /// A run by id.
    pub fn run(&self, id: &str) -> Option<Arc<Run>> {
        let n: u64 = id.strip_prefix('r')?.parse().ok()?;
        self.runs.lock().unwrap_or_else(|e| e.into_inner()).get(&n).cloned()
    }

    /// All runs, oldest first.
    pub fn runs(&self) -> Vec<Arc<Run>> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// Bytes of all segments of the tables the agent holds.
    pub fn table_bytes(&self) -> u64 {
        self.tables.lock().unwrap_or_else(|e| e.into_inner()).values().map(|t| t.bytes).sum()
    }
}

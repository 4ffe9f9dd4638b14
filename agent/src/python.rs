//! Python nodes: the environment comes from the store (built once), the call is forked from the
//! environment's zygote into a fresh cgroup and the sandbox, and then the agent talks to it as
//! to any worker. The cgroup bounds memory, processes and CPU, and is how a timeout or a
//! cancellation kills the function with everything it forked.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quiver_envs::{Env, EnvSpec, ForkRequest, Store, StoreOptions, ZygoteOptions, ZygotePool};
use quiver_sandbox::cgroup::{Cgroup, CgroupLimits};
use quiver_sandbox::{Limits, Spec};
use crate::tables::StoredTable;
use tokio::sync::watch;

use crate::config::PythonConfig;
use crate::launch::{NodeError, NodeOutput, Timing, talk};
use crate::plan::{Node, Task, ValidPlan};
use crate::proto::Request;
use crate::telemetry::KernelTelemetry;

/// Everything Python nodes need, made once per agent.
pub struct PythonRuntime {
    cfg: PythonConfig,
    store: Result<Store, String>,
    pool: ZygotePool,
    harness: PathBuf,
    preload: PathBuf,
    calls: AtomicU64,
    kernel: Arc<KernelTelemetry>,
    /// Calls forked ahead, by run and node.
    preforks: Mutex<HashMap<(String, String), tokio::task::JoinHandle<Result<Prepared, NodeError>>>>,
}

impl std::fmt::Debug for PythonRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PythonRuntime").field("harness", &self.harness).field("preload", &self.preload).finish_non_exhaustive()
    }
}

fn beside_exe(name: &str) -> PathBuf {
    std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join(name))).unwrap_or_else(|| PathBuf::from(name))
}

/// The harness package folder: installed beside the binary, else the source tree's.
pub fn default_harness() -> PathBuf {
    let installed = beside_exe("python");
    if installed.join("quiver").is_dir() {
        return installed;
    }
    let source = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../runtime-envs/python"));
    source.canonicalize().unwrap_or(source)
}

impl PythonRuntime {
    /// Prepares the store and the zygote pool; what needs privileges (the empty network
    /// namespace, cgroups) is tried here and reported per call when it failed.
    pub fn new(cfg: &PythonConfig, kernel: Arc<KernelTelemetry>, netns: Option<Arc<OwnedFd>>) -> Arc<PythonRuntime> {
        let store = Store::open(StoreOptions {
            root: cfg.envs.clone(),
            cache: cfg.uv_cache.clone(),
            uv: cfg.uv.clone(),
            wheels: cfg.wheels.clone(),
            index_url: cfg.index_url.clone(),
            ..StoreOptions::default()
        })
        .map_err(|e| e.to_string());
        let harness = cfg.harness.clone().unwrap_or_else(default_harness);
        let preload = cfg.preload.clone().unwrap_or_else(|| beside_exe("libquiver_preload.so"));
        let opts = ZygoteOptions {
            harness_dir: harness.clone(),
            preload: preload.clone(),
            sandbox_lib: cfg.sandbox_lib.clone().unwrap_or_else(|| beside_exe("libquiver_sandbox.so")),
            max: cfg.zygotes.max(1),
            start_timeout: Duration::from_secs(120),
        };
        Arc::new(PythonRuntime {
            cfg: cfg.clone(),
            store,
            pool: ZygotePool::new(opts, netns),
            harness,
            preload,
            calls: AtomicU64::new(0),
            kernel,
            preforks: Mutex::new(HashMap::new()),
        })
    }

    /// Builds the environments of `plan`'s Python nodes and starts their zygotes, in the
    /// background: the first call then finds them warm.
    pub fn prestart(self: &Arc<Self>, plan: &ValidPlan) {
        let mut specs: Vec<EnvSpec> = Vec::new();
        for n in &plan.nodes {
            if let Task::Python(t) = &n.task
                && !specs.contains(&t.env)
            {
                specs.push(t.env.clone());
            }
        }
        for spec in specs {
            let me = self.clone();
            tokio::task::spawn_blocking(move || {
                let r = me.env(&spec).map_err(|e| e.to_string()).and_then(|env| me.pool.prestart(&env).map_err(|e| e.to_string()));
                if let Err(e) = r {
                    tracing::warn!(python = %spec.python, error = %e, "could not prepare an environment ahead");
                }
            });
        }
    }

    /// Stops every zygote (the agent is stopping).
    pub fn shutdown(&self) {
        self.pool.shutdown();
    }

    /// The log of a node of a run.
    pub fn log_path(&self, run: &str, node: &str) -> PathBuf {
        self.cfg.logs.join(run).join(format!("{node}.log"))
    }

    fn env(&self, spec: &EnvSpec) -> Result<Env, NodeError> {
        let store = self.store.as_ref().map_err(|e| NodeError::System(format!("environment store: {e}")))?;
        // A spec that does not resolve or install is the user's to fix: uv's reason says why.
        store.ensure(spec, &|_| {}).map_err(|e| NodeError::User(format!("environment: {e}")))
    }

    fn cgroup(&self, id: &str, limits: &CgroupLimits) -> Result<Cgroup, NodeError> {
        let root = crate::cgroups::root().map_err(|e| NodeError::System(format!("cgroups (Python functions need the agent to run as root): {e}")))?;
        root.create(id, limits).map_err(|e| NodeError::System(format!("creating the function's cgroup: {e}")))
    }

    fn sandbox(&self, env: &Env, module: &Path, network: bool) -> Spec {
        // The model's folder, unless it is the root itself (never bound whole).
        let folder: Vec<&Path> = module.parent().filter(|p| *p != Path::new("/")).into_iter().collect();
        let binds = quiver_envs::binds(env, &self.harness, &self.preload, &folder);
        Spec {
            root: PathBuf::from(crate::launch::SANDBOX_ROOT),
            binds,
            tmp_bytes: self.cfg.tmp_bytes,
            uid: self.cfg.uid,
            gid: self.cfg.gid,
            hostname: "quiver".into(),
            limits: Limits { processes: self.cfg.pids, ..Limits::default() },
            keep_fds: Vec::new(),
            network,
            workdir: PathBuf::from("/tmp"),
        }
    }

    /// Forks a call of `node` from its environment's zygote into a fresh cgroup and the
    /// sandbox, where it waits for its request.
    async fn prepare(self: &Arc<Self>, run_id: &str, node: &Node) -> Result<Prepared, NodeError> {
        let Task::Python(task) = &node.task else {
            return Err(NodeError::System("not a Python node".into()));
        };
        let sys = |what: &str, e: &dyn std::fmt::Display| NodeError::System(format!("{what}: {e}"));
        let me = self.clone();
        let spec = task.env.clone();
        let env = tokio::task::spawn_blocking(move || me.env(&spec)).await.map_err(|e| sys("environment thread", &e))??;
        let memory = node.resources.memory.unwrap_or(self.cfg.memory);
        let limits = CgroupLimits { memory: Some(memory), pids: Some(self.cfg.pids), cpus: node.resources.cpus };
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let cg = self.cgroup(&crate::cgroups::name("py", &format!("{run_id}-{n}")), &limits)?;
        // Counting (and the network denial, a layer under the sandbox's) starts before the
        // function enters its cgroup.
        let watch = match cg.v2_dir() {
            Some(d) => self.kernel.watch(d, task.internet_access).map_err(NodeError::System)?,
            None => None,
        };
        let log_path = self.log_path(run_id, &node.name);
        let log = open_log(&log_path).map_err(|e| sys("opening the node's log", &e))?;
        let (ours, theirs) = quiver_shm::transport::socketpair().map_err(|e| sys("socketpair", &e))?;
        let sandbox = serde_json::to_value(self.sandbox(&env, Path::new(&task.module), task.internet_access)).map_err(|e| sys("sandbox spec", &e))?;
        fs::create_dir_all(crate::launch::SANDBOX_ROOT).map_err(|e| sys("creating the sandbox mount point", &e))?;
        let procs = cg.procs_files().map_err(|e| sys("cgroup", &e))?;
        let me = self.clone();
        let network = task.internet_access;
        let forked = tokio::task::spawn_blocking(move || {
            let r = ForkRequest {
                conn: theirs.as_fd(),
                log: log.as_fd(),
                cgroup_procs: procs.iter().map(|f| f.as_fd()).collect(),
                network,
                sandbox,
            };
            me.pool.fork(&env, &r)
        })
        .await
        .map_err(|e| sys("zygote thread", &e))?
        .map_err(|e| NodeError::System(e.to_string()))?;
        // Under memory pressure the kernel kills the function, not the agent.
        crate::memory::mark_function(forked.pid);
        // The meter attaches (milliseconds) while the function confines itself, and before it
        // has its request, so every copy of its work is counted.
        let kernel = self.kernel.clone();
        let pid = forked.pid as u32;
        let meter = tokio::task::spawn_blocking(move || kernel.meter(pid)).await.ok().flatten();
        Ok(Prepared { cold: forked.cold, cg, watch, meter, ours, log_path, memory })
    }

    /// Forks the calls of `plan`'s first Python nodes ahead of need (up to `[python]
    /// prefork`), while their parents run: when a node is ready, its call only needs its
    /// request. [`PythonRuntime::discard`] stops what the run did not use.
    pub fn prefork(self: &Arc<Self>, run_id: &str, plan: &ValidPlan) {
        let mut preforks = self.preforks.lock().unwrap_or_else(|e| e.into_inner());
        for node in plan.nodes.iter().filter(|n| matches!(n.task, Task::Python(_))).take(self.cfg.prefork) {
            let (me, run, node) = (self.clone(), run_id.to_owned(), node.clone());
            let key = (run.clone(), node.name.clone());
            preforks.insert(key, tokio::spawn(async move { me.prepare(&run, &node).await }));
        }
    }

    /// Stops the calls forked ahead for `run_id` that it did not use (it failed, or was
    /// cancelled, before their nodes ran).
    pub fn discard(&self, run_id: &str) {
        let mut preforks = self.preforks.lock().unwrap_or_else(|e| e.into_inner());
        let keys: Vec<_> = preforks.keys().filter(|(r, _)| r == run_id).cloned().collect();
        for k in keys {
            if let Some(h) = preforks.remove(&k) {
                // Dropping the prepared call removes its cgroup, which kills it.
                tokio::spawn(async move { drop(h.await) });
            }
        }
    }

    /// Runs one Python node: its call forked ahead when there is one, else forked now.
    pub async fn run(
        self: &Arc<Self>,
        run_id: &str,
        node: &Node,
        req: Request,
        inputs: Vec<Arc<StoredTable>>,
        timeout: Duration,
        mut cancel: watch::Receiver<bool>,
    ) -> Result<(NodeOutput, Timing), NodeError> {
        let ahead = self.preforks.lock().unwrap_or_else(|e| e.into_inner()).remove(&(run_id.to_owned(), node.name.clone()));
        let (prepared, start) = match ahead {
            Some(h) => {
                let ready = h.is_finished();
                match h.await.map_err(|e| NodeError::System(format!("forking ahead: {e}")))? {
                    Ok(p) => {
                        let start = if ready { "preforked" } else if p.cold { "cold" } else { "zygote" };
                        (p, start)
                    }
                    // The zygote died under it, say: fork again now.
                    Err(NodeError::System(e)) => {
                        tracing::warn!(run = run_id, node = %node.name, error = %e, "a call forked ahead failed; forking again");
                        let p = self.prepare(run_id, node).await?;
                        let start = if p.cold { "cold" } else { "zygote" };
                        (p, start)
                    }
                    Err(e) => return Err(e),
                }
            }
            None => {
                let p = self.prepare(run_id, node).await?;
                let start = if p.cold { "cold" } else { "zygote" };
                (p, start)
            }
        };
        let Prepared { cold: _, mut cg, watch, meter, ours, log_path, memory } = prepared;
        let outcome = talk(ours, req, inputs, None, None, timeout, &mut cancel).await;
        let oom = cg.oom_kills() > 0;
        let peak = cg.memory_peak();
        let outcome = match outcome {
            Ok((out, t)) => Ok((out, Timing { start: Some(start), memory_peak: peak, ..t })),
            Err(e) => {
                // A timeout or cancellation kills the function and all it forked.
                cg.kill(Duration::from_secs(5));
                let oom = oom || cg.oom_kills() > 0;
                Err(match e {
                    _ if oom => NodeError::User(format!("the function went over its memory limit of {memory} bytes and was killed")),
                    NodeError::System(m) => NodeError::System(with_log_tail(&m, &log_path)),
                    e => e,
                })
            }
        };
        // The function exits by itself once it has answered; give it a moment before the
        // cgroup's removal kills whatever is left. Its kernel figures are read once it is gone.
        let figures = tokio::task::spawn_blocking(move || {
            for _ in 0..500 {
                if cg.pids().is_empty() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(4));
            }
            let figures = crate::telemetry::finish(watch, meter);
            cg.remove();
            figures
        });
        outcome.map(|(out, t)| (out, Timing { kernel: Some(figures), ..t }))
    }
}

/// A call forked into its cgroup and sandbox, waiting for its request on `ours`. Dropped
/// unused, its cgroup is removed and the call killed.
struct Prepared {
    cold: bool,
    cg: Cgroup,
    watch: Option<quiver_ebpf::Watch>,
    meter: Option<quiver_ebpf::CopyMeter>,
    ours: OwnedFd,
    log_path: PathBuf,
    memory: u64,
}

fn open_log(path: &Path) -> std::io::Result<File> {
    if let Some(d) = path.parent() {
        fs::create_dir_all(d)?;
    }
    OpenOptions::new().create(true).write(true).truncate(true).mode(0o640).open(path)
}

/// A system error with the last lines of the node's log: a function that died before it could
/// answer (the sandbox refused something, the interpreter crashed) left its reason there.
fn with_log_tail(msg: &str, log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect();
    if tail.is_empty() { msg.to_owned() } else { format!("{msg}; its log ends: {}", tail.join(" | ")) }
}

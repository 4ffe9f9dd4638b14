//! The agent's configuration: a TOML file (`/etc/quiver/agent.toml` by default) whose every key
//! a command-line flag can override. See `deploy/agent.toml` for the documented example.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Default place of the configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/quiver/agent.toml";

/// Everything the agent can be told.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The API socket.
    pub socket: PathBuf,
    /// Mode of the API socket.
    pub socket_mode: u32,
    /// Where materialized tables live: one folder of Parquet files per table.
    pub warehouse: PathBuf,
    /// Function processes that may run at once.
    pub max_parallel: usize,
    /// Worker processes kept started and waiting for a request, so a node launches without a
    /// fork and exec on its path (0: start each worker when its node is ready).
    pub idle_workers: usize,
    /// Largest request body accepted, in bytes.
    pub max_body: usize,
    /// Default wall-clock limit of a function, in seconds.
    pub default_timeout_s: f64,
    /// Finished runs kept for status queries.
    pub keep_runs: usize,
    /// Native workers enter the sandbox (mount and pid namespaces, a root without the host, an
    /// unprivileged user) when the agent runs as root. Off, they keep the host's root and run
    /// as root under seccomp, landlock and the empty network namespace only: for measuring the
    /// sandbox's cost, not for production.
    pub sandbox_workers: bool,
    /// Python functions: environments, zygotes and their sandbox.
    pub python: PythonConfig,
    /// Kernel-measured figures per function (eBPF) and network denial.
    pub telemetry: TelemetryConfig,
    /// The deserialization cache of decoded Parquet column chunks.
    pub cache: CacheConfig,
    /// The node's memory budget and admission control.
    pub memory: MemoryConfig,
}

/// The `[telemetry]` table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Load the BPF programs: page faults, mmaps and network denial per function (needs root;
    /// without it the agent runs and says telemetry is unavailable).
    pub enabled: bool,
    /// Also meter glibc copies in function processes (`memcpy_bytes`): a trap per copy call,
    /// a few microseconds each, which multiplies the time of code making many small copies
    /// (off by default; for benchmarks and investigations).
    pub copy_meter: bool,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig { enabled: true, copy_meter: false }
    }
}

/// The `[cache]` table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Scans share decoded column chunks through the cache (off: every scan decodes its
    /// Parquet itself, the baseline of the sharing benchmark).
    pub enabled: bool,
    /// Most bytes the cache keeps (0: bounded only by the memory budget).
    pub max_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig { enabled: true, max_bytes: 0 }
    }
}

/// The `[memory]` table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// The node's budget in bytes for the tables the agent holds (cache and intermediates) plus
    /// the estimates of running functions (0: `budget_fraction` of `MemAvailable` at start).
    pub budget_bytes: u64,
    /// The share of `MemAvailable` used when `budget_bytes` is 0.
    pub budget_fraction: f64,
    /// Admission control: launches wait rather than overcommit the budget (off: every ready
    /// node launches when it has a slot).
    pub admission: bool,
    /// A scan's estimate is this many times the bytes of its Parquet files (decoded Arrow is
    /// usually larger than compressed Parquet).
    pub scan_expansion: f64,
    /// Estimate of a function's own working memory, added to its inputs' bytes.
    pub function_base_bytes: u64,
    /// oom_score_adj of the agent (kept low so the kernel picks a function, never the daemon;
    /// lowering it needs root).
    pub agent_oom_score_adj: i32,
    /// oom_score_adj of function processes.
    pub function_oom_score_adj: i32,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            budget_bytes: 0,
            budget_fraction: 0.5,
            admission: true,
            scan_expansion: 2.0,
            function_base_bytes: 64 << 20,
            agent_oom_score_adj: -900,
            function_oom_score_adj: 900,
        }
    }
}

/// The `[python]` table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PythonConfig {
    /// Where environments are built.
    pub envs: PathBuf,
    /// uv's package cache (same file system as `envs`, so installs are hard links).
    pub uv_cache: PathBuf,
    /// The uv binary (found on PATH when absent).
    pub uv: Option<PathBuf>,
    /// Offline mode: install only wheels from this folder.
    pub wheels: Option<PathBuf>,
    /// Package index instead of uv's default.
    pub index_url: Option<String>,
    /// The folder holding the `quiver` Python package (the harness); beside the binary's
    /// `python/` or the source tree's `runtime-envs/python` when absent.
    pub harness: Option<PathBuf>,
    /// `libquiver_preload.so` (beside the binary when absent).
    pub preload: Option<PathBuf>,
    /// `libquiver_sandbox.so` (beside the binary when absent).
    pub sandbox_lib: Option<PathBuf>,
    /// Zygotes kept at most (least recently used ones are stopped).
    pub zygotes: usize,
    /// Python calls of a run forked ahead of need when it is submitted (its first Python
    /// nodes, in plan order): a node whose parents are still running then starts with its
    /// request alone. 0 forks every call when its node is ready.
    pub prefork: usize,
    /// The unprivileged uid and gid functions run as.
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// Default memory limit of a function, bytes.
    pub memory: u64,
    /// Most processes and threads of a function.
    pub pids: u64,
    /// Size of a function's private /tmp, bytes.
    pub tmp_bytes: u64,
    /// Where each node's stdout and stderr are kept.
    pub logs: PathBuf,
}

impl Default for PythonConfig {
    fn default() -> Self {
        PythonConfig {
            envs: PathBuf::from("/var/lib/quiver/envs"),
            uv_cache: PathBuf::from("/var/cache/quiver/uv"),
            uv: None,
            wheels: None,
            index_url: None,
            harness: None,
            preload: None,
            sandbox_lib: None,
            zygotes: 4,
            prefork: 4,
            uid: 65534,
            gid: 65534,
            memory: 4 << 30,
            pids: 256,
            tmp_bytes: 256 << 20,
            logs: PathBuf::from("/var/lib/quiver/logs"),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: PathBuf::from("/run/quiver/agent.sock"),
            socket_mode: 0o660,
            warehouse: PathBuf::from("/var/lib/quiver/warehouse"),
            max_parallel: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).max(2),
            idle_workers: 2,
            max_body: 8 << 20,
            default_timeout_s: 3600.0,
            keep_runs: 1000,
            sandbox_workers: true,
            python: PythonConfig::default(),
            telemetry: TelemetryConfig::default(),
            cache: CacheConfig::default(),
            memory: MemoryConfig::default(),
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Loads `path`; a missing file at the default place means the defaults.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path == Path::new(DEFAULT_CONFIG) => Ok(Config::default()),
            Err(source) => Err(ConfigError::Read { path: path.into(), source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let text = include_str!("../../deploy/agent.toml");
        let c: Config = toml::from_str(text).expect("deploy/agent.toml parses");
        assert_eq!(c.socket, PathBuf::from("/run/quiver/agent.sock"));
        assert_eq!(c.socket_mode, 0o660);
        assert_eq!(c.max_parallel, 8);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = toml::from_str::<Config>("sockett = \"/x\"").expect_err("typo");
        assert!(e.to_string().contains("unknown field"), "{e}");
    }
}

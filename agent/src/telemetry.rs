//! Kernel-measured figures of each function process (page faults, bytes memcpy'd, mmaps), from
//! quiver-ebpf's BPF programs, and the network denial of function cgroups.
//!
//! Every function process lives in a cgroup v2 folder of its own that is watched from before
//! the process enters it until after it has exited, so its figures cover its whole life: a
//! native worker's start-up and idle wait (a few thousand faults, no table data) included.
//! Without root, BTF or BPF the agent runs the same, without figures, and says why.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quiver_ebpf::{CopyMeter, Counters, Telemetry, Watch};
use serde::Serialize;

use crate::config::TelemetryConfig;

/// What the kernel counted for one function process.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct KernelFigures {
    /// User-mode page faults, minor and major.
    pub page_faults: u64,
    /// Bytes passed to glibc's memcpy/memmove/mempcpy (null when the copy meter is off).
    pub memcpy_bytes: Option<u64>,
    /// Calls of those (null when the copy meter is off).
    pub memcpy_calls: Option<u64>,
    /// Copies of 1 MiB or more among them: table-sized copies (null when the meter is off).
    pub memcpy_large_calls: Option<u64>,
    /// `mmap` calls.
    pub mmaps: u64,
    /// Bytes asked for by those calls.
    pub mmap_bytes: u64,
    /// `munmap` calls.
    pub munmaps: u64,
}

impl KernelFigures {
    fn from(c: &Counters, metered: bool) -> KernelFigures {
        // Buckets from 1 MiB up: bucket b holds sizes in [2^(b-1), 2^b).
        let large: u64 = c.memcpy_hist[Counters::bucket(1 << 20)..].iter().sum();
        KernelFigures {
            page_faults: c.page_faults,
            memcpy_bytes: metered.then_some(c.memcpy_bytes),
            memcpy_calls: metered.then_some(c.memcpy_calls),
            memcpy_large_calls: metered.then_some(large),
            mmaps: c.mmaps,
            mmap_bytes: c.mmap_bytes,
            munmaps: c.munmaps,
        }
    }
}

/// Whether runs carry kernel figures, as run status shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TelemetryStatus {
    /// The BPF programs are loaded and counting.
    pub available: bool,
    /// Copies are metered (`memcpy_bytes`).
    pub copy_meter: bool,
    /// Why not, when unavailable (turned off, not root, BPF refused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The agent's telemetry: loaded once, shared by every launch.
#[derive(Debug)]
pub struct KernelTelemetry {
    telemetry: Option<Telemetry>,
    status: TelemetryStatus,
    /// Where native workers' cgroup v2 folders go.
    workers_dir: Option<PathBuf>,
    next: AtomicU64,
}

impl KernelTelemetry {
    /// Loads the programs when `cfg` asks for them; on failure logs one line and runs without.
    pub fn start(cfg: &TelemetryConfig) -> KernelTelemetry {
        let off = |reason: String| KernelTelemetry {
            telemetry: None,
            status: TelemetryStatus { available: false, copy_meter: false, reason: Some(reason) },
            workers_dir: None,
            next: AtomicU64::new(0),
        };
        if !cfg.enabled {
            return off("turned off in the configuration ([telemetry] enabled = false)".into());
        }
        let workers_dir = match crate::cgroups::root().map(|r| r.v2.clone()) {
            Ok(Some(d)) => d,
            Ok(None) => {
                let reason = "telemetry unavailable: no cgroup v2 hierarchy is mounted".to_owned();
                tracing::warn!("{reason}");
                return off(reason);
            }
            Err(e) => {
                let reason = format!("telemetry unavailable: no cgroups for function processes (needs root): {e}");
                tracing::warn!("{reason}");
                return off(reason);
            }
        };
        match Telemetry::start() {
            Ok(t) => {
                tracing::info!(copy_meter = cfg.copy_meter, probes = ?t.copy_probes(), "telemetry on");
                KernelTelemetry {
                    telemetry: Some(t),
                    status: TelemetryStatus { available: true, copy_meter: cfg.copy_meter, reason: None },
                    workers_dir: Some(workers_dir),
                    next: AtomicU64::new(0),
                }
            }
            Err(e) => {
                tracing::warn!("{e}; runs carry no kernel figures");
                off(e.to_string())
            }
        }
    }

    /// Whether figures are collected, and why not.
    pub fn status(&self) -> &TelemetryStatus {
        &self.status
    }

    /// Starts counting for a function cgroup's v2 folder (before its first process enters it)
    /// and, unless `network`, denies it IPv4/IPv6 sockets. None when telemetry is off.
    pub fn watch(&self, dir: &Path, network: bool) -> Result<Option<Watch>, String> {
        let Some(t) = &self.telemetry else { return Ok(None) };
        t.watch(dir, !network).map(Some).map_err(|e| format!("watching the function's cgroup: {e}"))
    }

    /// Whether the copy meter is on.
    pub fn metering(&self) -> bool {
        self.telemetry.is_some() && self.status.copy_meter
    }

    /// Meters the copies of process `pid` when the copy meter is on. Attaching takes
    /// milliseconds; a failure (the process already exited) only loses its copy figures.
    pub fn meter(&self, pid: u32) -> Option<CopyMeter> {
        let t = self.telemetry.as_ref().filter(|_| self.status.copy_meter)?;
        t.meter_copies(pid).map_err(|e| tracing::debug!(pid, error = %e, "no copy meter")).ok()
    }

    /// A watched cgroup v2 folder for a native worker about to be started, or None when
    /// telemetry is off.
    pub fn worker_cgroup(&self) -> Result<Option<WorkerCgroup>, String> {
        let (Some(_), Some(base)) = (&self.telemetry, &self.workers_dir) else { return Ok(None) };
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(crate::cgroups::name("worker", &n.to_string()));
        std::fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let mut cg = WorkerCgroup { dir, watch: None, meter: None };
        // Native workers read local files and never need the network.
        cg.watch = self.watch(&cg.dir, false)?;
        Ok(Some(cg))
    }
}

/// A native worker's own cgroup v2 folder, watched, with its copy meter; removed on drop.
#[derive(Debug)]
pub struct WorkerCgroup {
    dir: PathBuf,
    watch: Option<Watch>,
    meter: Option<CopyMeter>,
}

impl WorkerCgroup {
    /// `cgroup.procs` of the folder: the worker writes "0" to it between fork and exec.
    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Attaches the copy meter to the started worker.
    pub fn meter(&mut self, kernel: &KernelTelemetry, pid: u32) {
        self.meter = kernel.meter(pid);
    }

    /// The figures of the worker's life; call once it has exited and been reaped.
    pub fn take(mut self) -> Option<KernelFigures> {
        finish(self.watch.take(), self.meter.take())
    }
}

impl Drop for WorkerCgroup {
    fn drop(&mut self) {
        self.meter = None;
        self.watch = None;
        remove_dir(&self.dir);
    }
}

/// Reads a watch once its processes are gone (the meter is detached first).
pub fn finish(watch: Option<Watch>, meter: Option<CopyMeter>) -> Option<KernelFigures> {
    let metered = meter.is_some();
    drop(meter);
    match watch?.take() {
        Ok(c) => Some(KernelFigures::from(&c, metered)),
        Err(e) => {
            tracing::warn!(error = %e, "reading a function's kernel figures");
            None
        }
    }
}

/// Removes an emptied cgroup folder; a reaped process can take a moment to leave it.
fn remove_dir(dir: &Path) {
    for _ in 0..100 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    tracing::warn!(dir = %dir.display(), "could not remove a worker's cgroup");
}

/// The kernel figures of a node, once its process has exited.
pub type PendingFigures = tokio::task::JoinHandle<Option<KernelFigures>>;

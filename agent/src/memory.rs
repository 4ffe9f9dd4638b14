//! The memory manager: a node budget, an estimate per launch, admission control that makes
//! launches wait instead of overcommitting, and eviction of unpinned cached chunks when room is
//! needed. Every figure comes from the kernel: the bytes of the sealed segments the agent holds
//! (`fstat`'s allocated blocks, each memfd counted once however many tables share it),
//! `MemAvailable` from `/proc/meminfo`, PSS from `/proc/PID/smaps_rollup`.
//!
//! Policy, in order:
//! 1. A launch reserves its estimate. It starts at once when what the agent holds plus what
//!    running launches reserved plus its estimate fits in the budget.
//! 2. Otherwise unpinned cached chunks are evicted, least recently used first, until it fits.
//! 3. Otherwise it waits until a launch ends or a table is released, and tries again. Waiting
//!    launches go in order: those that consume held tables (nodes with parents, whose end lets
//!    their parents' tables go) before sources (scans), each kind first come, first served;
//!    only the first in that order may start. The first always starts when no other launch is
//!    running, so a run never waits forever (it may then go past the budget by its own size:
//!    the stated margin).
//!
//! Admission comes before a launch takes a slot (`max_parallel`), so launches waiting for
//! memory never keep the slots from the launches that would free it.
//!
//! Intermediate tables are released by the executor as soon as their last consumer is done;
//! pinned tables (`pin`) stay until dropped with the API.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use quiver_shm::SealedSegment;
use tokio::sync::{Notify, watch};

use crate::cache::Cache;
use crate::config::{Config, MemoryConfig};
use crate::plan::{Resources, Task};
use crate::tables::TableRef;

/// Why a launch was not admitted.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AdmitError {
    /// The run was cancelled while the launch waited.
    #[error("cancelled while waiting for memory")]
    Cancelled,
}

/// Identity of a segment: its memfd's device and inode.
pub type SegKey = (u64, u64);

/// The sealed segments the agent holds, each counted once.
#[derive(Debug, Default)]
struct Book {
    segments: HashMap<SegKey, (u64, usize)>,
    held: u64,
    peak: u64,
}

static BOOK: Mutex<Option<Book>> = Mutex::new(None);
static FREED: Notify = Notify::const_new();
/// Peak of held plus reserved bytes.
static PEAK_COMMITTED: AtomicU64 = AtomicU64::new(0);
static RESERVED: AtomicU64 = AtomicU64::new(0);

fn book<R>(f: impl FnOnce(&mut Book) -> R) -> R {
    f(BOOK.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(Book::default))
}

/// Notes segments a table holds; returns their keys for [`untrack`] and the bytes they hold.
pub fn track(segments: &[SealedSegment]) -> (Vec<SegKey>, u64) {
    let keys: Vec<(SegKey, u64)> = segments
        .iter()
        .filter_map(|s| {
            let st = nix::sys::stat::fstat(s.as_fd()).ok()?;
            // Allocated blocks, not the size: holes punched in a segment hold no memory.
            Some(((st.st_dev, st.st_ino), st.st_blocks as u64 * 512))
        })
        .collect();
    let held = book(|b| {
        for &(k, bytes) in &keys {
            let e = b.segments.entry(k).or_insert((bytes, 0));
            if e.1 == 0 {
                b.held += bytes;
            }
            e.1 += 1;
        }
        b.peak = b.peak.max(b.held);
        b.held
    });
    PEAK_COMMITTED.fetch_max(held + RESERVED.load(Ordering::Relaxed), Ordering::Relaxed);
    let alloc = keys.iter().map(|k| k.1).sum();
    (keys.into_iter().map(|(k, _)| k).collect(), alloc)
}

/// Forgets segments a dropped table held.
pub fn untrack(keys: &[SegKey]) {
    book(|b| {
        for k in keys {
            if let Some(e) = b.segments.get_mut(k) {
                e.1 -= 1;
                if e.1 == 0 {
                    b.held -= e.0;
                    b.segments.remove(k);
                }
            }
        }
    });
    FREED.notify_waiters();
}

/// Bytes and number of the distinct segments the agent holds.
pub fn held() -> (u64, usize) {
    book(|b| (b.held, b.segments.len()))
}

/// A snapshot of the manager's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemoryStats {
    /// The budget.
    pub budget_bytes: u64,
    /// Bytes of the segments the agent holds.
    pub held_bytes: u64,
    /// Distinct segments the agent holds.
    pub segments: usize,
    /// Estimates of running launches.
    pub reserved_bytes: u64,
    /// Highest `held_bytes` seen.
    pub peak_held_bytes: u64,
    /// Highest `held_bytes + reserved_bytes` seen.
    pub peak_committed_bytes: u64,
    /// Launches waiting for memory now.
    pub queued: u64,
    /// Launches that had to wait, in all.
    pub waited_total: u64,
}

/// The node's memory manager.
#[derive(Debug)]
pub struct Memory {
    budget: u64,
    admission: bool,
    queued: AtomicU64,
    waited: AtomicU64,
    config: MemoryConfig,
    /// Waiting launches: (0 for consumers, 1 for sources; arrival).
    waiters: Mutex<std::collections::BTreeSet<(u8, u64)>>,
    arrivals: AtomicU64,
}

/// A running launch's reservation, given back when dropped.
#[derive(Debug)]
pub struct Grant(u64);

impl Drop for Grant {
    fn drop(&mut self) {
        RESERVED.fetch_sub(self.0, Ordering::Relaxed);
        FREED.notify_waiters();
    }
}

impl Memory {
    /// The manager for `config`, its budget read from the kernel when not set.
    pub fn new(config: &MemoryConfig) -> Memory {
        let budget = match config.budget_bytes {
            0 => (mem_available().unwrap_or(4 << 30) as f64 * config.budget_fraction.clamp(0.01, 1.0)) as u64,
            b => b,
        };
        Memory {
            budget,
            admission: config.admission,
            queued: AtomicU64::new(0),
            waited: AtomicU64::new(0),
            config: config.clone(),
            waiters: Mutex::new(Default::default()),
            arrivals: AtomicU64::new(0),
        }
    }

    /// Figures for the API and `/metrics`.
    pub fn stats(&self) -> MemoryStats {
        let (held, segments, peak) = book(|b| (b.held, b.segments.len(), b.peak));
        MemoryStats {
            budget_bytes: self.budget,
            held_bytes: held,
            segments,
            reserved_bytes: RESERVED.load(Ordering::Relaxed),
            peak_held_bytes: peak,
            peak_committed_bytes: PEAK_COMMITTED.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            waited_total: self.waited.load(Ordering::Relaxed),
        }
    }

    /// Bytes over the budget right now (0 when inside).
    pub fn excess(&self) -> u64 {
        (held().0 + RESERVED.load(Ordering::Relaxed)).saturating_sub(self.budget)
    }

    /// Waits until `estimate` bytes fit (evicting unpinned cached chunks first) and this launch
    /// is first in line, then reserves them until the grant is dropped.
    pub async fn admit(&self, estimate: u64, consumer: bool, cache: &Cache, cancel: &mut watch::Receiver<bool>) -> Result<Grant, AdmitError> {
        if !self.admission {
            return Ok(self.reserve(estimate));
        }
        let me = (u8::from(!consumer), self.arrivals.fetch_add(1, Ordering::Relaxed));
        let waiters = || self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        waiters().insert(me);
        // Leaves the line however this ends (admitted, cancelled, or the future dropped).
        struct InLine<'a>(&'a Memory, (u8, u64));
        impl Drop for InLine<'_> {
            fn drop(&mut self) {
                self.0.waiters.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
                FREED.notify_waiters();
            }
        }
        let _line = InLine(self, me);
        let mut waited = false;
        loop {
            let first = waiters().first() == Some(&me);
            if first && let Some(g) = self.try_admit(estimate, cache) {
                if waited {
                    self.queued.fetch_sub(1, Ordering::Relaxed);
                }
                return Ok(g);
            }
            if !waited {
                waited = true;
                self.queued.fetch_add(1, Ordering::Relaxed);
                self.waited.fetch_add(1, Ordering::Relaxed);
            }
            // Woken when memory is released or the line moves; the timeout covers a release
            // between the check and the wait.
            tokio::select! {
                _ = tokio::time::timeout(Duration::from_millis(50), FREED.notified()) => {}
                _ = cancel.wait_for(|c| *c) => {
                    self.queued.fetch_sub(1, Ordering::Relaxed);
                    return Err(AdmitError::Cancelled);
                }
            }
        }
    }

    fn try_admit(&self, estimate: u64, cache: &Cache) -> Option<Grant> {
        let reserved = RESERVED.load(Ordering::Relaxed);
        let fits = |held: u64| held + reserved + estimate <= self.budget;
        if fits(held().0) {
            return Some(self.reserve(estimate));
        }
        let need = (held().0 + reserved + estimate).saturating_sub(self.budget);
        cache.evict(need);
        if fits(held().0) || reserved == 0 {
            // With nothing else running nothing will free memory: go, so runs always progress.
            return Some(self.reserve(estimate));
        }
        None
    }

    fn reserve(&self, estimate: u64) -> Grant {
        let r = RESERVED.fetch_add(estimate, Ordering::Relaxed) + estimate;
        PEAK_COMMITTED.fetch_max(held().0 + r, Ordering::Relaxed);
        Grant(estimate)
    }

    /// Estimated memory of a launch: its `resources.memory` when set; for a scan, its files'
    /// bytes times `scan_expansion` less what the cache already holds of them; for others, a
    /// base plus a quarter of their inputs (a heuristic: queries mostly reduce).
    pub fn estimate(&self, task: &Task, resources: &Resources, inputs: &[TableRef], cache: &Cache, cfg: &Config) -> u64 {
        if let Some(m) = resources.memory {
            return m;
        }
        let base = self.config.function_base_bytes;
        match task {
            Task::Scan { path, .. } => {
                let files = parquet_bytes(Path::new(path));
                let want = (files as f64 * self.config.scan_expansion) as u64;
                let cached = if cfg.cache.enabled { cache.bytes_under(Path::new(path)) } else { 0 };
                want.saturating_sub(cached).max(base)
            }
            _ => base + inputs.iter().map(|t| t.bytes).sum::<u64>() / 4,
        }
    }
}

/// Bytes of a Parquet file, or of the `*.parquet` files in a folder (stat only).
fn parquet_bytes(path: &Path) -> u64 {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => m.len(),
        Ok(_) => std::fs::read_dir(path)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "parquet"))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// `MemAvailable` from `/proc/meminfo`, in bytes.
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    kib_field(&text, "MemAvailable:")
}

/// A process's proportional set size from `/proc/PID/smaps_rollup`, in bytes.
pub fn pss(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    kib_field(&text, "Pss:")
}

fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// Sets the calling process's `oom_score_adj` (lowering it needs CAP_SYS_RESOURCE).
pub fn set_oom_score_adj(v: i32) -> std::io::Result<()> {
    std::fs::write("/proc/self/oom_score_adj", v.clamp(-1000, 1000).to_string())
}

/// Raises the soft limit of open files to the hard one: cached chunks are one or a few memfds
/// each, held by the agent and mapped by every scan that takes them.
pub fn raise_nofile() {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills the struct it is given; setrlimit only reads it.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

static FUNCTION_OOM: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(900);

/// The environment variable a worker reads its `oom_score_adj` from.
pub const OOM_ENV: &str = "QUIVER_OOM_SCORE_ADJ";

/// The functions' `oom_score_adj`.
pub fn function_oom_score_adj() -> i32 {
    FUNCTION_OOM.load(Ordering::Relaxed)
}

/// In a worker: sets its own `oom_score_adj` from [`OOM_ENV`], if the agent passed one.
pub fn adopt_function_oom_score() {
    if let Some(v) = std::env::var(OOM_ENV).ok().and_then(|v| v.parse::<i32>().ok()) {
        let _ = set_oom_score_adj(v);
    }
}

/// Gives a started function process the functions' high `oom_score_adj` (raising a score
/// needs no privilege).
pub fn mark_function(pid: i32) {
    let v = FUNCTION_OOM.load(Ordering::Relaxed);
    if let Err(e) = std::fs::write(format!("/proc/{pid}/oom_score_adj"), v.to_string()) {
        tracing::debug!(pid, error = %e, "could not set a function's oom_score_adj");
    }
}

/// Start-up of the daemon's process: a low OOM score (when allowed) and a high fd limit.
pub fn init_agent_process(config: &MemoryConfig) {
    FUNCTION_OOM.store(config.function_oom_score_adj.clamp(-1000, 1000), Ordering::Relaxed);
    raise_nofile();
    if let Err(e) = set_oom_score_adj(config.agent_oom_score_adj) {
        tracing::info!(error = %e, "could not lower the agent's oom_score_adj (needs root)");
    }
}

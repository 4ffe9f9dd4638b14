//! `telemetry`: what the kernel-side telemetry (quiver-ebpf) costs the processes it watches and
//! the rest of the machine. memcpy-heavy and fault-heavy children run in a fresh cgroup v2 with
//! telemetry off; on, watching their cgroup and metering their copies; and on but not watching
//! them (what every other process on the machine pays).

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use quiver_ebpf::Telemetry;
use serde::Serialize;

use crate::proc::{machine, now_ns};

/// Options of `telemetry`.
#[derive(clap::Args)]
pub struct Args {
    /// Runs of each variant (interleaved); medians are reported.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// One JSON object per workload instead of a table.
    #[arg(long)]
    json: bool,
}

/// Options of the hidden child.
#[derive(clap::Args)]
pub struct ChildArgs {
    /// memcpy-small, memcpy-large or faults.
    workload: String,
}

/// (name, description, events: memcpy calls or page faults the workload makes)
const WORKLOADS: [(&str, &str, u64); 3] = [
    ("memcpy-small", "2M memcpy calls of 256 B", SMALL_CALLS),
    ("memcpy-large", "2048 memcpy calls of 1 MiB", LARGE_CALLS),
    ("faults", "touch 262144 fresh 4 KiB pages (1 GiB)", PAGES),
];
const SMALL_CALLS: u64 = 2_000_000;
const LARGE_CALLS: u64 = 2048;
const PAGES: u64 = 262_144;

#[derive(Serialize)]
struct Row {
    workload: &'static str,
    description: &'static str,
    events: u64,
    off_ms: f64,
    watched_ms: f64,
    unwatched_ms: f64,
    /// watched / off.
    watched_ratio: f64,
    /// unwatched / off: what every other process on the machine pays.
    unwatched_ratio: f64,
    /// (watched - off) per event, in ns.
    watched_ns_per_event: f64,
    /// What the watched run was charged: memcpy calls or page faults.
    counted: u64,
    /// Time to attach the copy meter to one process (`Telemetry::meter_copies`), in µs.
    meter_attach_us: f64,
}

type Copy3 =
    unsafe extern "C" fn(*mut libc::c_void, *const libc::c_void, usize) -> *mut libc::c_void;

/// The child: waits for a byte on stdin (its meter is attached then), runs one workload and
/// prints its duration in ns.
pub fn child(a: ChildArgs) -> Result<()> {
    let mut go = [0u8; 1];
    std::io::Read::read_exact(&mut std::io::stdin(), &mut go).context("wait for the start")?;
    let t0;
    match a.workload.as_str() {
        "memcpy-small" | "memcpy-large" => {
            let (size, calls) = if a.workload == "memcpy-small" {
                (256, SMALL_CALLS)
            } else {
                (1 << 20, LARGE_CALLS)
            };
            let src = vec![1u8; size];
            let mut dst = vec![0u8; size];
            // Through a volatile pointer so the compiler neither inlines nor elides the calls.
            let f: Copy3 = libc::memcpy;
            t0 = now_ns();
            for _ in 0..calls {
                // SAFETY: both buffers hold `size` bytes and do not overlap.
                unsafe {
                    std::ptr::read_volatile(&f)(dst.as_mut_ptr().cast(), src.as_ptr().cast(), size)
                };
            }
            std::hint::black_box(&dst);
        }
        "faults" => {
            let len = PAGES as usize * 4096;
            // SAFETY: a fresh private anonymous mapping, used only here.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                bail!("mmap: {}", std::io::Error::last_os_error());
            }
            // One fault per 4 KiB page, whatever the THP setting.
            // SAFETY: p is the mapping above.
            unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
            t0 = now_ns();
            for i in 0..PAGES as usize {
                // SAFETY: inside the mapping.
                unsafe { std::ptr::write_volatile((p as *mut u8).add(i * 4096), 1) };
            }
        }
        w => bail!("unknown workload {w}"),
    }
    println!("{}", now_ns() - t0);
    Ok(())
}

fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup2 hierarchy is mounted")
}

/// A fresh cgroup v2 directory, removed on drop.
struct Cgroup(PathBuf);

impl Cgroup {
    fn new(root: &std::path::Path, n: usize) -> Result<Cgroup> {
        let p = root.join(format!("quiver-bench-{}-{n}", std::process::id()));
        std::fs::create_dir(&p).with_context(|| format!("mkdir {}", p.display()))?;
        Ok(Cgroup(p))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// Runs the workload's child in `cg`, calling `started` with its pid before letting it work;
/// returns its duration in ms.
fn run_child(workload: &str, cg: &Cgroup, started: impl FnOnce(u32) -> Result<()>) -> Result<f64> {
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cg.0.join("cgroup.procs"))?;
    let fd = procs.as_raw_fd();
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["telemetry-child", workload])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    // SAFETY: write is async-signal-safe; the child moves itself into the cgroup before exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let mut child = cmd.spawn().context("run the telemetry child")?;
    drop(procs);
    let started = started(child.id());
    let mut stdin = child.stdin.take().context("child's stdin")?;
    std::io::Write::write_all(&mut stdin, b"g")?;
    drop(stdin);
    let out = child.wait_with_output()?;
    started?;
    if !out.status.success() {
        bail!("telemetry child {workload} failed: {}", out.status);
    }
    let ns: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("child's duration")?;
    Ok(ns as f64 / 1e6)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs the benchmark.
pub fn run(a: Args) -> Result<()> {
    if let Err(e) = Telemetry::start() {
        bail!("{e}");
    }
    let root = cgroup2_root()?;
    let mut rows = Vec::new();
    for (i, &(workload, description, events)) in WORKLOADS.iter().enumerate() {
        let (mut off, mut watched, mut unwatched) = (vec![], vec![], vec![]);
        let mut counted = 0;
        let mut attach = vec![];
        for rep in 0..a.repeat.max(1) {
            let cg = Cgroup::new(&root, i * 1000 + rep)?;
            off.push(run_child(workload, &cg, |_| Ok(()))?);
            let t = Telemetry::start().map_err(|e| anyhow::anyhow!("{e}"))?;
            unwatched.push(run_child(workload, &cg, |_| Ok(()))?);
            let w = t.watch(&cg.0, false)?;
            let mut meter = None;
            watched.push(run_child(workload, &cg, |pid| {
                let t0 = now_ns();
                meter = Some(t.meter_copies(pid)?);
                attach.push((now_ns() - t0) as f64 / 1e3);
                Ok(())
            })?);
            drop(meter);
            let c = w.take()?;
            counted = if workload == "faults" {
                c.page_faults
            } else {
                c.memcpy_calls
            };
        }
        let (off, watched, unwatched) = (
            median(&mut off),
            median(&mut watched),
            median(&mut unwatched),
        );
        rows.push(Row {
            workload,
            description,
            events,
            off_ms: off,
            watched_ms: watched,
            unwatched_ms: unwatched,
            watched_ratio: watched / off,
            unwatched_ratio: unwatched / off,
            watched_ns_per_event: (watched - off) * 1e6 / events as f64,
            counted,
            meter_attach_us: median(&mut attach),
        });
    }
    if a.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    println!(
        "telemetry overhead ({}; medians of {} runs)",
        machine(),
        a.repeat.max(1)
    );
    println!(
        "{:<13} {:>9} {:>11} {:>7} {:>13} {:>7} {:>12} {:>10}",
        "workload", "off ms", "watched ms", "ratio", "unwatched ms", "ratio", "ns/event", "counted"
    );
    for r in &rows {
        println!(
            "{:<13} {:>9.1} {:>11.1} {:>7.2} {:>13.1} {:>7.2} {:>12.0} {:>10}",
            r.workload,
            r.off_ms,
            r.watched_ms,
            r.watched_ratio,
            r.unwatched_ms,
            r.unwatched_ratio,
            r.watched_ns_per_event,
            r.counted
        );
    }
    for r in &rows {
        println!("  {}: {} ({} events)", r.workload, r.description, r.events);
    }
    let mut attach: Vec<f64> = rows.iter().map(|r| r.meter_attach_us).collect();
    println!(
        "attaching the copy meter to a process: {:.0} us (median)",
        median(&mut attach)
    );
    Ok(())
}

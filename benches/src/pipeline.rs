//! `pipeline`: the example DAG (examples/taxi) three ways in one run: quiver with the arena,
//! quiver with every edge copied through an Arrow IPC stream, and the same SQL in one DuckDB in
//! one process (the floor). Each variant runs as its own `quiver` process (built here in
//! release mode) in a fresh memory cgroup, so peak memory covers the agent and all its workers.
//!
//! `arena-unsandboxed`: native workers outside the sandbox (`sandbox_workers = false`), for
//! what their namespaces, new root and user change cost.
//!
//! Telemetry variants: `arena-telemetry-off` (the agent without its BPF programs, for their
//! overhead), and `arena-metered` / `copy-metered` (the copy meter on, for the kernel-measured
//! bytes memcpy'd beside our own bytes copied; the meter's traps slow them down, so they run
//! once and their times are not compared).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;
use serde_json::Value;

use crate::proc::{machine, ms_since, now_ns};

/// Options of `pipeline`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    input: Input,
    /// Runs of each variant (interleaved); medians are reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Variants to run (default: all).
    #[arg(long, value_delimiter = ',', value_parser = ["arena", "copy", "duckdb-single", "arena-telemetry-off", "arena-unsandboxed", "arena-metered", "copy-metered"])]
    variants: Option<Vec<String>>,
    /// One JSON object per variant instead of tables.
    #[arg(long)]
    json: bool,
}

/// The generated trips and the quiver binary a benchmark of whole DAGs runs (`pipeline`,
/// `sharing`).
#[derive(clap::Args)]
pub(crate) struct Input {
    /// Trips in the input.
    #[arg(long, default_value_t = 10_000_000)]
    pub(crate) trips: u64,
    /// Where the generated trips are kept between runs.
    #[arg(long, default_value = "/var/tmp/quiver-bench")]
    data: PathBuf,
    /// The quiver binary (default: built here with `cargo build --release -p quiver`).
    #[arg(long, env = "QUIVER_BIN")]
    quiver: Option<PathBuf>,
}

impl Input {
    /// The quiver binary (built when not given) and the folder of trips (generated once).
    pub(crate) fn prepare(&self) -> Result<(PathBuf, PathBuf)> {
        let quiver = match &self.quiver {
            Some(q) => q.clone(),
            None => build_quiver()?,
        };
        let trips_dir = trips(&quiver, &self.data, self.trips)?;
        Ok((quiver, trips_dir))
    }
}

/// One variant's result (medians over the repeats).
#[derive(Serialize, Clone)]
struct Row {
    variant: String,
    trips: u64,
    /// The DAG's wall time (submission to finish; for duckdb-single, first to last statement).
    wall_ms: f64,
    /// Bytes copied between nodes (our own count; null where not measurable).
    bytes_copied: Option<u64>,
    /// Bytes the nodes' processes passed to memcpy/memmove, kernel-measured (metered variants).
    memcpy_bytes: Option<u64>,
    /// Of those, calls of 1 MiB or more (table-sized copies).
    memcpy_large_calls: Option<u64>,
    /// Page faults of the nodes' processes, kernel-measured (null without telemetry).
    page_faults: Option<u64>,
    /// Peak memory of the whole variant (agent, workers), from its cgroup.
    peak_rss_bytes: u64,
    node_overhead_p50_ms: Option<f64>,
    node_overhead_p99_ms: Option<f64>,
    /// Process wall time, including start-up and shutdown.
    process_ms: f64,
    /// Every run's wall_ms.
    wall_ms_all: Vec<f64>,
    /// Per node: name, median wall ms.
    nodes: Vec<(String, f64)>,
    /// Where peak memory came from.
    memory_source: &'static str,
}

pub fn run(args: Args) -> Result<()> {
    let (quiver, trips_dir) = args.input.prepare()?;
    let work = tempfile::Builder::new().prefix("quiver-pipeline-").tempdir()?;
    let project = make_project(work.path(), &trips_dir)?;
    let variants = args.variants.clone().unwrap_or_else(|| {
        ["arena", "copy", "duckdb-single", "arena-telemetry-off", "arena-unsandboxed", "arena-metered", "copy-metered"].map(String::from).to_vec()
    });
    // Warm the page cache so no variant pays the first read of the input.
    for e in std::fs::read_dir(&trips_dir)? {
        let _ = std::fs::read(e?.path());
    }
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); variants.len()];
    for r in 0..args.repeat {
        for (i, v) in variants.iter().enumerate() {
            if v.ends_with("-metered") && r > 0 {
                continue;
            }
            let s = run_variant(&quiver, &project, v, work.path(), &format!("{v}-{r}"))?;
            if !args.json {
                eprintln!("  {v} run {}: {:.0} ms, peak {:.2} GiB", r + 1, s.wall_ms, s.peak as f64 / (1u64 << 30) as f64);
            }
            samples[i].push(s);
        }
    }
    let rows: Vec<Row> = variants.iter().zip(&samples).map(|(v, s)| summarize(v, args.input.trips, s)).collect();
    if args.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        print_tables(&rows, args.repeat);
    }
    Ok(())
}

/// The `n`-trip input under `data` (generated once, kept between runs), with its page cache
/// warmed so no variant pays the first read.
fn trips(quiver: &Path, data: &Path, n: u64) -> Result<PathBuf> {
    let trips_dir = data.join(format!("trips-{n}")).join("trips");
    let complete = trips_dir.with_file_name("complete");
    if !complete.exists() {
        eprintln!("generating {n} trips in {}", trips_dir.display());
        let _ = std::fs::remove_dir_all(&trips_dir);
        let ok = Command::new(quiver).args(["gen-taxi", "--size", &format!("{n}rows"), "--out"]).arg(&trips_dir).status()?;
        ensure!(ok.success(), "quiver gen-taxi failed");
        std::fs::write(&complete, b"")?;
    }
    Ok(trips_dir)
}

/// Builds the release `quiver` binary next to this one and returns its path.
fn build_quiver() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "--release", "-p", "quiver"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .context("running cargo build --release -p quiver")?;
    ensure!(st.success(), "cargo build --release -p quiver failed");
    let me = std::env::current_exe()?;
    let q = me.parent().context("no folder")?.join("quiver");
    ensure!(q.exists(), "{} was not built", q.display());
    Ok(q)
}

/// A copy of examples/taxi whose trips source points at `trips`.
fn make_project(dir: &Path, trips: &Path) -> Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/taxi");
    let p = dir.join("taxi");
    std::fs::create_dir_all(p.join("data"))?;
    for e in std::fs::read_dir(&src)? {
        let e = e?;
        let name = e.file_name();
        if e.path().extension().is_some_and(|x| x == "sql" || x == "toml") {
            std::fs::copy(e.path(), p.join(&name))?;
        }
    }
    std::os::unix::fs::symlink(trips, p.join("data/trips"))?;
    Ok(p)
}

#[derive(Clone)]
struct Sample {
    wall_ms: f64,
    process_ms: f64,
    peak: u64,
    memory_source: &'static str,
    copied: Option<u64>,
    kernel: Kernel,
    overheads: Vec<f64>,
    nodes: Vec<(String, f64)>,
}

fn run_variant(quiver: &Path, project: &Path, variant: &str, work: &Path, tag: &str) -> Result<Sample> {
    let wh = work.join(format!("warehouse-{tag}"));
    let mut cmd = Command::new(quiver);
    cmd.arg("run").arg(project).arg("--json").arg("--warehouse").arg(&wh);
    match variant {
        "arena" | "arena-telemetry-off" | "arena-unsandboxed" | "arena-metered" => cmd.args(["--edges", "arena"]),
        "copy" | "copy-metered" => cmd.args(["--edges", "ipc"]),
        _ => cmd.arg("--duckdb-only"),
    };
    let config = match variant {
        "arena-telemetry-off" => Some("[telemetry]\nenabled = false\n"),
        "arena-unsandboxed" => Some("sandbox_workers = false\n"),
        v if v.ends_with("-metered") => Some("[telemetry]\ncopy_meter = true\n"),
        _ => None,
    };
    if let Some(c) = config {
        let cfg = work.join(format!("agent-{tag}.toml"));
        std::fs::write(&cfg, c)?;
        cmd.arg("--config").arg(cfg);
    }
    // Never a running service: each variant starts its own agent inside its cgroup.
    cmd.arg("--socket").arg(work.join("no-agent.sock"));
    cmd.env("QUIVER_LOG", "warn").stdout(Stdio::piped()).stderr(Stdio::null());
    let cg = Cgroup::create(tag);
    if let Some(cg) = &cg {
        cg.enter_on_exec(&mut cmd);
    }
    let t0 = now_ns();
    let out = cmd.output().context("running quiver")?;
    let process_ms = ms_since(t0);
    ensure!(out.status.success(), "{variant}: quiver run failed: {}", String::from_utf8_lossy(&out.stdout));
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| format!("{variant}: bad JSON"))?;
    let (peak, memory_source) = match &cg {
        Some(cg) => (cg.peak(), cg.source),
        None => (children_maxrss(), "largest process (no cgroup: not root)"),
    };
    drop(cg);
    let _ = std::fs::remove_dir_all(&wh);
    let nodes: Vec<(String, f64)> = v["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| (n["name"].as_str().unwrap_or("").to_owned(), n["wall_ms"].as_f64().unwrap_or(0.0)))
        .collect();
    if variant == "duckdb-single" {
        return Ok(Sample {
            wall_ms: v["wall_ms"].as_f64().unwrap_or(0.0),
            process_ms,
            peak,
            memory_source,
            copied: None,
            kernel: Kernel::default(),
            overheads: Vec::new(),
            nodes,
        });
    }
    if v["status"] != "succeeded" {
        bail!("{variant}: run {}: {}", v["status"], v["error"]);
    }
    let ns = v["nodes"].as_array().context("no nodes")?;
    Ok(Sample {
        wall_ms: v["wall_ms"].as_f64().unwrap_or(0.0),
        process_ms,
        peak,
        memory_source,
        copied: Some(ns.iter().map(|n| n["bytes_copied"].as_u64().unwrap_or(0)).sum()),
        kernel: Kernel {
            memcpy_bytes: kernel_sum(ns, "memcpy_bytes"),
            memcpy_large_calls: kernel_sum(ns, "memcpy_large_calls"),
            page_faults: kernel_sum(ns, "page_faults"),
        },
        overheads: ns.iter().filter_map(|n| n["overhead_ms"].as_f64()).collect(),
        nodes,
    })
}

/// The kernel-measured figures of one run, summed over its nodes.
#[derive(Clone, Copy, Default)]
struct Kernel {
    memcpy_bytes: Option<u64>,
    memcpy_large_calls: Option<u64>,
    page_faults: Option<u64>,
}

/// `kernel.FIELD` summed over the nodes; None when no node has it.
fn kernel_sum(nodes: &[Value], field: &str) -> Option<u64> {
    let v: Vec<u64> = nodes.iter().filter_map(|n| n["kernel"][field].as_u64()).collect();
    (!v.is_empty()).then(|| v.iter().sum())
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(mut v: Vec<f64>, p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[((v.len() - 1) as f64 * p).round() as usize])
}

fn summarize(variant: &str, trips: u64, s: &[Sample]) -> Row {
    let overheads: Vec<f64> = s.iter().flat_map(|x| x.overheads.iter().copied()).collect();
    let nodes = s[0]
        .nodes
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (name.clone(), median(s.iter().filter_map(|x| x.nodes.get(i).map(|n| n.1)).collect())))
        .collect();
    Row {
        variant: variant.into(),
        trips,
        wall_ms: median(s.iter().map(|x| x.wall_ms).collect()),
        bytes_copied: s[0].copied,
        memcpy_bytes: s[0].kernel.memcpy_bytes,
        memcpy_large_calls: s[0].kernel.memcpy_large_calls,
        page_faults: s[0].kernel.page_faults,
        peak_rss_bytes: median(s.iter().map(|x| x.peak as f64).collect()) as u64,
        node_overhead_p50_ms: percentile(overheads.clone(), 0.5),
        node_overhead_p99_ms: percentile(overheads, 0.99),
        process_ms: median(s.iter().map(|x| x.process_ms).collect()),
        wall_ms_all: s.iter().map(|x| x.wall_ms).collect(),
        nodes,
        memory_source: s[0].memory_source,
    }
}

fn print_tables(rows: &[Row], repeat: usize) {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let opt = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.2}"));
    println!("machine: {}", machine());
    println!("medians of {repeat} interleaved runs per variant; trips: {}", rows.first().map_or(0, |r| r.trips));
    println!();
    let gb = |b: Option<u64>| b.map_or("n/a".into(), |b| format!("{:.2}", b as f64 / 1e9));
    let count = |c: Option<u64>| c.map_or("n/a".into(), |c| c.to_string());
    println!(
        "| variant | DAG wall ms | runs ms | process ms | GB copied | GB memcpy'd (kernel-measured) | memcpy >= 1 MiB | page faults | peak GiB | overhead p50 ms | overhead p99 ms |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.0} | {} | {:.0} | {} | {} | {} | {} | {:.2} | {} | {} |",
            r.variant,
            r.wall_ms,
            r.wall_ms_all.iter().map(|w| format!("{w:.0}")).collect::<Vec<_>>().join(", "),
            r.process_ms,
            gb(r.bytes_copied),
            gb(r.memcpy_bytes),
            count(r.memcpy_large_calls),
            count(r.page_faults),
            gib(r.peak_rss_bytes),
            opt(r.node_overhead_p50_ms),
            opt(r.node_overhead_p99_ms),
        );
    }
    println!();
    println!("| node | {} |", rows.iter().map(|r| format!("{} ms", r.variant)).collect::<Vec<_>>().join(" | "));
    println!("|---|{}", "---:|".repeat(rows.len()));
    if let Some(first) = rows.first() {
        for (name, _) in &first.nodes {
            let cells: Vec<String> =
                rows.iter().map(|r| r.nodes.iter().find(|n| &n.0 == name).map_or("-".into(), |n| format!("{:.0}", n.1))).collect();
            println!("| {name} | {} |", cells.join(" | "));
        }
    }
    let find = |v: &str| rows.iter().find(|r| r.variant == v);
    println!();
    if let (Some(a), Some(d)) = (find("arena"), find("duckdb-single")) {
        println!("arena / duckdb-single wall: {:.2}x (goal <= 1.3x)", a.wall_ms / d.wall_ms);
    }
    if let (Some(a), Some(c)) = (find("arena"), find("copy")) {
        println!("copy / arena wall: {:.2}x (goal >= 1.5x)", c.wall_ms / a.wall_ms);
        println!("arena / copy peak memory: {:.2}x", a.peak_rss_bytes as f64 / c.peak_rss_bytes as f64);
    }
    if let Some(a) = find("arena") {
        println!("arena node overhead p50: {} ms (goal < 1 ms)", opt(a.node_overhead_p50_ms));
    }
    if let (Some(a), Some(u)) = (find("arena"), find("arena-unsandboxed")) {
        println!(
            "arena sandboxed / unsandboxed workers: wall {:.3}x, node overhead p50 {} vs {} ms",
            a.wall_ms / u.wall_ms,
            opt(a.node_overhead_p50_ms),
            opt(u.node_overhead_p50_ms)
        );
    }
    if let (Some(a), Some(off)) = (find("arena"), find("arena-telemetry-off")) {
        println!("arena telemetry on / off wall: {:.3}x (goal < 3% difference)", a.wall_ms / off.wall_ms);
    }
    if let (Some(a), Some(c)) = (find("arena-metered"), find("copy-metered")) {
        let d = |x: Option<u64>, y: Option<u64>| x.zip(y).map_or("n/a".into(), |(x, y)| format!("{:.2}", (x as f64 - y as f64) / 1e9));
        println!(
            "copy - arena: {} GB more memcpy'd (kernel-measured) for {} GB more copied (our books)",
            d(c.memcpy_bytes, a.memcpy_bytes),
            d(c.bytes_copied, a.bytes_copied)
        );
    }
}

/// A memory cgroup for one variant (v2 `memory.peak`, or v1 `memory.max_usage_in_bytes`).
pub(crate) struct Cgroup {
    dir: PathBuf,
    pub(crate) procs: PathBuf,
    peak_file: PathBuf,
    pub(crate) source: &'static str,
}

impl Cgroup {
    /// Makes `cmd`'s process start in this cgroup.
    pub(crate) fn enter_on_exec(&self, cmd: &mut Command) {
        let procs = self.procs.clone();
        // SAFETY: between fork and exec only open/write/close of a path prepared beforehand.
        unsafe {
            cmd.pre_exec(move || {
                std::fs::write(&procs, b"0")?;
                Ok(())
            })
        };
    }

    pub(crate) fn create(tag: &str) -> Option<Cgroup> {
        let name = format!("quiver-bench-{}-{tag}", std::process::id());
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers");
        let (dir, peak, source) = if v2.exists() && std::fs::read_to_string(v2).is_ok_and(|c| c.contains("memory")) {
            let d = PathBuf::from("/sys/fs/cgroup").join(&name);
            (d.clone(), d.join("memory.peak"), "cgroup v2 memory.peak")
        } else {
            let d = PathBuf::from("/sys/fs/cgroup/memory").join(&name);
            (d.clone(), d.join("memory.max_usage_in_bytes"), "cgroup v1 memory.max_usage_in_bytes")
        };
        std::fs::create_dir(&dir).ok()?;
        Some(Cgroup { procs: dir.join("cgroup.procs"), dir, peak_file: peak, source })
    }

    pub(crate) fn peak(&self) -> u64 {
        std::fs::read_to_string(&self.peak_file).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Its processes have exited; with v1, charged page cache may keep it busy briefly.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            let _ = std::fs::write(self.dir.join("memory.force_empty"), b"0");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Peak RSS of the largest waited-for child (without a cgroup).
fn children_maxrss() -> u64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    unsafe {
        let mut r: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut r);
        r.ru_maxrss as u64 * 1024
    }
}

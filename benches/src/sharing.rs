//! `sharing`: K concurrent DAGs reading the same 10M-trip input (a scan of four columns and a
//! GROUP BY over them), with the deserialization cache on and off, in one run. Each (variant,
//! K) gets a fresh `quiver agent` in its own memory cgroup, so peak memory covers the agent and
//! all its workers, and the cache starts empty: cache-on pays its one decode inside the
//! measurement.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;
use serde_json::{Value, json};

use crate::pipeline::{Cgroup, Input};
use crate::proc::machine;

/// Options of `sharing`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    input: Input,
    /// Concurrent DAGs.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    k: Vec<usize>,
    /// Waves per measurement: each submits K runs at once and waits for all of them.
    #[arg(long, default_value_t = 3)]
    waves: usize,
    /// One JSON object per measurement instead of a table.
    #[arg(long)]
    json: bool,
}

/// One measurement.
#[derive(Serialize, Clone)]
struct Row {
    variant: &'static str,
    k: usize,
    runs: usize,
    runs_per_min: f64,
    peak_rss_bytes: u64,
    /// Bytes the scans decoded: the cache's figure with the cache on; each scan's output with
    /// it off (every scan decodes its whole projection).
    bytes_decoded: u64,
    wall_s: f64,
    memory_source: &'static str,
}

const COLUMNS: [&str; 4] = ["pickup_location_id", "fare_amount", "trip_distance", "tip_amount"];
const SQL: &str = "SELECT pickup_location_id, count(*) AS trips, sum(fare_amount) AS fares, \
                   avg(trip_distance) AS dist, sum(tip_amount) AS tips FROM t GROUP BY pickup_location_id";

pub fn run(args: Args) -> Result<()> {
    let (quiver, input) = args.input.prepare()?;
    // Warm the page cache (outside the agents' cgroups) so no measurement pays the first read.
    for e in std::fs::read_dir(&input)? {
        let _ = std::fs::read(e?.path());
    }
    let mut rows = Vec::new();
    for &k in &args.k {
        for variant in ["cache-off", "cache-on"] {
            let r = measure(&quiver, &input, variant, k, args.waves)?;
            if !args.json {
                eprintln!("  {variant} k={k}: {:.1} runs/min, peak {:.2} GiB", r.runs_per_min, gib(r.peak_rss_bytes));
            }
            rows.push(r);
        }
    }
    if args.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        print_table(&rows, args.input.trips, args.waves);
    }
    Ok(())
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

fn measure(quiver: &Path, input: &Path, variant: &'static str, k: usize, waves: usize) -> Result<Row> {
    let work = tempfile::Builder::new().prefix("quiver-sharing-").tempdir()?;
    let cfg = work.path().join("agent.toml");
    std::fs::write(&cfg, format!("[cache]\nenabled = {}\n", variant == "cache-on"))?;
    let sock = work.path().join("agent.sock");
    let cg = Cgroup::create(&format!("sharing-{variant}-{k}"));
    let mut cmd = Command::new(quiver);
    cmd.arg("agent").arg("--config").arg(&cfg).arg("--socket").arg(&sock).arg("--warehouse").arg(work.path().join("wh"));
    cmd.env("QUIVER_LOG", "warn").stdout(Stdio::null()).stderr(Stdio::inherit());
    if let Some(cg) = &cg {
        cg.enter_on_exec(&mut cmd);
    }
    let agent = Agent(cmd.spawn().context("starting quiver agent")?);
    let t0 = Instant::now();
    while UnixStream::connect(&sock).is_err() {
        ensure!(t0.elapsed() < Duration::from_secs(30), "the agent did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let plan = json!({"nodes": [
        {"name": "t", "kind": "scan", "path": input, "columns": COLUMNS},
        {"name": "s", "kind": "sql", "parents": ["t"], "sql": SQL}
    ]});
    let body = plan.to_string();
    let mut decoded = 0;
    let t0 = Instant::now();
    for _ in 0..waves {
        let ids: Vec<String> = (0..k)
            .map(|_| {
                let v = call(&sock, "POST", "/v1/runs", Some(&body))?;
                v["id"].as_str().map(str::to_owned).context("no run id")
            })
            .collect::<Result<_>>()?;
        for id in ids {
            let st = wait(&sock, &id)?;
            if st["status"] != "succeeded" {
                bail!("{variant} k={k}: run {id} {}: {}", st["status"], st["error"]);
            }
            let scan = &st["nodes"][0];
            decoded += match variant {
                "cache-on" => scan["cache"]["bytes_decoded"].as_u64().unwrap_or(0),
                _ => scan["bytes_referenced"].as_u64().unwrap_or(0) + scan["bytes_copied"].as_u64().unwrap_or(0),
            };
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let (peak, source) = match &cg {
        Some(cg) => (cg.peak(), cg.source),
        None => (0, "none (no cgroup: not root)"),
    };
    drop(agent);
    drop(cg);
    Ok(Row {
        variant,
        k,
        runs: k * waves,
        runs_per_min: (k * waves) as f64 / wall * 60.0,
        peak_rss_bytes: peak,
        bytes_decoded: decoded,
        wall_s: wall,
        memory_source: source,
    })
}

/// The agent process; stopped with SIGTERM (it kills its workers) and reaped when dropped.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: kill has no memory effects; the pid is our child's.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn wait(sock: &Path, id: &str) -> Result<Value> {
    loop {
        let v = call(sock, "GET", &format!("/v1/runs/{id}"), None)?;
        if v["status"] != "running" {
            return Ok(v);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTP/1.1 request over the agent's Unix socket (Connection: close); the JSON answer.
fn call(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Result<Value> {
    let mut s = UnixStream::connect(sock)?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: quiver\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status)?;
    let mut chunked = false;
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        if h == "\r\n" || h.is_empty() {
            break;
        }
        chunked |= h.to_ascii_lowercase().starts_with("transfer-encoding: chunked");
    }
    let mut out = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim(), 16)?;
            if n == 0 {
                break;
            }
            let mut buf = vec![0; n + 2];
            r.read_exact(&mut buf)?;
            out.extend_from_slice(&buf[..n]);
        }
    } else {
        r.read_to_end(&mut out)?;
    }
    ensure!(status.contains(" 2"), "{method} {path}: {status}: {}", String::from_utf8_lossy(&out));
    Ok(serde_json::from_slice(&out)?)
}

fn print_table(rows: &[Row], trips: u64, waves: usize) {
    println!("machine: {}", machine());
    println!("{trips} trips; {waves} waves of K concurrent runs per measurement; a fresh agent (empty cache) each");
    println!();
    println!("| variant | K | runs | runs/min | peak GiB | GB decoded | wall s |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.1} | {:.2} | {:.2} | {:.1} |",
            r.variant,
            r.k,
            r.runs,
            r.runs_per_min,
            gib(r.peak_rss_bytes),
            r.bytes_decoded as f64 / 1e9,
            r.wall_s
        );
    }
    let find = |v: &str, k: usize| rows.iter().find(|r| r.variant == v && r.k == k);
    println!();
    for r in rows.iter().filter(|r| r.variant == "cache-on") {
        if let Some(off) = find("cache-off", r.k) {
            println!("K={}: cache-on / cache-off throughput {:.2}x", r.k, r.runs_per_min / off.runs_per_min);
        }
    }
    if let (Some(on8), Some(off8)) = (find("cache-on", 8), find("cache-off", 8)) {
        println!("goal: K=8 throughput >= 2.8x cache-off: {:.2}x", on8.runs_per_min / off8.runs_per_min);
    }
    if let (Some(on8), Some(on1)) = (find("cache-on", 8), find("cache-on", 1)) {
        println!("goal: K=8 peak memory <= 1.2x K=1 (cache-on): {:.2}x", on8.peak_rss_bytes as f64 / on1.peak_rss_bytes.max(1) as f64);
    }
}

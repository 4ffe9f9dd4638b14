//! The user-facing commands: `quiver run`, `status`, `tables`. Each talks to the agent on its
//! socket; `run` starts an agent inside the same process when none is listening, so it works on
//! a machine with no service installed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use hyper::Method;

use crate::client::{self, ClientError};
use crate::config::Config;
use crate::state::Agent;

/// Where the CLI finds the agent.
pub fn default_socket() -> PathBuf {
    std::env::var_os("QUIVER_SOCKET").map(PathBuf::from).unwrap_or_else(|| Config::default().socket)
}

/// An agent running inside this process for one command.
struct Embedded {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    agent: Arc<Agent>,
    task: tokio::task::JoinHandle<()>,
}

async fn embedded(warehouse: &Path, config: Option<Config>) -> Result<Embedded> {
    let dir = tempfile::Builder::new().prefix("quiver-").tempdir()?;
    let socket = dir.path().join("agent.sock");
    crate::warehouse::recover(warehouse)?;
    let config = Config { socket: socket.clone(), warehouse: warehouse.to_path_buf(), ..config.unwrap_or_default() };
    let listener = crate::server::bind(&socket, 0o600)?;
    crate::memory::raise_nofile();
    let agent = Agent::new(config);
    agent.pool.fill();
    // It serves until `run` stops it with `stop_everything` and aborts the task.
    let task = tokio::spawn(crate::server::serve(agent.clone(), listener, std::future::pending::<()>()));
    Ok(Embedded { _dir: dir, socket, agent, task })
}

/// Options of `quiver run`.
pub struct RunOptions {
    /// Warehouse of an in-process agent.
    pub warehouse: Option<PathBuf>,
    /// The plan's `edges`.
    pub edges: String,
    /// Final status as JSON on stdout, progress on stderr.
    pub json: bool,
    /// Configuration of an in-process agent.
    pub config: Option<Config>,
}

/// Prints progress: to stdout normally, to stderr when stdout carries JSON.
macro_rules! progress {
    ($json:expr, $($t:tt)*) => {
        if $json { eprintln!($($t)*) } else { println!($($t)*) }
    };
}

/// `quiver run PROJECT`.
pub async fn run(project: &Path, socket: &Path, opts: RunOptions) -> Result<bool> {
    let RunOptions { warehouse, edges, json, config } = opts;
    let mut plan = crate::project::plan(project)?;
    plan["edges"] = serde_json::Value::String(edges);
    let mut local = None;
    let sock = match client::call(socket, Method::GET, "/healthz", None).await {
        Ok(_) => socket.to_path_buf(),
        Err(ClientError::Connect { .. }) => {
            let wh = warehouse.unwrap_or_else(|| project.join("warehouse"));
            eprintln!("no agent at {}; running one in this process (warehouse {})", socket.display(), wh.display());
            let e = embedded(&wh, config).await?;
            let s = e.socket.clone();
            local = Some(e);
            s
        }
        Err(e) => return Err(e.into()),
    };
    let sub = client::call(&sock, Method::POST, "/v1/runs", Some(plan.to_string().into_bytes())).await?;
    let id = sub["id"].as_str().context("the agent returned no run id")?.to_owned();
    progress!(json, "run {id}: {} nodes", plan["nodes"].as_array().map_or(0, Vec::len));
    client::follow(&sock, &id, |e| {
        let node = e["node"].as_str().unwrap_or("");
        let at = e["at_ms"].as_f64().unwrap_or(0.0);
        let msg = e["message"].as_str().map(|m| format!(": {m}")).unwrap_or_default();
        match e["event"].as_str().unwrap_or("") {
            "node_started" => progress!(json, "{at:>9.1} ms  {node:<28} started"),
            ev if ev.starts_with("node_") => progress!(json, "{at:>9.1} ms  {node:<28} {}{msg}", &ev[5..]),
            ev => progress!(json, "{at:>9.1} ms  {}{msg}", ev.replace('_', " ")),
        }
    })
    .await?;
    let st = client::call(&sock, Method::GET, &format!("/v1/runs/{id}"), None).await?;
    if json {
        println!("{st}");
    } else {
        print_summary(&st);
    }
    if let Some(e) = local {
        crate::server::stop_everything(&e.agent).await;
        e.task.abort();
    }
    Ok(st["status"] == "succeeded")
}

fn print_summary(st: &serde_json::Value) {
    println!();
    println!(
        "{:<28} {:<10} {:>10} {:>10} {:>9} {:>12} {:>12} {:>12} {:>12} {:>7}",
        "node", "state", "rows", "ms", "launch ms", "referenced", "copied", "faults", "memcpy'd", "mmaps"
    );
    for n in st["nodes"].as_array().into_iter().flatten() {
        let k = &n["kernel"];
        let count = |v: &serde_json::Value| v.as_u64().map_or("-".to_owned(), |x| x.to_string());
        println!(
            "{:<28} {:<10} {:>10} {:>10.1} {:>9.2} {:>12} {:>12} {:>12} {:>12} {:>7}",
            n["name"].as_str().unwrap_or(""),
            n["state"].as_str().unwrap_or(""),
            n["rows"].as_u64().unwrap_or(0),
            n["wall_ms"].as_f64().unwrap_or(0.0),
            n["overhead_ms"].as_f64().unwrap_or(0.0),
            human(n["bytes_referenced"].as_u64().unwrap_or(0)),
            human(n["bytes_copied"].as_u64().unwrap_or(0)),
            count(&k["page_faults"]),
            k["memcpy_bytes"].as_u64().map_or("-".to_owned(), human),
            count(&k["mmaps"]),
        );
        if let Some(e) = n["error"].as_str() {
            println!("    {} error: {e}", n["error_kind"].as_str().unwrap_or(""));
        }
    }
    let t = &st["telemetry"];
    if t["available"] == false {
        println!("kernel figures (faults, memcpy'd, mmaps): {}", t["reason"].as_str().unwrap_or("unavailable"));
    } else if t["copy_meter"] == false {
        println!("memcpy'd: the copy meter is off ([telemetry] copy_meter = false)");
    }
    println!("run {} {} in {:.1} ms", st["id"].as_str().unwrap_or(""), st["status"].as_str().unwrap_or(""), st["wall_ms"].as_f64().unwrap_or(0.0));
}

fn human(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

/// `quiver status [RUN]`.
/// `quiver logs RUN [NODE]`: a node's stdout and stderr, or every node's that wrote any.
pub async fn logs(socket: &Path, run: &str, node: Option<String>) -> Result<()> {
    let nodes: Vec<String> = match node {
        Some(n) => vec![n],
        None => {
            let st = client::call(socket, Method::GET, &format!("/v1/runs/{run}"), None).await?;
            st["nodes"].as_array().into_iter().flatten().filter_map(|n| n["name"].as_str().map(str::to_owned)).collect()
        }
    };
    let many = nodes.len() > 1;
    for n in nodes {
        let text = client::text(socket, &format!("/v1/runs/{run}/logs/{n}")).await?;
        if many && text.is_empty() {
            continue;
        }
        if many {
            println!("== {n} ==");
        }
        print!("{text}");
    }
    Ok(())
}

pub async fn status(socket: &Path, run: Option<String>) -> Result<()> {
    match run {
        Some(id) => print_summary(&client::call(socket, Method::GET, &format!("/v1/runs/{id}"), None).await?),
        None => {
            let v = client::call(socket, Method::GET, "/v1/runs", None).await?;
            for r in v["runs"].as_array().into_iter().flatten() {
                println!(
                    "{}  {:<10} {:>10.1} ms  {}",
                    r["id"].as_str().unwrap_or(""),
                    r["status"].as_str().unwrap_or(""),
                    r["wall_ms"].as_f64().unwrap_or(0.0),
                    r["error"].as_str().unwrap_or("")
                );
            }
        }
    }
    Ok(())
}

/// `quiver tables`.
pub async fn tables(socket: &Path) -> Result<()> {
    let v = client::call(socket, Method::GET, "/v1/tables", None).await?;
    for t in v["tables"].as_array().into_iter().flatten() {
        println!("{}  {} rows  {}  [{}]", t["name"].as_str().unwrap_or(""), t["rows"], human(t["bytes"].as_u64().unwrap_or(0)), t["columns"].as_array().map(|c| c.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", ")).unwrap_or_default());
    }
    Ok(())
}

/// What `quiver cache` does.
#[derive(clap::Subcommand)]
pub enum CacheCmd {
    /// List the cached column chunks.
    Ls,
    /// The cache's and the memory manager's figures.
    Stats,
    /// Drop every cached chunk.
    Drop,
}

/// `quiver cache ls|stats|drop`.
pub async fn cache(socket: &Path, cmd: CacheCmd) -> Result<()> {
    match cmd {
        CacheCmd::Ls => {
            let v = client::call(socket, Method::GET, "/v1/cache", None).await?;
            println!("{:<48} {:>5} {:<24} {:>10} {:>10} {:>4}", "file", "rg", "column", "rows", "bytes", "pin");
            for c in v["chunks"].as_array().into_iter().flatten() {
                println!(
                    "{:<48} {:>5} {:<24} {:>10} {:>10} {:>4}",
                    c["path"].as_str().unwrap_or(""),
                    c["row_group"],
                    c["column"].as_str().unwrap_or(""),
                    c["rows"],
                    human(c["bytes"].as_u64().unwrap_or(0)),
                    if c["pinned"] == true { "yes" } else { "" }
                );
            }
        }
        CacheCmd::Stats => {
            let v = client::call(socket, Method::GET, "/v1/cache/stats", None).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        CacheCmd::Drop => {
            let v = client::call(socket, Method::DELETE, "/v1/cache", None).await?;
            println!("dropped {} chunks, {}", v["dropped_chunks"], human(v["dropped_bytes"].as_u64().unwrap_or(0)));
        }
    }
    Ok(())
}

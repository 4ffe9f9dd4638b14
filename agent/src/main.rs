//! `quiver`: the agent daemon (`quiver agent`), its function workers (`quiver worker`) and the
//! command line a user or planner runs.

mod api;
mod cgroups;
mod cache;
mod children;
mod cli;
mod client;
mod config;
mod duck;
mod env_cmd;
mod executor;
mod filter;
mod launch;
mod memory;
mod plan;
mod project;
mod query;
mod proto;
mod python;
mod server;
mod single;
mod sipc_socket;
mod slots;
mod state;
mod tables;
mod taxi;
mod telemetry;
mod warehouse;
mod worker;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// Large and 64-byte aligned allocations made inside an arena scope (scan output) land in
/// shareable memory; everything else goes to the system allocator.
#[global_allocator]
static ALLOC: quiver_shm::ArenaAlloc = quiver_shm::ArenaAlloc::new(4 << 10);

// C and C++ code (DuckDB's Arrow export in the SQL worker) allocates in the arena inside a
// malloc scope; everywhere else these forward to glibc.
quiver_shm::interpose_malloc!();

#[derive(Parser)]
#[command(name = "quiver", version, about = "Run DAGs of functions over a zero-copy Arrow arena")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent daemon (what the systemd unit starts).
    Agent(AgentArgs),
    /// Run a project (a folder of SQL models) on the agent, or on one started in this process.
    Run {
        /// The project folder.
        project: PathBuf,
        /// The agent's socket.
        #[arg(long, env = "QUIVER_SOCKET", default_value_os_t = cli::default_socket())]
        socket: PathBuf,
        /// Warehouse of the in-process agent (default: PROJECT/warehouse).
        #[arg(long)]
        warehouse: Option<PathBuf>,
        /// How tables travel between nodes: `arena` (by reference) or `ipc` (copied through an
        /// Arrow IPC stream, for comparison).
        #[arg(long, default_value = "arena", value_parser = ["arena", "ipc"])]
        edges: String,
        /// Print the finished run's status as JSON on stdout (progress goes to stderr).
        #[arg(long)]
        json: bool,
        /// Run the whole DAG in one DuckDB in this process instead (no agent, no workers): the
        /// reference quiver is measured against. Materialized models go to --warehouse.
        #[arg(long, conflicts_with = "edges")]
        duckdb_only: bool,
        /// Configuration of the in-process agent (as `quiver agent --config`; its socket and
        /// warehouse are the command's own).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Query the warehouse's tables and the agent's kept tables with SQL (DuckDB).
    Query {
        /// The query.
        sql: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: query::Format,
        /// The warehouse folder.
        #[arg(long, default_value = "/var/lib/quiver/warehouse")]
        warehouse: PathBuf,
        /// The agent's socket.
        #[arg(long, env = "QUIVER_SOCKET", default_value_os_t = cli::default_socket())]
        socket: PathBuf,
    },
    /// A node's stdout and stderr (Python functions), or every node's of a run.
    Logs {
        /// The run id.
        run: String,
        /// One node.
        node: Option<String>,
        /// The agent's socket.
        #[arg(long, env = "QUIVER_SOCKET", default_value_os_t = cli::default_socket())]
        socket: PathBuf,
    },
    /// Show runs, or one run's nodes.
    Status {
        /// A run id.
        run: Option<String>,
        /// The agent's socket.
        #[arg(long, env = "QUIVER_SOCKET", default_value_os_t = cli::default_socket())]
        socket: PathBuf,
    },
    /// List the tables the agent keeps.
    Tables {
        /// The agent's socket.
        #[arg(long, env = "QUIVER_SOCKET", default_value_os_t = cli::default_socket())]
        socket: PathBuf,
    },
    /// The deserialization cache: list its chunks, show its figures, drop it.
    Cache {
        #[command(subcommand)]
        cmd: cli::CacheCmd,
        /// The agent's socket.
        #[arg(long, env = "QUIVER_SOCKET", default_value_os_t = cli::default_socket(), global = true)]
        socket: PathBuf,
    },
    /// Write the example's synthetic taxi trips as Parquet (deterministic).
    GenTaxi {
        /// Output folder.
        #[arg(long, default_value = "examples/taxi/data/trips")]
        out: PathBuf,
        /// How much: `1GB` (the default), `200MB`, or a row count such as `100000rows`.
        #[arg(long, default_value = "1GB", value_parser = taxi::parse_size)]
        size: u64,
    },
    /// Build, list and remove the Python environments functions run in.
    #[command(subcommand)]
    Env(env_cmd::EnvCmd),
    /// One function invocation, fed by the agent over fd 3 (not for direct use).
    #[command(hide = true)]
    Worker,
}

#[derive(clap::Args)]
struct AgentArgs {
    /// Configuration file.
    #[arg(long, default_value = config::DEFAULT_CONFIG)]
    config: PathBuf,
    /// API socket (overrides `socket`).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Warehouse folder (overrides `warehouse`).
    #[arg(long)]
    warehouse: Option<PathBuf>,
    /// Function processes at once (overrides `max_parallel`).
    #[arg(long)]
    max_parallel: Option<usize>,
    /// Workers kept started and waiting (overrides `idle_workers`).
    #[arg(long)]
    idle_workers: Option<usize>,
    /// Largest request body in bytes (overrides `max_body`).
    #[arg(long)]
    max_body: Option<usize>,
    /// Default function time limit in seconds (overrides `default_timeout_s`).
    #[arg(long)]
    default_timeout_s: Option<f64>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Worker => std::process::exit(worker::main()),
        Cmd::Run { project, duckdb_only: true, warehouse, json, .. } => {
            let plan = project::plan(&project)?;
            let wh = warehouse.unwrap_or_else(|| project.join("warehouse"));
            let summary = single::run(&plan, &wh.join(".duckdb-only"))?;
            if json {
                println!("{summary}");
            } else {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            }
            Ok(())
        }
        Cmd::Run { project, socket, warehouse, edges, json, config, .. } => {
            let config = config.map(|c| config::Config::load(&c)).transpose()?;
            let opts = cli::RunOptions { warehouse, edges, json, config };
            let ok = runtime()?.block_on(cli::run(&project, &socket, opts))?;
            std::process::exit(if ok { 0 } else { 1 })
        }
        Cmd::Query { sql, format, warehouse, socket } => query::run(&sql, &warehouse, &socket, format),
        Cmd::Status { run, socket } => runtime()?.block_on(cli::status(&socket, run)),
        Cmd::Logs { run, node, socket } => runtime()?.block_on(cli::logs(&socket, &run, node)),
        Cmd::Tables { socket } => runtime()?.block_on(cli::tables(&socket)),
        Cmd::Cache { cmd, socket } => runtime()?.block_on(cli::cache(&socket, cmd)),
        Cmd::Env(c) => env_cmd::run(c),
        Cmd::GenTaxi { out, size } => {
            let files = taxi::generate(&out, size)?;
            println!("wrote {size} trips in {} files to {}", files.len(), out.display());
            Ok(())
        }
        Cmd::Agent(a) => {
            init_logging();
            let mut c = config::Config::load(&a.config)?;
            if let Some(v) = a.socket {
                c.socket = v;
            }
            if let Some(v) = a.warehouse {
                c.warehouse = v;
            }
            if let Some(v) = a.max_parallel {
                c.max_parallel = v.max(1);
            }
            if let Some(v) = a.idle_workers {
                c.idle_workers = v;
            }
            if let Some(v) = a.max_body {
                c.max_body = v;
            }
            if let Some(v) = a.default_timeout_s {
                c.default_timeout_s = v;
            }
            runtime()?.block_on(server::run_daemon(c))?;
            Ok(())
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("starting the runtime")
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("QUIVER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Under systemd the journal adds timestamps; plain lines read best there.
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .without_time()
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

//! quiver's benchmark suite. Each benchmark compares ways of doing one job side by side in one
//! run and prints a table (or, with `--json`, one JSON object per measurement).
//!
//! `cargo run --release -p quiver-bench -- handoff [--rows 1000000,10000000] [--json]`
//! `cargo run --release -p quiver-bench -- pipeline [--trips 10000000] [--json]`
//! `cargo run --release -p quiver-bench -- envs [--wheels DIR] [--json]`
//! `cargo run --release -p quiver-bench -- telemetry [--repeat 5] [--json]` (as root)
//! `cargo run --release -p quiver-bench -- startup [--n 200] [--json]` (as root)
//! `cargo run --release -p quiver-bench -- sharing [--k 1,2,4,8] [--json]` (as root, for peak memory)

mod envs;
mod handoff;
mod pipeline;
mod proc;
mod scan;
mod sharing;
mod startup;
mod table;
mod telemetry;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "quiver-bench", about = "quiver's benchmark suite")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Hand a wide table from one process to another: SIPC, Arrow IPC stream, Arrow IPC file
    /// in /dev/shm, Parquet on disk.
    Handoff(handoff::Args),
    /// The example DAG at 10M trips: quiver with the arena, quiver copying every edge through
    /// an Arrow IPC stream, and one DuckDB in one process.
    Pipeline(pipeline::Args),
    /// The environment store: a new pyarrow + pandas spec on a cold and a warm uv cache, one
    /// more package on a warm cache, a lookup.
    Envs(envs::Args),
    /// What the eBPF telemetry costs: memcpy- and fault-heavy children with it off, watching
    /// them, and watching another cgroup.
    Telemetry(telemetry::Args),
    /// K concurrent DAGs reading one 10M-trip input, the deserialization cache on and off:
    /// throughput, peak memory, bytes decoded.
    Sharing(sharing::Args),
    /// Function start with the full sandbox: cold, cold with pandas, forked from a warm zygote.
    Startup(startup::Args),
    /// The workload process of `telemetry` (started by it, not by hand).
    #[command(hide = true)]
    TelemetryChild(telemetry::ChildArgs),
    /// The receiving process of `handoff` (started by it, not by hand).
    #[command(hide = true)]
    HandoffChild(handoff::ChildArgs),
}

fn main() -> Result<()> {
    match Cli::parse().bench {
        Bench::Handoff(a) => handoff::run(a),
        Bench::Pipeline(a) => pipeline::run(a),
        Bench::Envs(a) => envs::run(a),
        Bench::Startup(a) => startup::run(a),
        Bench::Sharing(a) => sharing::run(a),
        Bench::HandoffChild(a) => handoff::child(a),
        Bench::Telemetry(a) => telemetry::run(a),
        Bench::TelemetryChild(a) => telemetry::child(a),
    }
}

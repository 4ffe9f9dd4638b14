//! `quiver run --duckdb-only`: a project's DAG as one DuckDB database in this process, with no
//! agent, workers or arena. It is the floor the pipeline benchmark measures quiver against:
//! each node computed once (a node read by several children becomes a temporary table, one
//! read by a single child a view DuckDB inlines), materialized models written as Parquet.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::duck::Db;
use crate::plan::{Plan, Task};

/// Runs the plan; returns a summary (wall time, rows per node) as JSON.
pub fn run(plan: &serde_json::Value, out: &Path) -> Result<serde_json::Value> {
    let plan = Plan::from_json(plan.to_string().as_bytes())?.validate()?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let db = Db::open()?;
    let conn = db.connection()?;
    let t0 = Instant::now();
    let mut nodes = Vec::new();
    for n in &plan.nodes {
        let t = Instant::now();
        let shared = n.children.len() > 1;
        let what = if shared { "TEMP TABLE" } else { "VIEW" };
        let name = quote(&n.name);
        let sql = match &n.task {
            Task::Scan { path, columns, filter } => {
                if filter.is_some() {
                    bail!("{}: --duckdb-only does not translate scan filters; put the filter in a model", n.name);
                }
                let cols = columns.as_ref().map_or("*".to_owned(), |c| c.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", "));
                let files = if Path::new(path).is_dir() { format!("{path}/*.parquet") } else { path.clone() };
                format!("CREATE {what} {name} AS SELECT {cols} FROM read_parquet('{}')", files.replace('\'', "''"))
            }
            // A leaf is computed in full, as quiver computes every node.
            Task::Sql { sql } if n.children.is_empty() => format!("CREATE TEMP TABLE {name} AS {sql}"),
            Task::Sql { sql } => format!("CREATE {what} {name} AS {sql}"),
            Task::Python(_) => bail!("{}: --duckdb-only runs SQL models only", n.name),
            Task::Materialize { table, .. } => {
                let parent = quote(&plan.nodes[n.parents[0]].name);
                let file = out.join(format!("{table}.parquet"));
                format!("COPY (SELECT * FROM {parent}) TO '{}' (FORMAT parquet)", file.display().to_string().replace('\'', "''"))
            }
        };
        conn.execute_batch(&sql).with_context(|| format!("node {}", n.name))?;
        let rows: Option<u64> = match n.task {
            Task::Materialize { .. } => None,
            _ if shared || n.children.is_empty() => {
                Some(conn.query_row(&format!("SELECT count(*) FROM {name}"), [], |r| r.get(0)).context("counting rows")?)
            }
            _ => None,
        };
        nodes.push(json!({"name": n.name, "wall_ms": t.elapsed().as_secs_f64() * 1e3, "rows": rows}));
    }
    let wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    drop(conn);
    Ok(json!({"variant": "duckdb-single", "wall_ms": wall_ms, "nodes": nodes}))
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

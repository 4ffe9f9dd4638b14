//! End to end: the example project at a small size, run by `quiver run` through an agent,
//! gives the same tables as DuckDB computing the same SQL in one process.

mod common;

use std::path::Path;
use std::process::Command;

use common::{BIN, TestAgent, taxi};

const MODELS: [&str; 5] = ["pickup_counts", "top_pickup_locations", "long_trips", "long_trips_by_zone", "fares_by_country"];

fn copy_project(to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/taxi");
    std::fs::create_dir_all(to).expect("project dir");
    for e in std::fs::read_dir(&from).expect("examples/taxi") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "sql" || x == "toml") {
            std::fs::copy(&p, to.join(p.file_name().expect("name"))).expect("copy");
        }
    }
}

/// `SELECT *` with doubles rounded, so parallel sums that differ in the last bit compare equal.
fn rounded(conn: &duckdb::Connection, relation: &str) -> String {
    let mut stmt = conn.prepare(&format!("DESCRIBE SELECT * FROM {relation}")).expect("describe");
    let cols: Vec<(String, String)> = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .expect("columns")
        .map(|c| c.expect("column"))
        .collect();
    let list: Vec<String> = cols
        .iter()
        .map(|(n, t)| if t == "DOUBLE" || t == "FLOAT" { format!("round(\"{n}\", 4) AS \"{n}\"") } else { format!("\"{n}\"") })
        .collect();
    format!("SELECT {} FROM {relation}", list.join(", "))
}

#[test]
fn the_taxi_example_matches_duckdb_in_one_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let project = dir.path().join("taxi");
    copy_project(&project);
    let trips = project.join("data/trips");
    taxi(&trips, 300_000);
    let a = TestAgent::start(&[]);
    let out = Command::new(BIN)
        .arg("run")
        .arg(&project)
        .arg("--socket")
        .arg(a.socket())
        .output()
        .expect("quiver run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "quiver run failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("succeeded"), "{stdout}");

    // The same SQL in one DuckDB process.
    let conn = duckdb::Connection::open_in_memory().expect("duckdb");
    conn.execute_batch(&format!("CREATE VIEW trips AS SELECT * FROM read_parquet('{}/*.parquet')", trips.display()))
        .expect("trips view");
    for m in MODELS {
        let sql = std::fs::read_to_string(project.join(format!("{m}.sql"))).expect("model");
        conn.execute_batch(&format!("CREATE VIEW {m} AS {sql}")).expect("model view");
    }
    for t in ["top_pickup_locations", "fares_by_country"] {
        let published = format!("read_parquet('{}/{t}/*.parquet')", a.warehouse().display());
        let (ours, theirs) = (rounded(&conn, &published), rounded(&conn, t));
        let q = format!("SELECT (SELECT count(*) FROM ({ours} EXCEPT ALL {theirs})) + (SELECT count(*) FROM ({theirs} EXCEPT ALL {ours})), (SELECT count(*) FROM {t})");
        let (diff, rows): (i64, i64) = conn.query_row(&q, [], |r| Ok((r.get(0)?, r.get(1)?))).expect("compare");
        assert!(rows > 0, "{t} is empty");
        assert_eq!(diff, 0, "{t}: {diff} rows differ from DuckDB's own result");
    }
    // `quiver query` reads the published tables.
    let q = Command::new(BIN)
        .args(["query", "SELECT count(*) AS n, min(trips) > 0 AS positive FROM top_pickup_locations", "--format", "csv", "--warehouse"])
        .arg(a.warehouse())
        .arg("--socket")
        .arg(a.socket())
        .output()
        .expect("quiver query");
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    assert_eq!(String::from_utf8_lossy(&q.stdout), "n,positive\n200,true\n");
    // The run's per-node row counts match too.
    let (_, runs) = a.json("GET", "/v1/runs", None);
    let id = runs["runs"][0]["id"].as_str().expect("run").to_owned();
    let (_, st) = a.json("GET", &format!("/v1/runs/{id}"), None);
    for n in st["nodes"].as_array().expect("nodes") {
        let name = n["name"].as_str().expect("name");
        if MODELS.contains(&name) {
            let want: i64 = conn.query_row(&format!("SELECT count(*) FROM {name}"), [], |r| r.get(0)).expect("count");
            assert_eq!(n["rows"], want, "{name}");
        }
        if n["kind"] == "scan" {
            assert_eq!(n["bytes_copied"], 0, "the scan hands its table on without a copy: {n}");
        }
    }
}

#[test]
fn bad_sql_fails_its_run_with_the_user_error_and_a_self_join_is_still_right() {
    let dir = tempfile::tempdir().expect("tempdir");
    let trips = dir.path().join("trips");
    taxi(&trips, 50_000);
    let a = TestAgent::start(&[]);
    let bad = serde_json::json!({"nodes": [
        {"name": "trips", "kind": "scan", "path": trips.display().to_string()},
        {"name": "q", "kind": "sql", "parents": ["trips"], "sql": "SELEC nonsense FROM trips"}
    ]});
    let v = a.run(&bad);
    assert_eq!(v["status"], "failed");
    assert_eq!(v["nodes"][1]["error_kind"], "user", "{v}");
    assert!(v["nodes"][1]["error"].as_str().unwrap_or("").contains("SQL"), "{v}");
    // A query that scans its input twice: the second scan must not see an empty table.
    let self_join = serde_json::json!({"nodes": [
        {"name": "trips", "kind": "scan", "path": trips.display().to_string(), "columns": ["trip_id", "country"]},
        {"name": "q", "kind": "sql", "parents": ["trips"],
         "sql": "SELECT a.trip_id FROM trips a JOIN trips b ON a.trip_id = b.trip_id"},
        {"name": "u", "kind": "sql", "parents": ["trips"],
         "sql": "SELECT trip_id FROM trips UNION ALL SELECT trip_id FROM trips"}
    ]});
    let v = a.run(&self_join);
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["nodes"][1]["rows"], 50_000, "the self-join sees both sides whole: {v}");
    assert_eq!(v["nodes"][2]["rows"], 100_000, "both scans see every row: {v}");
}

/// `quiver run` with no agent listening starts one in its own process; the same project with
/// copying edges and as one DuckDB give the same row counts, and only the copying run copies.
#[test]
fn run_without_an_agent_with_copying_edges_and_in_one_duckdb_agree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let project = dir.path().join("taxi");
    copy_project(&project);
    taxi(&project.join("data/trips"), 200_000);
    let run = |extra: &[&str]| -> serde_json::Value {
        let out = Command::new(BIN)
            .arg("run")
            .arg(&project)
            .args(["--json", "--socket"])
            .arg(dir.path().join("nobody-listens.sock"))
            .args(extra)
            .output()
            .expect("quiver run");
        assert!(out.status.success(), "quiver run {extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status JSON")
    };
    let rows = |v: &serde_json::Value, name: &str| {
        v["nodes"].as_array().expect("nodes").iter().find(|n| n["name"] == name).map(|n| n["rows"].clone()).expect("node")
    };
    let arena = run(&[]);
    assert_eq!(arena["status"], "succeeded", "{arena}");
    let copy = run(&["--edges", "ipc"]);
    assert_eq!(copy["status"], "succeeded", "{copy}");
    let single = run(&["--duckdb-only"]);
    for n in arena["nodes"].as_array().expect("nodes") {
        assert_eq!(n["bytes_copied"], 0, "{n}");
    }
    let copied: u64 = copy["nodes"].as_array().expect("nodes").iter().map(|n| n["bytes_copied"].as_u64().unwrap_or(0)).sum();
    assert!(copied > 2 * 200_000 * 8, "every edge copied through IPC: {copy}");
    for leaf in ["top_pickup_locations", "long_trips_by_zone", "trips"] {
        assert_eq!(rows(&arena, leaf), rows(&copy, leaf), "{leaf}");
        assert_eq!(rows(&arena, leaf), rows(&single, leaf), "{leaf}");
    }
}

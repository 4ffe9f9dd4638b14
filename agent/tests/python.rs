//! Python models through the agent, as root: the taxi example's SQL and Python models in one
//! DAG give the same tables as the same logic run directly, and hand their tables on without a
//! copy; an expectation that returns False fails the run before anything is published. The
//! environment is built by the store, offline, from the wheel folder scripts/setup fills.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{BIN, TestAgent, python_agent as agent, python_ready as ready, taxi};

fn project(to: &Path, with_python: bool) -> PathBuf {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/taxi");
    let project = to.join("taxi");
    std::fs::create_dir_all(&project).expect("project");
    for e in std::fs::read_dir(&from).expect("examples/taxi") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "sql" || x == "toml" || (with_python && x == "py")) {
            std::fs::copy(&p, project.join(p.file_name().expect("name"))).expect("copy");
        }
    }
    // Functions run as an unprivileged user: the project must be readable by it.
    for d in [to, project.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    project
}

fn quiver_run(project: &Path, a: &TestAgent) -> serde_json::Value {
    let out = Command::new(BIN).arg("run").arg(project).args(["--json", "--socket"]).arg(a.socket()).output().expect("quiver run");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn node<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["nodes"].as_array().expect("nodes").iter().find(|n| n["name"] == name).unwrap_or_else(|| panic!("no node {name}: {v}"))
}

#[test]
fn sql_and_python_models_in_one_dag_match_the_same_logic_run_directly() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let project = project(dir.path(), true);
    let trips = project.join("data/trips");
    taxi(&trips, 300_000);
    for e in walk(&project.join("data")) {
        let mode = if e.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&e, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let a = agent(dir.path());
    let st = quiver_run(&project, &a);
    assert_eq!(st["status"], "succeeded", "{st}");
    for name in ["fare_per_mile", "priciest_zones"] {
        let n = node(&st, name);
        assert_eq!(n["kind"], "python", "{n}");
        assert!(["cold", "zygote", "preforked"].contains(&n["start"].as_str().unwrap_or("")), "{n}");
        // The kernel counted the call's process in its cgroup: pandas and pyarrow at work fault
        // pages and map memory.
        let k = &n["kernel"];
        assert!(k["page_faults"].as_u64().unwrap_or(0) > 0 && k["mmaps"].as_u64().is_some(), "{name}: {k}");
    }
    // pyarrow's new column (and the columns passed through) leave by reference.
    let fpm = node(&st, "fare_per_mile");
    assert_eq!(fpm["bytes_copied"], 0, "fare_per_mile hands its table on without a copy: {fpm}");
    assert!(fpm["bytes_referenced"].as_u64().unwrap_or(0) > 14_000 * 8, "{fpm}");
    // The 20-row aggregate's buffers are below the arena's 64 KiB threshold: glibc serves them,
    // and the few hundred bytes are copied and counted.
    let pz = node(&st, "priciest_zones");
    assert!(pz["bytes_copied"].as_u64().unwrap_or(u64::MAX) < 64 << 10, "{pz}");
    assert_eq!(node(&st, "fares_are_positive")["state"], "succeeded");

    let conn = duckdb::Connection::open_in_memory().expect("duckdb");
    conn.execute_batch(&format!("CREATE VIEW trips AS SELECT * FROM read_parquet('{}/*.parquet')", trips.display())).expect("trips");
    let long = std::fs::read_to_string(project.join("long_trips.sql")).expect("long_trips.sql");
    conn.execute_batch(&format!("CREATE VIEW long_trips AS {long}")).expect("long_trips");
    let want = "SELECT pickup_location_id, count(trip_id) AS trips, round(avg(fare_amount / trip_distance), 6) AS fpm \
                FROM long_trips GROUP BY 1 ORDER BY fpm DESC, pickup_location_id LIMIT 20";
    let ours = format!(
        "SELECT pickup_location_id, trips, round(fare_per_mile, 6) AS fpm FROM read_parquet('{}/priciest_zones/*.parquet')",
        a.warehouse().display()
    );
    let q = format!("SELECT (SELECT count(*) FROM ({ours} EXCEPT ALL ({want}))), (SELECT count(*) FROM ({ours}))");
    let (diff, rows): (i64, i64) = conn.query_row(&q, [], |r| Ok((r.get(0)?, r.get(1)?))).expect("compare");
    assert_eq!(rows, 20);
    assert_eq!(diff, 0, "priciest_zones differs from DuckDB computing the same");
    let fpm_rows: i64 = conn.query_row("SELECT count(*) FROM long_trips", [], |r| r.get(0)).expect("count");
    assert_eq!(node(&st, "fare_per_mile")["rows"], fpm_rows);

    // A second run forks its calls from the warm zygote as soon as it is submitted: by the time
    // priciest_zones's parents (trips, long_trips, fare_per_mile) are done, its call waits in
    // its sandbox for the request.
    let st2 = quiver_run(&project, &a);
    assert_eq!(st2["status"], "succeeded", "{st2}");
    assert_eq!(node(&st2, "priciest_zones")["start"], "preforked", "{st2}");

    // An expectation that returns False fails the run before anything is published.
    std::fs::write(
        project.join("never.py"),
        "import quiver\n\n@quiver.expectation()\n@quiver.python(\"3.11\", pip={\"pandas\": \"\"})\ndef never(data=quiver.Model(\"fare_per_mile\")):\n    return False\n",
    )
    .expect("never.py");
    std::fs::set_permissions(project.join("never.py"), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let wh = a.warehouse().join("priciest_zones");
    let before = std::fs::read_link(&wh).ok();
    let st3 = quiver_run(&project, &a);
    assert_eq!(st3["status"], "failed", "{st3}");
    let never = node(&st3, "never");
    assert!(never["error"].as_str().unwrap_or("").contains("returned False"), "{never}");
    assert_eq!(std::fs::read_link(&wh).ok(), before, "nothing was published");

    // A run that fails before its Python nodes run stops the calls it forked ahead: no cgroup
    // (and so no process) of theirs is left.
    std::fs::remove_file(project.join("never.py")).expect("rm never.py");
    std::fs::write(project.join("long_trips.sql"), "SELECT no_such_column FROM trips").expect("bad sql");
    let st4 = quiver_run(&project, &a);
    assert_eq!(st4["status"], "failed", "{st4}");
    assert_eq!(node(&st4, "fare_per_mile")["state"], "skipped", "{st4}");
    let prefix = format!("py-{}-{}-", a.pid(), st4["id"].as_str().expect("id"));
    let t0 = std::time::Instant::now();
    while !cgroups_named(&prefix).is_empty() && t0.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(cgroups_named(&prefix), Vec::<PathBuf>::new(), "the calls forked ahead are gone");
}

/// Cgroup folders (any hierarchy) whose name starts with `prefix`.
fn cgroups_named(prefix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![PathBuf::from("/sys/fs/cgroup")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if e.file_name().to_string_lossy().starts_with(prefix) {
                out.push(p);
            } else if p.components().count() < 7 {
                dirs.push(p);
            }
        }
    }
    out
}

fn walk(p: &Path) -> Vec<PathBuf> {
    let mut out = vec![p.to_owned()];
    if p.is_dir() {
        for e in std::fs::read_dir(p).expect("read_dir").flatten() {
            out.extend(walk(&e.path()));
        }
    }
    out
}

//! Kernel-measured figures in runs and /metrics: as root every node carries the page faults,
//! copies and mmaps the kernel counted for its process, and a zero-copy edge shows no
//! table-sized copy where a copying edge does; without privileges the agent still runs a DAG
//! and says telemetry is unavailable.

mod common;

use std::sync::OnceLock;

use common::{TestAgent, in_ci, taxi};
use serde_json::{Value, json};

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Trips shared by the tests in this file, readable by an unprivileged agent.
fn trips() -> String {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let d = DIR.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        taxi(&d.path().join("trips"), 400_000);
        d
    });
    d.path().join("trips").display().to_string()
}

/// scan -> sql -> sql: the first edge carries 8 MB at 400k rows.
fn plan(edges: &str) -> Value {
    json!({"edges": edges, "nodes": [
        {"name": "t", "kind": "scan", "path": trips(), "columns": ["trip_id", "fare_amount", "pickup_location_id"]},
        {"name": "f", "kind": "sql", "parents": ["t"], "sql": "SELECT pickup_location_id, fare_amount FROM t WHERE fare_amount > 0"},
        {"name": "z", "kind": "sql", "parents": ["f"], "sql": "SELECT pickup_location_id, count(*) AS n, sum(fare_amount) AS s FROM f GROUP BY 1"}
    ]})
}

fn node<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["nodes"].as_array().expect("nodes").iter().find(|n| n["name"] == name).unwrap_or_else(|| panic!("no node {name}: {v}"))
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// Root is needed to load BPF programs; CI must have it.
fn root_or_skip(test: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(!in_ci(), "{test}: needs root to load BPF programs (CI=true: failing instead of skipping)");
    eprintln!("SKIP {test}: needs root to load BPF programs");
    false
}

/// An agent with the copy meter on (it is off by default: a trap per copy call).
fn metered_agent() -> (tempfile::TempDir, TestAgent) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("agent.toml");
    // The cache off: every run's scan decodes its Parquet, so two runs' copies differ only by
    // their edges (with the cache on, a later run's scan takes the chunks and copies nothing).
    std::fs::write(&cfg, "[telemetry]\ncopy_meter = true\n[cache]\nenabled = false\n").expect("config");
    let a = TestAgent::start(&["--config", cfg.to_str().expect("utf8")]);
    (dir, a)
}

#[test]
fn every_node_carries_what_the_kernel_counted_for_its_process() {
    if !root_or_skip("every_node_carries_what_the_kernel_counted_for_its_process") {
        return;
    }
    let (_cfg, a) = metered_agent();
    let v = a.run(&plan("arena"));
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["telemetry"]["available"], true, "{v}");
    assert_eq!(v["telemetry"]["copy_meter"], true, "{v}");
    for n in ["t", "f", "z"] {
        let k = &node(&v, n)["kernel"];
        // Every process maps its libraries and touches its stack and heap.
        assert!(k["page_faults"].as_u64().unwrap_or(0) > 100, "{n}: {k}");
        assert!(k["mmaps"].as_u64().unwrap_or(0) > 0, "{n}: {k}");
        assert!(k["mmap_bytes"].as_u64().unwrap_or(0) > 0, "{n}: {k}");
        assert!(k["memcpy_calls"].as_u64().unwrap_or(0) > 0, "{n}: {k}");
        assert!(k["memcpy_bytes"].as_u64().is_some(), "{n}: {k}");
    }
    // The scan decodes into fresh arena pages: at least one fault per page of its output.
    let t = node(&v, "t");
    let pages = t["bytes_referenced"].as_u64().expect("bytes") / 4096;
    assert!(t["kernel"]["page_faults"].as_u64().unwrap_or(0) >= pages, "{t}");

    // /metrics sums what the runs' nodes were charged.
    let (_, m) = a.call("GET", "/metrics", None);
    let sum = |f: &str| ["t", "f", "z"].iter().map(|n| node(&v, n)["kernel"][f].as_u64().unwrap_or(0)).sum::<u64>();
    assert_eq!(metric(&m, "quiver_page_faults_total"), sum("page_faults"), "{m}");
    assert_eq!(metric(&m, "quiver_memcpy_bytes_total"), sum("memcpy_bytes"), "{m}");
    assert_eq!(metric(&m, "quiver_mmaps_total"), sum("mmaps"), "{m}");
    assert!(m.contains("quiver_telemetry_available{copy_meter=\"true\"} 1"), "{m}");
}

#[test]
fn the_kernel_and_our_books_agree_on_what_an_edge_copied() {
    if !root_or_skip("the_kernel_and_our_books_agree_on_what_an_edge_copied") {
        return;
    }
    let (_cfg, a) = metered_agent();
    let arena = a.run(&plan("arena"));
    let ipc = a.run(&plan("ipc"));
    for v in [&arena, &ipc] {
        assert_eq!(v["status"], "succeeded", "{v}");
    }
    let figure = |v: &Value, n: &str, f: &str| node(v, n)["kernel"][f].as_u64().unwrap_or_else(|| panic!("{n}.{f}: {v}"));
    let books = |v: &Value| ["t", "f", "z"].iter().map(|n| node(v, n)["bytes_copied"].as_u64().unwrap_or(0)).sum::<u64>();
    // By reference: nothing copied in our books, and the consumers, which map their 8 MB and
    // 4.8 MB inputs, make no table-sized memcpy (1 MiB or more) in the kernel's. (The scan
    // makes a few while decoding Parquet, whatever the edges.)
    assert_eq!(books(&arena), 0, "{arena}");
    for n in ["f", "z"] {
        assert_eq!(figure(&arena, n, "memcpy_large_calls"), 0, "{n}: {arena}");
    }
    // Through IPC streams the same tables are copied, and the kernel sees at least those bytes
    // more go through memcpy than with the arena.
    let copied = books(&ipc);
    assert!(copied > 8 << 20, "{ipc}");
    let extra: i64 = ["t", "f", "z"].iter().map(|n| figure(&ipc, n, "memcpy_bytes") as i64 - figure(&arena, n, "memcpy_bytes") as i64).sum();
    assert!(extra >= (copied * 9 / 10) as i64, "ipc memcpy'd {extra} B more than the arena; our books say {copied} B copied");
    assert!(figure(&ipc, "f", "memcpy_large_calls") > 0, "{ipc}");
}

#[test]
fn without_privileges_the_agent_runs_and_reports_telemetry_unavailable() {
    // As root the agent is started as nobody; otherwise it already runs unprivileged.
    let a = TestAgent::start_as(&[], &[], is_root().then_some(65534));
    let v = a.run(&plan("arena"));
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["telemetry"]["available"], false, "{v}");
    let reason = v["telemetry"]["reason"].as_str().unwrap_or("");
    assert!(reason.contains("telemetry unavailable") && reason.contains("root"), "{reason}");
    for n in ["t", "f", "z"] {
        assert!(node(&v, n)["kernel"].is_null(), "{v}");
        assert!(node(&v, n)["rows"].as_u64().unwrap_or(0) > 0, "{v}");
    }
    let (_, m) = a.call("GET", "/metrics", None);
    assert!(m.contains("quiver_telemetry_available{copy_meter=\"false\"} 0"), "{m}");
    assert_eq!(metric(&m, "quiver_page_faults_total"), 0);
}

#[test]
fn by_default_faults_and_mmaps_are_counted_without_the_copy_meter() {
    if !root_or_skip("by_default_faults_and_mmaps_are_counted_without_the_copy_meter") {
        return;
    }
    let a = TestAgent::start(&[]);
    let v = a.run(&plan("arena"));
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["telemetry"], json!({"available": true, "copy_meter": false}), "{v}");
    let k = &node(&v, "f")["kernel"];
    assert!(k["page_faults"].as_u64().unwrap_or(0) > 100 && k["mmaps"].as_u64().unwrap_or(0) > 0, "{k}");
    assert!(k["memcpy_bytes"].is_null() && k["memcpy_calls"].is_null(), "{k}");
}

#[test]
fn telemetry_can_be_turned_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, "[telemetry]\nenabled = false\n").expect("config");
    let a = TestAgent::start(&["--config", cfg.to_str().expect("utf8")]);
    let v = a.run(&plan("arena"));
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["telemetry"]["available"], false, "{v}");
    assert!(v["telemetry"]["reason"].as_str().unwrap_or("").contains("enabled = false"), "{v}");
    assert!(node(&v, "t")["kernel"].is_null(), "{v}");
}

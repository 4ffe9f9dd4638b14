//! The deserialization cache and the memory manager: scans share decoded chunks, decode only
//! what is missing, never serve a changed file's chunks, share pages across processes; a small
//! budget queues runs without failing them; a drop returns the agent to its baseline.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{BIN, TestAgent, taxi};
use serde_json::{Value, json};

/// An agent started with a configuration file holding `toml`.
fn agent_with(toml: &str, extra: &[&str], env: &[(&str, &str)]) -> (TestAgent, tempfile::TempDir) {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = d.path().join("agent.toml");
    std::fs::write(&cfg, toml).expect("config");
    let mut args = vec!["--config", cfg.to_str().expect("utf-8")];
    args.extend_from_slice(extra);
    (TestAgent::start_with_env(&args, env), d)
}

/// A scan of `columns` (with an optional filter), an aggregate over all of them, materialized
/// as `table`.
fn plan(path: &Path, columns: &[&str], filter: Option<&str>, table: &str) -> Value {
    let sums: Vec<String> = columns
        .iter()
        .map(|c| match *c {
            "country" | "payment_type" => format!("count(DISTINCT {c}) AS {c}"),
            "pickup_at" | "dropoff_at" => format!("max({c}) AS {c}"),
            // Exact sums of floats in cents: a parallel float sum depends on its order.
            "fare_amount" | "tip_amount" | "trip_distance" => format!("sum(round({c} * 100)::BIGINT) AS {c}"),
            _ => format!("sum({c}) AS {c}"),
        })
        .collect();
    let mut scan = json!({"name": "t", "kind": "scan", "path": path, "columns": columns});
    if let Some(f) = filter {
        scan["filter"] = json!(f);
    }
    json!({"nodes": [
        scan,
        {"name": "s", "kind": "sql", "parents": ["t"], "sql": format!("SELECT count(*) AS n, {} FROM t", sums.join(", "))},
        {"name": "m", "kind": "materialize", "parents": ["s"], "table": table}
    ]})
}

/// The one row of a materialized aggregate, as text per column.
fn result(warehouse: &Path, table: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(warehouse.join(table)).expect("table folder") {
        let f = std::fs::File::open(e.expect("entry").path()).expect("open");
        let r = parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(f, 1024).expect("parquet");
        for b in r {
            let b = b.expect("batch");
            for (i, field) in b.schema().fields().iter().enumerate() {
                let v = arrow_cast::display::array_value_to_string(b.column(i), 0).expect("value");
                out.insert(field.name().clone(), v);
            }
        }
    }
    out
}

fn scan_stats(v: &Value) -> (u64, u64, u64) {
    let c = &v["nodes"][0]["cache"];
    (c["chunks_hit"].as_u64().unwrap_or(u64::MAX), c["chunks_decoded"].as_u64().unwrap_or(u64::MAX), c["bytes_decoded"].as_u64().unwrap_or(u64::MAX))
}

/// Row groups of the generated trips (128Ki rows each, 1Mi rows per file).
fn row_groups(rows: u64) -> u64 {
    let per_file = 1u64 << 20;
    let full = rows / per_file;
    let rest = rows % per_file;
    full * 8 + rest.div_ceil(128 * 1024)
}

fn metric(a: &TestAgent, name: &str) -> u64 {
    let (_, m) = a.call("GET", "/metrics", None);
    m.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name}"))
}

#[test]
fn a_second_scan_decodes_nothing_and_overlapping_projections_decode_only_the_missing_columns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let trips = dir.path().join("trips");
    taxi(&trips, 600_000);
    let rg = row_groups(600_000);
    let (on, _c1) = agent_with("", &[], &[]);
    let (off, _c2) = agent_with("[cache]\nenabled = false\n", &[], &[]);

    let cols1 = ["trip_id", "fare_amount", "country"];
    let v = on.run(&plan(&trips, &cols1, None, "a1"));
    assert_eq!(v["status"], "succeeded", "{v}");
    let (hit, decoded, bytes) = scan_stats(&v);
    assert_eq!((hit, decoded), (0, 3 * rg), "{v}");
    assert!(bytes > 600_000 * 16, "{bytes} bytes decoded");
    assert_eq!(v["nodes"][0]["bytes_copied"], 0, "the scan's output references the chunks: {v}");

    // The same scan again: everything from the cache.
    let v = on.run(&plan(&trips, &cols1, None, "a2"));
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(scan_stats(&v), (3 * rg, 0, 0), "{v}");

    // Overlapping projection: only tip_amount is new.
    let cols2 = ["trip_id", "fare_amount", "tip_amount"];
    let v = on.run(&plan(&trips, &cols2, None, "b1"));
    assert_eq!(v["status"], "succeeded", "{v}");
    let (hit, decoded, bytes) = scan_stats(&v);
    assert_eq!((hit, decoded), (2 * rg, rg), "{v}");
    assert!(bytes > 0 && bytes < 600_000 * 16, "only one column decoded: {bytes}");

    // A filter on a cached column: nothing decoded, the filter still applies.
    let f = "country IN ('IT', 'FR') AND fare_amount > 50";
    let v = on.run(&plan(&trips, &cols2, Some(f), "c1"));
    assert_eq!(v["status"], "succeeded", "{v}");
    let (_, decoded, _) = scan_stats(&v);
    assert_eq!(decoded, 0, "country is cached from the first scan: {v}");

    // Results equal the uncached agent's.
    for (cols, filter, t, t_on) in [(&cols1, None, "a", "a2"), (&cols2, None, "b", "b1"), (&cols2, Some(f), "c", "c1")] {
        let v = off.run(&plan(&trips, cols, filter, t));
        assert_eq!(v["status"], "succeeded", "{v}");
        assert!(v["nodes"][0]["cache"].is_null(), "cache off: {v}");
        assert_eq!(result(&on.warehouse(), t_on), result(&off.warehouse(), t), "{t}");
    }
    let (_, st) = on.json("GET", "/v1/cache/stats", None);
    assert_eq!(st["cache"]["chunks"], 4 * rg, "{st}");
    let (_, ls) = on.json("GET", "/v1/cache", None);
    assert_eq!(ls["chunks"].as_array().map(Vec::len), Some(4 * rg as usize));
}

#[test]
fn a_file_rewritten_between_runs_is_decoded_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let trips = dir.path().join("trips");
    taxi(&trips, 300_000);
    let (a, _c) = agent_with("", &[], &[]);
    let cols = ["trip_id", "fare_amount"];
    let v = a.run(&plan(&trips, &cols, None, "x1"));
    assert_eq!(v["status"], "succeeded", "{v}");
    let first = scan_stats(&v);
    assert_eq!(first.0, 0);
    assert_eq!(result(&a.warehouse(), "x1")["n"], "300000");
    // Rewrite the data with fewer rows (new size, mtime and inode).
    std::fs::remove_dir_all(&trips).expect("rm");
    std::thread::sleep(Duration::from_millis(20));
    taxi(&trips, 200_000);
    let v = a.run(&plan(&trips, &cols, None, "x2"));
    assert_eq!(v["status"], "succeeded", "{v}");
    let (hit, decoded, _) = scan_stats(&v);
    assert_eq!(hit, 0, "nothing of the old file is served: {v}");
    assert_eq!(decoded, 2 * row_groups(200_000), "{v}");
    assert_eq!(result(&a.warehouse(), "x2")["n"], "200000");
    let (_, st) = a.json("GET", "/v1/cache/stats", None);
    assert!(st["cache"]["invalidated"].as_u64().unwrap_or(0) > 0, "the old chunks were dropped: {st}");
    // Touching a file in place (same size, new mtime) also counts as a change.
    let file = std::fs::read_dir(&trips).expect("dir").next().expect("a file").expect("entry").path();
    std::thread::sleep(Duration::from_millis(20));
    let bytes = std::fs::read(&file).expect("read");
    std::fs::write(&file, bytes).expect("rewrite in place");
    let v = a.run(&plan(&trips, &cols, None, "x3"));
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(scan_stats(&v).0, 0, "{v}");
}

/// Pss and Rss (bytes) of a process's mappings of cached chunks (`memfd:qcache.*`).
fn chunk_pss_rss(pid: i32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let (mut pss, mut rss, mut inside) = (0, 0, false);
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.first().is_some_and(|x| x.contains('-') && !x.ends_with(':')) {
            inside = f.get(5).is_some_and(|n| n.starts_with("/memfd:qcache"));
            continue;
        }
        if inside {
            let kib = || f.get(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024;
            match f.first() {
                Some(&"Pss:") => pss += kib(),
                Some(&"Rss:") => rss += kib(),
                _ => {}
            }
        }
    }
    (pss, rss)
}

#[test]
fn k_processes_mapping_one_cached_table_have_the_pss_of_one_table() {
    const K: usize = 4;
    let dir = tempfile::tempdir().expect("tempdir");
    let trips = dir.path().join("trips");
    taxi(&trips, 600_000);
    let (a, _c) = agent_with("", &["--max-parallel", "8"], &[("QUIVER_DEBUG_STOP_NODE", "s")]);
    let cols = ["trip_id", "fare_amount", "trip_distance", "pickup_location_id"];
    // Warm the cache with a node that does not stop.
    let mut warm = plan(&trips, &cols, None, "w");
    warm["nodes"][1]["name"] = json!("w");
    warm["nodes"][2]["parents"] = json!(["w"]);
    assert_eq!(a.run(&warm)["status"], "succeeded");
    // K runs whose SQL reads every page of the cached columns, then stops with them mapped.
    let ids: Vec<String> = (0..K)
        .map(|i| {
            let (s, v) = a.json("POST", "/v1/runs", Some(&plan(&trips, &cols, None, &format!("k{i}")).to_string()));
            assert_eq!(s, 201, "{v}");
            v["id"].as_str().expect("id").to_owned()
        })
        .collect();
    let t0 = Instant::now();
    let pids = loop {
        let p: Vec<i32> = a.children().into_iter().filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "quiver:s") && common::debug_stopped(p)
        }).collect();
        if p.len() == K {
            break p;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "{} of {K} sql workers stopped", p.len());
        std::thread::sleep(Duration::from_millis(50));
    };
    let figures: Vec<(u64, u64)> = pids.iter().map(|&p| chunk_pss_rss(p)).collect();
    for &p in &pids {
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(p, libc::SIGCONT) };
    }
    for id in &ids {
        assert_eq!(a.wait(id)["status"], "succeeded");
    }
    let pss: u64 = figures.iter().map(|f| f.0).sum();
    let one = figures.iter().map(|f| f.1).max().unwrap_or(0);
    eprintln!("{K} processes: summed PSS of the cached chunks {pss} bytes; one table (RSS) {one} bytes; {figures:?}");
    assert!(one > 600_000 * 8 * 3, "each process read the table: {one}");
    let ratio = pss as f64 / one as f64;
    assert!((0.9..=1.1).contains(&ratio), "summed PSS is {ratio:.3}x one table, not about 1x");
}

#[test]
fn a_budget_smaller_than_the_working_set_queues_twenty_runs_which_all_succeed() {
    const SETS: usize = 4;
    const ROWS: u64 = 300_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let sets: Vec<PathBuf> = (0..SETS)
        .map(|i| {
            let p = dir.path().join(format!("trips{i}"));
            taxi(&p, ROWS);
            p
        })
        .collect();
    let cols = ["trip_id", "pickup_at", "fare_amount", "trip_distance", "tip_amount", "payment_type", "country"];
    // One set's decoded columns, measured on an agent without a budget to speak of.
    let one_set = {
        let (a, _c) = agent_with("", &[], &[]);
        assert_eq!(a.run(&plan(&sets[0], &cols, None, "probe"))["status"], "succeeded");
        metric(&a, "quiver_cache_bytes")
    };
    // The working set is all four sets cached, plus the runs' intermediates; the budget holds
    // about two sets.
    let budget = 2 * one_set + one_set / 2;
    let (a, _c) = agent_with(&format!("[memory]\nbudget_bytes = {budget}\n"), &["--max-parallel", "8"], &[]);
    let ids: Vec<(usize, String)> = (0..20)
        .map(|i| {
            let (s, v) = a.json("POST", "/v1/runs", Some(&plan(&sets[i % SETS], &cols, None, &format!("r{i}")).to_string()));
            assert_eq!(s, 201, "{v}");
            (i, v["id"].as_str().expect("id").to_owned())
        })
        .collect();
    let expected_sum = (ROWS * (ROWS - 1) / 2).to_string();
    for (i, id) in &ids {
        let v = a.wait(id);
        assert_eq!(v["status"], "succeeded", "run {i}: {}", v["error"]);
        let r = result(&a.warehouse(), &format!("r{i}"));
        assert_eq!(r["n"], ROWS.to_string());
        assert_eq!(r["trip_id"], expected_sum);
    }
    let peak = metric(&a, "quiver_memory_peak_held_bytes");
    let waited = metric(&a, "quiver_memory_waited_total");
    let evicted = metric(&a, "quiver_cache_evicted_total");
    // The stated margin: one scan's table. A launch always starts when nothing else runs, and
    // its output may exceed its estimate.
    let margin = one_set;
    eprintln!("budget {budget}, peak held {peak}, margin {margin}, launches that waited {waited}, chunks evicted {evicted}");
    assert!(peak <= budget + margin, "peak {peak} > budget {budget} + margin {margin}");
    assert!(evicted > 0, "the cache had to give way");
}

#[test]
fn after_a_hundred_runs_and_a_cache_drop_the_agent_is_back_at_its_baseline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let trips = dir.path().join("trips");
    taxi(&trips, 100_000);
    let (a, _c) = agent_with("", &["--max-parallel", "4"], &[]);
    a.settle();
    let fds0 = a.memfd_fds();
    let held0 = metric(&a, "quiver_memory_held_bytes");
    let segs0 = metric(&a, "quiver_memory_segments");
    let variants: [&[&str]; 3] = [&["trip_id", "fare_amount"], &["trip_id", "country"], &["tip_amount", "passenger_count"]];
    for batch in 0..25 {
        let ids: Vec<String> = (0..4)
            .map(|j| {
                let i = batch * 4 + j;
                let mut p = plan(&trips, variants[i % 3], None, &format!("h{i}"));
                // No materialization: the warehouse would grow.
                p["nodes"].as_array_mut().expect("nodes").pop();
                let (s, v) = a.json("POST", "/v1/runs", Some(&p.to_string()));
                assert_eq!(s, 201, "{v}");
                v["id"].as_str().expect("id").to_owned()
            })
            .collect();
        for id in ids {
            assert_eq!(a.wait(&id)["status"], "succeeded");
        }
    }
    assert!(metric(&a, "quiver_cache_chunks") > 0);
    let out = std::process::Command::new(BIN).args(["cache", "drop", "--socket"]).arg(a.socket()).output().expect("quiver cache drop");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("dropped"), "{}", String::from_utf8_lossy(&out.stdout));
    let ls = std::process::Command::new(BIN).args(["cache", "ls", "--socket"]).arg(a.socket()).output().expect("quiver cache ls");
    assert!(ls.status.success());
    assert_eq!(String::from_utf8_lossy(&ls.stdout).lines().count(), 1, "only the header is left");
    a.settle();
    assert_eq!(metric(&a, "quiver_cache_chunks"), 0);
    assert_eq!(metric(&a, "quiver_memory_held_bytes"), held0, "arena bytes back to baseline");
    assert_eq!(metric(&a, "quiver_memory_segments"), segs0, "segments back to baseline");
    assert_eq!(a.memfd_fds(), fds0, "the agent holds no memfd more than at start");
}

/// Whether process `pid` has CAP_SYS_RESOURCE (bit 24), which lowering oom_score_adj needs.
fn can_lower_oom_score(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("CapEff:").map(|v| u64::from_str_radix(v.trim(), 16).unwrap_or(0))))
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

#[test]
fn the_agent_keeps_a_low_oom_score_and_functions_a_high_one() {
    let (a, _c) = agent_with("", &[], &[]);
    a.settle();
    let score = |p: i32| std::fs::read_to_string(format!("/proc/{p}/oom_score_adj")).expect("oom_score_adj").trim().parse::<i32>().expect("int");
    // Raising a score needs no privilege: every function process gets 900.
    let kids = a.all_children();
    assert!(!kids.is_empty(), "waiting workers");
    for k in kids {
        assert_eq!(score(k), 900, "worker {k}");
    }
    let (_, m) = a.call("GET", "/metrics", None);
    assert!(m.contains("quiver_function_pss_bytes{pid="), "{m}");
    assert!(m.contains("quiver_memory_budget_bytes"), "{m}");
    // The agent is never the likelier victim: below every function whatever it may do, and
    // at -900 where it may lower its score (CAP_SYS_RESOURCE; some VMs withhold it even from
    // root, this one does, and there it keeps its inherited score).
    let agent = score(a.pid());
    assert!(agent <= 0, "the agent's score {agent} is not above the default");
    assert!(
        agent == -900 || !can_lower_oom_score(a.pid()),
        "the agent holds CAP_SYS_RESOURCE but left its score at {agent} instead of -900"
    );
}

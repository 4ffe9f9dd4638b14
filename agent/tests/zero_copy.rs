//! Zero copy through a pipeline: scan -> sql -> sql hands every table on by reference (0 bytes
//! copied per node), and the pages a child maps as its input are the very frames of the file its
//! parent sealed and the agent holds, read from the kernel's page tables.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::{Duration, Instant};

use common::{TestAgent, in_ci, taxi};
use serde_json::json;


/// One memfd mapping of a process, from /proc/PID/maps.
struct Map {
    start: u64,
    end: u64,
    offset: u64,
    inode: u64,
    name: String,
}

fn memfd_maps(pid: i32) -> Vec<Map> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    maps.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = f.get(5)?;
            if !name.starts_with("/memfd:") {
                return None;
            }
            let (s, e) = f[0].split_once('-')?;
            Some(Map {
                start: u64::from_str_radix(s, 16).ok()?,
                end: u64::from_str_radix(e, 16).ok()?,
                offset: u64::from_str_radix(f[2], 16).ok()?,
                inode: f[4].parse().ok()?,
                name: name.trim_start_matches("/memfd:").to_owned(),
            })
        })
        .collect()
}

/// The frame behind `addr` in process `pid`, if the page is present.
fn frame(pagemap: &File, addr: u64) -> Option<u64> {
    let mut e = [0u8; 8];
    pagemap.read_exact_at(&mut e, addr / 4096 * 8).ok()?;
    let e = u64::from_le_bytes(e);
    (e >> 63 == 1).then_some(e & ((1 << 55) - 1)).filter(|&pfn| pfn != 0)
}

/// The worker of node `name` once it has stopped itself (QUIVER_DEBUG_STOP_NODE).
fn stopped_worker(agent: &TestAgent, name: &str) -> i32 {
    let t0 = Instant::now();
    loop {
        for p in agent.children() {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            if stat.contains(&format!("(quiver:{name})")) && common::debug_stopped(p) {
                return p;
            }
        }
        let (_, v) = agent.json("GET", "/v1/runs", None);
        assert!(v["runs"][0]["status"] == "running" && t0.elapsed() < Duration::from_secs(60), "worker of {name} never stopped: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Compares the frame behind every present page of the stopped worker `w`'s memfd mappings
/// with the frame behind the same page of the file the agent holds; resumes the worker and
/// returns how many pages were compared per memfd name (the producing arena's name).
fn compare_input_frames(a: &TestAgent, w: i32) -> std::collections::HashMap<String, usize> {
    let pagemap = File::open(format!("/proc/{w}/pagemap")).expect("pagemap");
    let mut held = std::collections::HashMap::new();
    for e in std::fs::read_dir(format!("/proc/{}/fd", a.pid())).expect("fds").flatten() {
        if std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("/memfd:"))
            && let Ok(f) = File::open(e.path())
        {
            held.insert(f.metadata().expect("stat").ino(), f);
        }
    }
    let mut compared = std::collections::HashMap::<String, usize>::new();
    for m in memfd_maps(w) {
        let Some(file) = held.get(&m.inode) else { continue };
        let size = file.metadata().expect("stat").len() as usize;
        // SAFETY: a fresh read-only shared mapping of a sealed file; unmapped below.
        let base = unsafe { libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        assert_ne!(base, libc::MAP_FAILED);
        for addr in (m.start..m.end).step_by(4096) {
            let Some(theirs) = frame(&pagemap, addr) else { continue };
            let at = (m.offset + addr - m.start) as usize;
            // SAFETY: at < size: the worker's mapping lies within the file.
            let ours = quiver_shm::pagemap::frames(unsafe { (base as *const u8).add(at) }, 1).expect("our frames");
            assert_eq!(ours, vec![theirs], "page {at:#x} of {} differs", m.name);
            *compared.entry(m.name.split('.').next().unwrap_or("").to_owned()).or_default() += 1;
        }
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(base, size) };
    }
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(w, libc::SIGCONT) };
    compared
}

#[test]
fn scan_sql_sql_copies_nothing_and_children_map_their_parents_frames() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(!in_ci(), "frame numbers in /proc/PID/pagemap need root, and CI runs as root");
        eprintln!("skipped: reading another process's frame numbers needs root");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    taxi(&dir.path().join("trips"), 300_000);
    let a = TestAgent::start_with_env(&[], &[("QUIVER_DEBUG_STOP_NODE", "mid,last")]);
    let plan = json!({"nodes": [
        {"name": "t", "kind": "scan", "path": dir.path().join("trips"), "pin": true,
         "columns": ["trip_id", "pickup_location_id", "trip_distance", "fare_amount", "country"]},
        {"name": "mid", "kind": "sql", "parents": ["t"], "pin": true,
         "sql": "SELECT trip_id, pickup_location_id, fare_amount * 2 AS f2, country FROM t WHERE trip_distance > 1"},
        {"name": "last", "kind": "sql", "parents": ["mid"],
         "sql": "SELECT pickup_location_id, country, sum(f2) AS f, count(*) AS n FROM mid GROUP BY ALL"}
    ]});
    let (s, v) = a.json("POST", "/v1/runs", Some(&plan.to_string()));
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().expect("id").to_owned();

    // Each stops once it has read its input and handed its output over, its input still mapped.
    // (Pinned, so the agent still holds the files once their consumers are done.)
    let scan_pages = compare_input_frames(&a, stopped_worker(&a, "mid"));
    // The scan's output lies in its own arena ("scan") or, with the deserialization cache, in the
    // cached chunks' segments ("qcache") it references.
    let from_scan = ["scan", "qcache"].iter().map(|k| scan_pages.get(*k).copied().unwrap_or(0)).sum::<usize>();
    assert!(from_scan > 10, "mid's input (the scan's output): {scan_pages:?}");
    let sql_pages = compare_input_frames(&a, stopped_worker(&a, "last"));
    eprintln!("pages with equal frames: mid {scan_pages:?}, last {sql_pages:?}");
    assert!(sql_pages.get("sql").copied().unwrap_or(0) > 0, "last's input (mid's output): {sql_pages:?}");

    let v = a.wait(&id);
    assert_eq!(v["status"], "succeeded", "{v}");
    for n in v["nodes"].as_array().expect("nodes") {
        assert_eq!(n["bytes_copied"], 0, "{} copied bytes: {v}", n["name"]);
        assert!(n["bytes_referenced"].as_u64().unwrap_or(0) > 0, "{v}");
        assert!(n["overhead_ms"].as_f64().is_some_and(|o| o >= 0.0) && n["queued_ms"].as_f64().is_some(), "{v}");
    }
}

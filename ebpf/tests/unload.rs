//! Nothing of ours stays in the kernel: not after a Telemetry is dropped, nor after the process
//! that loaded it exits without dropping it. Checked with bpftool, by the ids the kernel gave.

mod common;

use std::collections::HashSet;
use std::process::Command;

use common::{TestCgroup, bpftool, in_ci, telemetry};

/// The ids `bpftool -j {prog|map} show` lists.
fn listed(kind: &str) -> Option<HashSet<u32>> {
    let Some(tool) = bpftool() else {
        assert!(!in_ci(), "bpftool is missing (scripts/setup installs it)");
        eprintln!("SKIP: bpftool is not installed");
        return None;
    };
    let out = Command::new(tool)
        .args(["-j", kind, "show"])
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool {kind} show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    let ids = v
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|p| p["id"].as_u64());
    Some(ids.map(|id| id as u32).collect())
}

/// Of these program and map ids, those still listed after a grace period: the kernel may finish
/// tearing down after the last file descriptor closes.
fn still_loaded(prog_ids: &[u32], map_ids: &[u32]) -> Vec<u32> {
    let mut left: Vec<u32> = prog_ids.iter().chain(map_ids).copied().collect();
    for _ in 0..50 {
        let (progs, maps) = (
            listed("prog").unwrap_or_default(),
            listed("map").unwrap_or_default(),
        );
        left.retain(|id| progs.contains(id) || maps.contains(id));
        if left.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    left
}

#[test]
fn dropping_telemetry_unloads_everything() {
    let Some(t) = telemetry("dropping_telemetry_unloads_everything") else {
        return;
    };
    let cg = TestCgroup::new();
    let watch = t.watch(&cg.path, true).expect("watch with denial");
    let ids = t.kernel_ids();
    assert_eq!(ids.programs.len(), 7, "{ids:?}");
    assert_eq!(ids.maps.len(), 2, "{ids:?}");
    let (Some(progs), Some(maps)) = (listed("prog"), listed("map")) else {
        return;
    };
    assert!(
        ids.programs.iter().all(|id| progs.contains(id)),
        "loaded programs are listed"
    );
    assert!(
        ids.maps.iter().all(|id| maps.contains(id)),
        "loaded maps are listed"
    );

    drop(t);
    let left = still_loaded(&ids.programs, &ids.maps);
    assert!(left.is_empty(), "ids {left:?} still loaded after drop");
    // A watch outliving its telemetry says so instead of reading freed maps.
    let e = watch.take().expect_err("stopped");
    assert!(e.to_string().contains("stopped"), "{e}");
}

/// Run as a child by `exiting_process_unloads_everything`: loads, prints the ids, exits
/// without dropping anything.
#[test]
fn child_loads_and_exits() {
    if std::env::var_os("QUIVER_EBPF_UNLOAD_CHILD").is_none() {
        return;
    }
    let t = quiver_ebpf::Telemetry::start().expect("start in the child");
    let ids = t.kernel_ids();
    let join = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    println!("IDS {} {}", join(&ids.programs), join(&ids.maps));
    std::mem::forget(t);
    std::process::exit(0);
}

#[test]
fn exiting_process_unloads_everything() {
    let Some(t) = telemetry("exiting_process_unloads_everything") else {
        return;
    };
    drop(t);
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new(exe)
        .args([
            "--exact",
            "child_loads_and_exits",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("QUIVER_EBPF_UNLOAD_CHILD", "1")
        .output()
        .expect("run child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| Some(l.split_once("IDS ")?.1))
        .expect("child printed its ids");
    let parse = |s: &str| -> Vec<u32> { s.split(',').map(|x| x.parse().expect("id")).collect() };
    let mut parts = line.split(' ');
    let (prog_ids, map_ids) = (parse(parts.next().unwrap()), parse(parts.next().unwrap()));
    assert_eq!(prog_ids.len(), 7);
    if bpftool().is_none() {
        listed("prog");
        return;
    }
    let left = still_loaded(&prog_ids, &map_ids);
    assert!(
        left.is_empty(),
        "ids {left:?} still loaded after the loading process exited"
    );
}

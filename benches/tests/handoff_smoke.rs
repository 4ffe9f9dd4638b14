//! The handoff benchmark runs end to end at a tiny size: every method hands over the same data
//! (checksums agree) and SIPC over the arena copies nothing. Speed is not checked here.

use std::process::Command;

#[test]
fn handoff_runs_and_every_method_sees_the_same_table() {
    let out = Command::new(env!("CARGO_BIN_EXE_quiver-bench"))
        .args(["handoff", "--rows", "20000", "--batch-rows", "7000", "--json"])
        .args(["--methods", "sipc,sipc-prefault,sipc-bgfault,sipc-validated,sipc-copy,ipc-stream,ipc-file-shm,parquet"])
        .output()
        .expect("run quiver-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "quiver-bench failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).expect(l)).collect();
    assert_eq!(rows.len(), 9, "baseline + 8 methods: {stdout}");
    for r in &rows {
        for key in ["method", "rows", "bytes", "first_batch_ms", "full_scan_ms", "bytes_copied", "peak_rss_bytes"] {
            assert!(r.get(key).is_some(), "{key} missing in {r}");
        }
        assert_eq!(r["rows"], 20000);
        assert_eq!(r["checksum_ok"], true, "{r}");
        let m = r["method"].as_str().expect("method");
        let copied = r["bytes_copied"].as_u64().expect("bytes_copied");
        if m.starts_with("sipc") && m != "sipc-copy" {
            assert_eq!(copied, 0, "{r}");
        } else if m != "in-process" {
            assert_eq!(copied, r["bytes"].as_u64().expect("bytes"), "{r}");
        }
    }
}

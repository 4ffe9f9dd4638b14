//! The host's cgroup hierarchies, found once per agent: Python functions get limited cgroups
//! under them, native workers a cgroup v2 folder each for their kernel-measured figures.

use std::sync::OnceLock;

use quiver_sandbox::cgroup::CgroupRoot;

/// The `quiver` cgroup folders, or why there are none (not root, no cgroup file system).
pub fn root() -> Result<&'static CgroupRoot, &'static str> {
    static ROOT: OnceLock<Result<CgroupRoot, String>> = OnceLock::new();
    ROOT.get_or_init(|| {
        let r = CgroupRoot::discover("quiver").map_err(|e| e.to_string());
        if let Ok(c) = &r {
            let missing = c.missing();
            if !missing.is_empty() {
                tracing::warn!(?missing, "cgroup controllers missing: those function limits are not enforced");
            }
            remove_stale(c);
        }
        r
    })
    .as_ref()
    .map_err(String::as_str)
}

/// The name of a function cgroup of this agent: `KIND-PID-ID`, so that several agents share a
/// host's `quiver` folders and a restarted one can tell what a dead one left.
pub fn name(kind: &str, id: &str) -> String {
    format!("{kind}-{}-{id}", std::process::id())
}

/// Removes the emptied cgroups of agents that are gone (killed before they could clean up).
/// A folder that still holds a process is left alone: rmdir refuses it.
fn remove_stale(root: &CgroupRoot) {
    let dirs = root.v2.iter().chain(root.v1.iter().map(|(_, d)| d));
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.split('-').nth(1)).and_then(|p| p.parse::<u32>().ok()) else { continue };
            if e.path().is_dir() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
}

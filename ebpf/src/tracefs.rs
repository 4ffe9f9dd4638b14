//! Tracepoints are found through tracefs, which a fresh VM may not have mounted.

use std::path::Path;

use nix::mount::{MsFlags, mount};

use crate::Unavailable;

const TRACEFS: &str = "/sys/kernel/tracing";

/// Mounts tracefs at /sys/kernel/tracing unless it (or the debugfs copy) is there already.
pub(crate) fn ensure_mounted() -> Result<(), Unavailable> {
    let mounted = |p: &str| Path::new(p).join("events").is_dir();
    if mounted(TRACEFS) || mounted("/sys/kernel/debug/tracing") {
        return Ok(());
    }
    mount(
        Some("tracefs"),
        TRACEFS,
        Some("tracefs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| Unavailable::Tracefs {
        path: TRACEFS,
        source,
    })
}

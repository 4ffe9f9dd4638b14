//! quiver's kernel-side telemetry and network denial for function processes.
//!
//! The BPF programs live in `ebpf/bpf/` (C, compiled by `build.rs` with clang) and are loaded
//! with aya. One [`Telemetry`] per agent loads and attaches them once; each function invocation
//! runs in its own cgroup v2 directory, which [`Telemetry::watch`] registers (and optionally
//! cuts off from the network), and [`Watch::take`] reads, clears and detaches. Copies are
//! metered per process ([`Telemetry::meter_copies`]), because a copy probe costs every process
//! it covers a trap per call:
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::path::Path;
//! let telemetry = quiver_ebpf::Telemetry::start()?;
//! let watch = telemetry.watch(Path::new("/sys/fs/cgroup/unified/fn-42"), true)?;
//! let worker_pid = 4242; // a function process, started but not yet working
//! let meter = telemetry.meter_copies(worker_pid)?;
//! // ... move the process into the cgroup, let it work, wait for it ...
//! drop(meter);
//! let counters = watch.take()?;
//! println!("{} page faults, {} bytes memcpy'd", counters.page_faults, counters.memcpy_bytes);
//! # Ok(()) }
//! ```
//!
//! Dropping the [`Telemetry`] detaches and unloads every program and map: nothing is pinned.
//! See `docs/telemetry.md` for what each figure means and what the copy meter cannot see.

mod cgroup;
mod copies;
mod counters;
mod error;
mod maps;
mod perf;
mod telemetry;
mod tracefs;

pub use cgroup::cgroup_id;
pub use copies::{CopyProbe, CopyProbes};
pub use counters::{Counters, HIST_BUCKETS};
pub use error::{Error, Unavailable};
pub use telemetry::{CopyMeter, KernelIds, Telemetry, Watch};

mod object {
    include!(concat!(env!("OUT_DIR"), "/object.rs"));
}

#[cfg(test)]
mod tests {
    /// The agent shares one Telemetry between threads and moves watches and meters around.
    #[test]
    fn handles_are_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<crate::Telemetry>();
        send_sync::<crate::Watch>();
        send_sync::<crate::CopyMeter>();
        send_sync::<crate::Counters>();
    }
}

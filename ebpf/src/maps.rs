//! Rust mirrors of the map layouts in `bpf/quiver.h`.

/// `struct qv_stats`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stats {
    pub page_faults: u64,
    pub memcpy_bytes: u64,
    pub memcpy_calls: u64,
    pub mmaps: u64,
    pub mmap_bytes: u64,
    pub munmaps: u64,
    pub munmap_bytes: u64,
    pub memcpy_hist: [u64; crate::HIST_BUCKETS],
}

impl Stats {
    pub const ZERO: Stats = Stats {
        page_faults: 0,
        memcpy_bytes: 0,
        memcpy_calls: 0,
        mmaps: 0,
        mmap_bytes: 0,
        munmaps: 0,
        munmap_bytes: 0,
        memcpy_hist: [0; crate::HIST_BUCKETS],
    };
}

/// `struct qv_pid_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PidKey {
    pub cgroup_id: u64,
    pub tgid: u32,
    pub pad: u32,
}

// SAFETY: both are repr(C) structs of integers with no padding bytes (the explicit `pad` field
// fills PidKey), so every bit pattern is valid and none of their bytes is uninitialised.
unsafe impl aya::Pod for Stats {}
// SAFETY: see above.
unsafe impl aya::Pod for PidKey {}

/// Map names in the object.
pub(crate) const STATS: &str = "qv_stats";
/// Map names in the object.
pub(crate) const PID_FAULTS: &str = "qv_pid_faults";

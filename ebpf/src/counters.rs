//! What one watched cgroup was charged.

use std::collections::BTreeMap;

use crate::maps::Stats;

/// Buckets of [`Counters::memcpy_hist`].
pub const HIST_BUCKETS: usize = 64;

/// The kernel-measured figures of one watched cgroup, from registration to [`crate::Watch::take`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counters {
    /// User-mode page faults (tracepoint `exceptions/page_fault_user`), minor and major.
    pub page_faults: u64,
    /// The same faults by process (thread group id), for functions sharing one cgroup.
    pub page_faults_by_pid: BTreeMap<u32, u64>,
    /// Bytes passed to glibc's memcpy/memmove/mempcpy (and their `_chk` forms).
    pub memcpy_bytes: u64,
    /// Calls of those functions.
    pub memcpy_calls: u64,
    /// Those calls by size: bucket 0 counts size 0, bucket b >= 1 sizes in [2^(b-1), 2^b).
    pub memcpy_hist: [u64; HIST_BUCKETS],
    /// `mmap` calls (entered, whether or not they succeeded).
    pub mmaps: u64,
    /// Bytes asked for by those `mmap` calls.
    pub mmap_bytes: u64,
    /// `munmap` calls.
    pub munmaps: u64,
    /// Bytes passed to those `munmap` calls.
    pub munmap_bytes: u64,
}

impl Default for Counters {
    fn default() -> Self {
        Counters::from_stats(&Stats::ZERO, BTreeMap::new())
    }
}

impl Counters {
    pub(crate) fn from_stats(s: &Stats, page_faults_by_pid: BTreeMap<u32, u64>) -> Counters {
        Counters {
            page_faults: s.page_faults,
            page_faults_by_pid,
            memcpy_bytes: s.memcpy_bytes,
            memcpy_calls: s.memcpy_calls,
            memcpy_hist: s.memcpy_hist,
            mmaps: s.mmaps,
            mmap_bytes: s.mmap_bytes,
            munmaps: s.munmaps,
            munmap_bytes: s.munmap_bytes,
        }
    }

    /// The histogram bucket a copy of `size` bytes falls in.
    pub fn bucket(size: u64) -> usize {
        (u64::BITS - size.leading_zeros()).min(HIST_BUCKETS as u32 - 1) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_bit_lengths() {
        assert_eq!(Counters::bucket(0), 0);
        assert_eq!(Counters::bucket(1), 1);
        assert_eq!(Counters::bucket(2), 2);
        assert_eq!(Counters::bucket(3), 2);
        assert_eq!(Counters::bucket(4096), 13);
        assert_eq!(Counters::bucket(u64::MAX), HIST_BUCKETS - 1);
    }
}

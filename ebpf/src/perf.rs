//! Keeps per-process uprobe attachment fast.
//!
//! The first perf event bound to a task anywhere on the machine flips a static key in the
//! scheduler and waits for an RCU grace period (kernel/events/core.c, account_event), which
//! took 10-40 ms per attach here; the key is turned off again about a second after the last
//! such event goes. A disabled dummy event on our own process keeps it on, so attaching the
//! copy meter to a process costs a fraction of a millisecond instead.

use std::os::fd::{FromRawFd, OwnedFd};

/// The first 64 bytes of `struct perf_event_attr` (PERF_ATTR_SIZE_VER0).
#[repr(C)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_COUNT_SW_DUMMY: u64 = 9;
const FLAG_DISABLED: u64 = 1;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;

/// Opens a disabled dummy event on the calling process; None if the kernel refuses (the meter
/// still works, its attachment is just slower).
pub(crate) fn hold_sched_key() -> Option<OwnedFd> {
    let attr = PerfEventAttr {
        kind: PERF_TYPE_SOFTWARE,
        size: size_of::<PerfEventAttr>() as u32,
        config: PERF_COUNT_SW_DUMMY,
        sample_period: 0,
        sample_type: 0,
        read_format: 0,
        flags: FLAG_DISABLED,
        wakeup_events: 0,
        bp_type: 0,
        config1: 0,
    };
    // SAFETY: attr is a valid perf_event_attr prefix whose size field says how much the kernel
    // may read; pid 0 / cpu -1 is this process on any CPU, no group.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const PerfEventAttr,
            0,
            -1,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        log::debug!("dummy perf event: {}", std::io::Error::last_os_error());
        return None;
    }
    // SAFETY: the syscall returned a new file descriptor that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

//! Helpers shared by quiver-ebpf's integration tests: skipping without root, throwaway cgroups
//! v2, and children forked into them.
#![allow(dead_code)]

use std::ops::Deref;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use quiver_ebpf::Telemetry;

/// Whether tests that need root or a kernel feature must fail rather than skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether the test runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Skips the test (returns None) with a reason, or fails it under CI.
pub fn skip<T>(test: &str, reason: &str) -> Option<T> {
    if in_ci() {
        panic!("{test}: {reason} (CI=true: failing instead of skipping)");
    }
    eprintln!("SKIP {test}: {reason}");
    None
}

/// A started telemetry that holds the test binary's one-at-a-time lock until dropped.
///
/// The tests fork children, and a child forked by one test inherits the link fds of another
/// test's programs (fork keeps O_CLOEXEC fds): a detach in that other test then leaves the link
/// alive until the child exits. One test at a time makes every detach take effect at once.
pub struct Started {
    // Declared first so it drops, and detaches everything, before the lock is released.
    telemetry: Telemetry,
    _serial: MutexGuard<'static, ()>,
}

impl Deref for Started {
    type Target = Telemetry;
    fn deref(&self) -> &Telemetry {
        &self.telemetry
    }
}

/// A started telemetry, or None when this machine cannot run it (skip) outside CI.
pub fn telemetry(test: &str) -> Option<Started> {
    static SERIAL: Mutex<()> = Mutex::new(());
    let serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    if !is_root() {
        return skip(test, "needs root to load BPF programs");
    }
    match Telemetry::start() {
        Ok(telemetry) => Some(Started {
            telemetry,
            _serial: serial,
        }),
        Err(e) => skip(test, &e.to_string()),
    }
}

/// The mount point of the cgroup v2 hierarchy (hybrid: /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
    })
}

/// A fresh cgroup v2 directory, removed on drop.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new() -> TestCgroup {
        static N: AtomicU32 = AtomicU32::new(0);
        let root = cgroup2_root().expect("a cgroup2 hierarchy is mounted");
        let name = format!(
            "quiver-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let path = root.join(name);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        TestCgroup { path }
    }

    /// `cgroup.procs`, open for writing: a forked child writes "0" to it to move itself in.
    pub fn procs(&self) -> OwnedFd {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.procs"))
            .expect("open cgroup.procs");
        f.into()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // The last child may still be leaving the cgroup for a moment after it was reaped.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        eprintln!("could not remove {}", self.path.display());
    }
}

/// Forks a child that moves itself into `cgroup`, runs `f` and exits with its result; returns
/// that exit code. `f` runs in a fork of a multi-threaded process: it must not allocate or lock.
pub fn run_in(cgroup: &TestCgroup, f: impl FnOnce() -> i32) -> i32 {
    wait(spawn_in(cgroup, f))
}

/// [`run_in`] without the wait: returns the child's pid.
pub fn spawn_in(cgroup: &TestCgroup, f: impl FnOnce() -> i32) -> libc::pid_t {
    let procs = cgroup.procs();
    let fd = procs.as_raw_fd();
    // SAFETY: the child only makes async-signal-safe calls (write, _exit) besides `f`, whose
    // callers keep to the same rule.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: fd is open for writing; the buffer is one valid byte.
        let moved = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } == 1;
        let code = if moved { f() } else { 125 };
        // SAFETY: _exit ends the child without running the parent's atexit handlers.
        unsafe { libc::_exit(code) };
    }
    pid
}

/// A pipe as (read end, write end) raw fds, for parent and child to wait on each other.
pub fn pipe() -> (i32, i32) {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    (fds[0], fds[1])
}

/// Writes one byte to `fd` (async-signal-safe); false on failure.
pub fn signal(fd: i32) -> bool {
    // SAFETY: one valid byte.
    unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) == 1 }
}

/// Reads one byte from `fd` (async-signal-safe); false on EOF or failure.
pub fn await_signal(fd: i32) -> bool {
    let mut b = 0u8;
    // SAFETY: reads into one valid byte.
    unsafe { libc::read(fd, (&mut b as *mut u8).cast(), 1) == 1 }
}

/// Waits for `pid`; returns its exit code (128 + signal if killed).
pub fn wait(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    // SAFETY: status is a valid out-pointer; pid is our child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid: {}", std::io::Error::last_os_error());
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    }
}

/// The calling thread's errno.
pub fn errno() -> i32 {
    // SAFETY: __errno_location always returns the calling thread's errno slot.
    unsafe { *libc::__errno_location() }
}

/// bpftool, or None when it is not installed.
pub fn bpftool() -> Option<PathBuf> {
    ["/usr/sbin/bpftool", "/usr/bin/bpftool", "/sbin/bpftool"]
        .iter()
        .map(Path::new)
        .find(|p| p.exists())
        .map(Path::to_path_buf)
}

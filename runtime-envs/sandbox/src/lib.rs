//! quiver-sandbox: the confinement every function process enters before it runs user code or
//! reads a table.
//!
//! Entering takes two steps, because a new pid namespace only applies to the children of the
//! process that creates it:
//!
//! 1. [`enter_namespaces`], in a freshly forked, single-threaded child: join the invocation's
//!    cgroups, unshare the mount, pid, ipc and uts namespaces, join the prepared empty network
//!    namespace ([`netns::empty`]).
//! 2. Fork; the parent waits for its child and exits with its status ([`wait_and_exit`]); the
//!    child, the first process of the new pid namespace, calls [`confine`]: a new root holding
//!    only the spec's read-only binds, a private `/tmp`, `/proc` and a few devices; rlimits; an
//!    unprivileged uid and gid; `PR_SET_NO_NEW_PRIVS`; landlock; a seccomp filter. What it did
//!    not keep of its fds is closed.
//!
//! [`enter`] does both for Rust callers; Python zygotes call the same steps through the C ABI in
//! [`ffi`], forking with `os.fork` in between. quiver's native workers, started before they know
//! their task, split step 2: [`confine_root`] and the syscall filter while they wait, then,
//! once their request names their files, open those through a [`HostRoot`] and
//! [`drop_privileges`]. The agent's side (cgroups, the empty network
//! namespace) lives in [`cgroup`] and [`netns`]. docs/security.md says what each layer stops.

pub mod cgroup;
mod error;
pub mod ffi;
mod fsrules;
mod host;
mod mounts;
pub mod netns;
mod seccomp;
mod spec;

use std::os::fd::BorrowedFd;

use nix::sched::CloneFlags;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Uid};

pub use error::{Result, SandboxError};
pub use host::HostRoot;
pub use spec::{Bind, Limits, Spec};

/// What [`confine`] could enforce on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confined {
    /// Landlock rules are in force (fully or partly); `false` on kernels without landlock.
    pub landlock: bool,
}

/// Step 1: joins the cgroups (each an open `cgroup.procs`), unshares mount, pid, ipc and uts
/// namespaces and joins `net` (no network) unless it is `None`.
pub fn enter_namespaces(cgroup_procs: &[BorrowedFd<'_>], net: Option<BorrowedFd<'_>>) -> Result<()> {
    for fd in cgroup_procs {
        // "0" means the writing process; the file was opened by the privileged agent.
        nix::unistd::write(fd, b"0").map_err(|e| SandboxError::sys("joining a cgroup", e))?;
    }
    let flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
    nix::sched::unshare(flags).map_err(|e| SandboxError::sys("unshare", e))?;
    if let Some(net) = net {
        nix::sched::setns(net, CloneFlags::CLONE_NEWNET).map_err(|e| SandboxError::sys("joining the empty network namespace", e))?;
    }
    Ok(())
}

/// The parent's half of step 2: waits for the namespace's first process and exits as it did
/// (128 + signal when it was killed), so whoever forked us sees the function's status.
pub fn wait_and_exit(child: nix::unistd::Pid) -> ! {
    // The child alone holds its connections: whoever talks to it sees it hang up when it exits.
    let _ = close_fds_except(&[]);
    let code = loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, c)) => break c,
            Ok(WaitStatus::Signaled(_, s, _)) => break 128 + s as i32,
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break 125,
        }
    };
    // SAFETY: _exit ends the process without running destructors or atexit handlers, which
    // belong to the process we were forked from.
    unsafe { libc::_exit(code) }
}

/// Step 2, in the first process of the new pid namespace: builds the root, applies limits and
/// drops every privilege. Returns what was enforced.
pub fn confine(spec: &Spec) -> Result<Confined> {
    confine_root(spec)?;
    drop_privileges(spec.uid, spec.gid)?;
    // SAFETY: prctl with these arguments has no memory effects.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SandboxError::sys("PR_SET_NO_NEW_PRIVS", nix::errno::Errno::last()));
    }
    let landlock = fsrules::restrict(spec)?;
    seccomp::apply(spec.network)?;
    Ok(Confined { landlock })
}

/// The first half of [`confine`], for a process that learns which files it needs after it has
/// started (quiver's native workers): closes the fds it does not keep, builds the new root and
/// applies the host name and rlimits, still as root. The caller opens what its task needs
/// through a [`HostRoot`] it kept, closes that, and calls [`drop_privileges`].
pub fn confine_root(spec: &Spec) -> Result<()> {
    spec.validate()?;
    // The namespace's first process must not outlive the one that waits for it.
    // SAFETY: prctl with these arguments has no memory effects.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    close_fds_except(&spec.keep_fds)?;
    mounts::build_root(spec)?;
    nix::unistd::sethostname(&spec.hostname).map_err(|e| SandboxError::sys("sethostname", e))?;
    spec.limits.apply()
}

/// The system-call layer alone, for quiver's native workers, which are started before their
/// task (and so the paths they must reach) is known: `PR_SET_NO_NEW_PRIVS`, the seccomp deny
/// list (inet sockets too unless `network`) and no core dumps. Call it before starting threads:
/// the filter covers the calling thread and everything it starts.
pub fn restrict_syscalls(network: bool) -> Result<()> {
    let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: setrlimit reads the struct passed by reference; prctl with these arguments has
    // no memory effects.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_CORE, &no_core) != 0 {
            return Err(SandboxError::sys("setrlimit(RLIMIT_CORE)", nix::errno::Errno::last()));
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(SandboxError::sys("PR_SET_NO_NEW_PRIVS", nix::errno::Errno::last()));
        }
    }
    seccomp::apply(network)
}

/// The file system layer alone, for a native worker once it knows its task: from now on the
/// calling thread, and every thread and process it starts, may read only beneath `read` and
/// write only beneath `write` (landlock), and without `network` neither bind nor connect TCP.
/// Every path must exist. Returns whether this kernel enforces it (false without landlock).
pub fn restrict_files(read: &[&std::path::Path], write: &[&std::path::Path], network: bool) -> Result<bool> {
    fsrules::restrict_to(read, write, network)
}

/// Both steps, for a single-threaded Rust process: returns in the confined process; the
/// calling process waits for it and exits with its status.
pub fn enter(spec: &Spec, cgroup_procs: &[BorrowedFd<'_>], net: Option<BorrowedFd<'_>>) -> Result<Confined> {
    enter_namespaces(cgroup_procs, net)?;
    // SAFETY: the caller is single-threaded (documented), so the child may run any code.
    match unsafe { nix::unistd::fork() }.map_err(|e| SandboxError::sys("fork", e))? {
        ForkResult::Parent { child } => wait_and_exit(child),
        ForkResult::Child => confine(spec),
    }
}

/// Becomes `uid` and `gid` (never 0) with no supplementary groups, for good: the saved ids go
/// too.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<()> {
    if uid == 0 || gid == 0 {
        return Err(SandboxError::Spec("a function never runs as uid or gid 0".into()));
    }
    let (u, g) = (Uid::from_raw(uid), Gid::from_raw(gid));
    nix::unistd::setgroups(&[]).map_err(|e| SandboxError::sys("setgroups", e))?;
    nix::unistd::setresgid(g, g, g).map_err(|e| SandboxError::sys("setresgid", e))?;
    nix::unistd::setresuid(u, u, u).map_err(|e| SandboxError::sys("setresuid", e))?;
    Ok(())
}

/// Closes every fd but `keep` (and 0-2): an inherited directory fd would lead out of the new
/// root, an inherited socket back to the zygote or agent.
fn close_fds_except(keep: &[i32]) -> Result<()> {
    let mut keep: Vec<i32> = keep.iter().copied().filter(|&f| f > 2).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut from = 3u32;
    for &k in &keep {
        close_range(from, k as u32 - 1)?;
        from = k as u32 + 1;
    }
    close_range(from, u32::MAX)
}

fn close_range(first: u32, last: u32) -> Result<()> {
    if first > last {
        return Ok(());
    }
    // SAFETY: close_range only closes descriptors; nothing in this process uses them after
    // confinement (the caller listed what it keeps).
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
    if rc != 0 {
        return Err(SandboxError::sys("close_range", nix::errno::Errno::last()));
    }
    Ok(())
}

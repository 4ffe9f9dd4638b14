//! The empty network namespace functions join. Creating one per invocation costs milliseconds
//! (the kernel sets up and later tears down a whole network stack), so the agent prepares one
//! and every function joins it with `setns`: it holds only a loopback device that is down, so
//! no socket reaches anything, not even 127.0.0.1.

use std::os::fd::OwnedFd;

use nix::fcntl::{OFlag, open};
use nix::sched::{CloneFlags, unshare};
use nix::sys::stat::Mode;

use crate::error::{Result, SandboxError};

/// Creates an empty network namespace and returns an fd that keeps it alive.
///
/// A short-lived thread unshares its own network namespace, so the caller's stays as it was.
pub fn empty() -> Result<OwnedFd> {
    std::thread::spawn(|| -> Result<OwnedFd> {
        unshare(CloneFlags::CLONE_NEWNET).map_err(|e| SandboxError::sys("unshare(CLONE_NEWNET)", e))?;
        open("/proc/thread-self/ns/net", OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| SandboxError::sys("opening the new network namespace", e))
    })
    .join()
    .map_err(|_| SandboxError::Spec("the thread preparing the network namespace panicked".into()))?
}

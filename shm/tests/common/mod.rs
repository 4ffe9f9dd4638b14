//! Helpers shared by quiver-shm's integration tests.
#![allow(dead_code)]

pub mod arrays;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use quiver_shm::sipc::{ReadOptions, SipcRead, SipcTable, read_table};
use quiver_shm::transport::{RecvLimits, recv, send_table, socketpair};

/// Whether tests that need root or a kernel feature must fail rather than skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether the test runs as root (pagemap frame numbers need CAP_SYS_ADMIN).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The `sipc-peer` process, talking over a SOCK_SEQPACKET socket on its fd 3.
pub struct Peer {
    child: Child,
    sock: Option<OwnedFd>,
}

impl Peer {
    pub fn spawn(mode: &str) -> Peer {
        let (ours, theirs) = socketpair().expect("socketpair");
        let raw = theirs.as_raw_fd();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sipc-peer"));
        cmd.arg(mode);
        // SAFETY: dup2 is async-signal-safe; it runs in the child between fork and exec, and
        // gives the peer its socket as fd 3 without CLOEXEC.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(raw, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let child = cmd.spawn().expect("spawn sipc-peer");
        drop(theirs);
        Peer { child, sock: Some(ours) }
    }

    fn sock(&self) -> std::os::fd::BorrowedFd<'_> {
        self.sock.as_ref().expect("open").as_fd()
    }

    /// The parent's end of the socket.
    pub fn sock_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.sock()
    }

    /// Sends a table; returns the peer's reply as (bytes, fds).
    pub fn exchange(&self, t: &SipcTable) -> (Vec<u8>, Vec<OwnedFd>) {
        send_table(self.sock(), t).expect("send");
        recv(self.sock(), &RecvLimits::default()).expect("reply")
    }

    /// Sends a table to an `echo` peer and reads back what it wrote.
    pub fn echo(&self, t: &SipcTable) -> Result<SipcRead, String> {
        let (bytes, fds) = self.exchange(t);
        if fds.is_empty() && bytes.starts_with(b"error") {
            return Err(String::from_utf8_lossy(&bytes).into_owned());
        }
        read_table(&bytes, fds, &ReadOptions::default()).map_err(|e| e.to_string())
    }

    /// Closes the socket and waits for the peer; returns its exit status.
    pub fn finish(mut self) -> std::process::ExitStatus {
        self.sock.take();
        self.child.wait().expect("wait")
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.sock.take();
        let _ = self.child.wait();
    }
}

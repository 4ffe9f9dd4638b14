//! A denied cgroup cannot open IPv4/IPv6 sockets nor connect one it made before the denial, its
//! forks neither, while a process outside connects fine; taking the watch lifts the denial.

mod common;

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;

use common::{TestCgroup, await_signal, errno, pipe, run_in, signal, spawn_in, telemetry, wait};

/// 0 if socket(domain, SOCK_STREAM) fails with EPERM, else `code`.
fn socket_denied(domain: i32, code: i32) -> i32 {
    // SAFETY: plain syscall with constant arguments.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM, 0) };
    if fd >= 0 {
        // SAFETY: fd was just opened here.
        unsafe { libc::close(fd) };
        return code;
    }
    if errno() == libc::EPERM {
        0
    } else {
        code + 100
    }
}

#[test]
fn denied_cgroup_gets_eperm_and_outside_connects() {
    let Some(t) = telemetry("denied_cgroup_gets_eperm_and_outside_connects") else {
        return;
    };
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let cg = TestCgroup::new();
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
        },
        sin_zero: [0; 8],
    };
    let (ready_r, ready_w) = pipe();
    let (go_r, go_w) = pipe();
    let child = spawn_in(&cg, || {
        // A socket made in the cgroup before the denial was attached: connect4 is the second
        // line that still stops it (the hooks run for the cgroup a socket was created in).
        // SAFETY: plain syscall.
        let early = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        if early < 0 || !signal(ready_w) || !await_signal(go_r) {
            return 10;
        }
        let r = socket_denied(libc::AF_INET, 1);
        if r != 0 {
            return r;
        }
        let r = socket_denied(libc::AF_INET6, 2);
        if r != 0 {
            return r;
        }
        // SAFETY: plain syscall; a Unix socket is not network access.
        let unix = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        if unix < 0 {
            return 3;
        }
        // SAFETY: addr is a valid sockaddr_in of the size passed.
        let c = unsafe {
            libc::connect(
                early,
                (&addr as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if c == 0 || errno() != libc::EPERM {
            return 4;
        }
        // The denial follows the function's forks (they stay in its cgroup).
        // SAFETY: the grandchild only makes async-signal-safe calls.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: ends the grandchild.
            unsafe { libc::_exit(socket_denied(libc::AF_INET, 5)) };
        }
        if pid < 0 {
            return 6;
        }
        wait(pid)
    });
    assert!(await_signal(ready_r), "child did not get ready");
    let watch = t.watch(&cg.path, true).expect("watch with denial");
    assert!(watch.denies_network());
    assert!(signal(go_w));
    let code = wait(child);
    assert_eq!(
        code, 0,
        "child failed at step {code} (see the test's socket_denied codes)"
    );
    for fd in [ready_r, ready_w, go_r, go_w] {
        // SAFETY: the pipe ends opened above, no longer used.
        unsafe { libc::close(fd) };
    }

    // Outside the cgroup, the same machine connects fine.
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect from outside");
    let (accepted, _) = listener.accept().expect("accept");
    assert!(stream.as_raw_fd() >= 0 && accepted.as_raw_fd() >= 0);

    // Taking the watch lifts the denial from the cgroup.
    watch.take().expect("take");
    let code = run_in(&cg, || {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        if fd < 0 { 1 } else { 0 }
    });
    assert_eq!(
        code, 0,
        "socket(AF_INET) still refused after the watch was taken"
    );
}

#[test]
fn undenied_watch_leaves_the_network_alone() {
    let Some(t) = telemetry("undenied_watch_leaves_the_network_alone") else {
        return;
    };
    let cg = TestCgroup::new();
    let watch = t.watch(&cg.path, false).expect("watch");
    assert!(!watch.denies_network());
    let code = run_in(&cg, || {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        if fd < 0 { 1 } else { 0 }
    });
    assert_eq!(code, 0);
    drop(watch);
}

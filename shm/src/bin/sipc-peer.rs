//! The other process of quiver-shm's two-process tests: it receives SIPC tables on fd 3 (a
//! `SOCK_SEQPACKET` socket) and, by mode, echoes them back, reports the physical frames behind
//! their buffers, or tries to write into them.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::process::ExitCode;

use arrow_array::Array;
use quiver_shm::sipc::{ReadOptions, TableWriter, read_table};
use quiver_shm::transport::{RecvLimits, recv, send, send_table};

fn main() -> ExitCode {
    let mode = std::env::args().nth(1).unwrap_or_default();
    // SAFETY: the parent passes the socket as fd 3 and nothing else in this process owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(3) };
    let sock = sock.as_fd();
    loop {
        let (desc, fds) = match recv(sock, &RecvLimits::default()) {
            Ok(m) => m,
            Err(_) => return ExitCode::SUCCESS, // parent closed the socket: done
        };
        let reply = match read_table(&desc, fds, &ReadOptions::default()) {
            Err(e) => send(sock, format!("error: {e}").as_bytes(), &[]),
            Ok(t) => match mode.as_str() {
                "echo" => {
                    let mut w = TableWriter::new(t.schema.clone());
                    let r = t.batches.iter().try_for_each(|b| w.write(b)).and_then(|_| w.finish());
                    match r {
                        Ok(out) => send_table(sock, &out),
                        Err(e) => send(sock, format!("error: {e}").as_bytes(), &[]),
                    }
                }
                "frames" => {
                    // For each buffer of the first column: inside a mapping? and its frames.
                    let mut lines = Vec::new();
                    for b in &t.batches {
                        let data = b.column(0).to_data();
                        for buf in data.buffers() {
                            let inside = t.mappings.iter().any(|m| m.mapping().offset_of(buf.as_ptr(), buf.len()).is_some());
                            let frames = quiver_shm::pagemap::frames(buf.as_ptr(), buf.len())
                                .map(|f| f.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","))
                                .unwrap_or_else(|e| format!("error {e}"));
                            lines.push(format!("{inside} {frames}"));
                        }
                    }
                    send(sock, lines.join("\n").as_bytes(), &[])
                }
                "write" => {
                    let data = t.batches[0].column(0).to_data();
                    let p = data.buffers()[0].as_ptr() as *mut u8;
                    // SAFETY: deliberately unsound: the test expects this write to fault.
                    unsafe { std::ptr::write_volatile(p, 42) };
                    send(sock, b"wrote", &[])
                }
                _ => send(sock, format!("unknown mode {mode}").as_bytes(), &[]),
            },
        };
        if reply.is_err() {
            return ExitCode::FAILURE;
        }
    }
}

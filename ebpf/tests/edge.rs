//! The kernel and quiver's own books tell the same story about an SIPC edge: a producer whose
//! column lies in its arena hands it over with no large memcpy and `bytes_copied == 0`; one whose
//! column lies in heap memory is charged, by the kernel, at least the bytes the writer says it
//! copied; the consumer maps and scans the table with no large memcpy.
//!
//! Producer and consumer are this test binary run again as children (`edge_child`), in watched
//! cgroups with their copies metered; the test relays the descriptor and fds between them.

mod common;

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, Int64Array, RecordBatch};
use arrow_buffer::{Buffer, ScalarBuffer};
use arrow_schema::{DataType, Field, Schema};
use common::{TestCgroup, telemetry};
use quiver_ebpf::{Counters, Telemetry};
use quiver_shm::Arena;
use quiver_shm::sipc::{ReadOptions, TableWriter, read_table};
use quiver_shm::transport::{RecvLimits, recv, send, send_table, socketpair};

const ROWS: usize = 4 << 20; // 32 MiB of Int64 values
/// Copies of at least 1 MiB: table data, not bookkeeping.
const LARGE: usize = 21;

fn large_calls(c: &Counters) -> u64 {
    c.memcpy_hist[LARGE..].iter().sum()
}

/// Starts this binary as `edge_child` in `mode`, in `cg`, with `sock` as its fd 3. A producer
/// waits for "go" and a consumer for the table, both sent once their meters are attached.
fn spawn(mode: &str, cg: &TestCgroup, sock: OwnedFd) -> Child {
    let procs = cg.procs();
    let (procs_fd, sock_fd) = (procs.as_raw_fd(), sock.as_raw_fd());
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args(["--exact", "edge_child", "--nocapture", "--test-threads=1"])
        .env("QUIVER_EBPF_EDGE", mode)
        .stdout(Stdio::piped());
    // SAFETY: write and dup2 are async-signal-safe; the child enters the cgroup and gets its
    // socket as fd 3 (without CLOEXEC) before exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 || libc::dup2(sock_fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let child = cmd.spawn().expect("spawn edge child");
    drop(procs);
    child
}

/// The value the child printed on its `EDGE` line.
fn finish(mut child: Child) -> u64 {
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read");
    assert!(
        child.wait().expect("wait").success(),
        "edge child failed: {out}"
    );
    let v = out
        .lines()
        .find_map(|l| Some(l.split_once("EDGE ")?.1))
        .expect("EDGE line");
    v.trim().parse().expect("number")
}

/// Runs a producer in `mode` and a consumer, each metered; returns (producer counters, the
/// producer's own bytes_copied, consumer counters).
fn edge(t: &Telemetry, mode: &str) -> (Counters, u64, Counters) {
    let (pcg, ccg) = (TestCgroup::new(), TestCgroup::new());
    let (pw, cw) = (
        t.watch(&pcg.path, true).expect("watch"),
        t.watch(&ccg.path, true).expect("watch"),
    );
    let (p_ours, p_theirs) = socketpair().expect("socketpair");
    let (c_ours, c_theirs) = socketpair().expect("socketpair");
    let producer = spawn(mode, &pcg, p_theirs);
    let consumer = spawn("consume", &ccg, c_theirs);
    let pm = t.meter_copies(producer.id()).expect("meter producer");
    let cm = t.meter_copies(consumer.id()).expect("meter consumer");
    send(p_ours.as_fd(), b"go", &[]).expect("go");
    let (descriptor, fds) = recv(p_ours.as_fd(), &RecvLimits::default()).expect("producer's table");
    let fds: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    send(c_ours.as_fd(), &descriptor, &fds).expect("relay to the consumer");
    let copied = finish(producer);
    let sum = finish(consumer);
    assert_eq!(
        sum,
        (ROWS as u64 - 1) * ROWS as u64 / 2,
        "the consumer read the table"
    );
    drop((pm, cm));
    (pw.take().expect("take"), copied, cw.take().expect("take"))
}

#[test]
fn zero_copy_edge_is_charged_no_large_copy() {
    let Some(t) = telemetry("zero_copy_edge_is_charged_no_large_copy") else {
        return;
    };
    let (p, copied, c) = edge(&t, "arena");
    eprintln!(
        "arena producer: ours {copied} B copied; kernel {} B in {} calls, {} large",
        p.memcpy_bytes,
        p.memcpy_calls,
        large_calls(&p)
    );
    eprintln!(
        "consumer: kernel {} B in {} calls, {} large",
        c.memcpy_bytes,
        c.memcpy_calls,
        large_calls(&c)
    );
    assert_eq!(copied, 0, "the writer referenced the arena column");
    assert_eq!(large_calls(&p), 0, "producer: {p:?}");
    assert!(
        p.memcpy_bytes < (ROWS * 8 / 8) as u64,
        "producer copied {} bytes",
        p.memcpy_bytes
    );
    assert_eq!(large_calls(&c), 0, "consumer: {c:?}");
    assert!(
        c.memcpy_bytes < (ROWS * 8 / 8) as u64,
        "consumer copied {} bytes",
        c.memcpy_bytes
    );
}

#[test]
fn copying_edge_is_charged_what_the_writer_copied() {
    let Some(t) = telemetry("copying_edge_is_charged_what_the_writer_copied") else {
        return;
    };
    let (p, copied, c) = edge(&t, "heap");
    eprintln!(
        "heap producer: ours {copied} B copied; kernel {} B in {} calls, {} large",
        p.memcpy_bytes,
        p.memcpy_calls,
        large_calls(&p)
    );
    assert_eq!(
        copied,
        (ROWS * 8) as u64,
        "the writer copied the heap column"
    );
    assert!(
        p.memcpy_bytes >= copied,
        "kernel saw {} < {copied} bytes",
        p.memcpy_bytes
    );
    assert!(
        p.memcpy_bytes < copied + copied / 4,
        "kernel saw {} bytes",
        p.memcpy_bytes
    );
    assert!(large_calls(&p) >= 1, "{p:?}");
    assert_eq!(large_calls(&c), 0, "consumer: {c:?}");
}

/// The producer and consumer processes (run by the tests above, a no-op otherwise).
#[test]
fn edge_child() {
    let Ok(mode) = std::env::var("QUIVER_EBPF_EDGE") else {
        return;
    };
    // SAFETY: fd 3 was given to this process by its parent for this purpose.
    let sock: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(3) };
    if mode == "consume" {
        let (descriptor, fds) = recv(sock.as_fd(), &RecvLimits::default()).expect("table");
        let table = read_table(&descriptor, fds, &ReadOptions::default()).expect("read");
        let mut sum = 0u64;
        for b in &table.batches {
            let col = b
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("int64");
            sum += col.values().iter().map(|v| *v as u64).sum::<u64>();
        }
        println!("EDGE {sum}");
        return;
    }
    let (go, _) = recv(sock.as_fd(), &RecvLimits::default()).expect("go");
    assert_eq!(go, b"go");
    let values: Buffer = if mode == "arena" {
        let arena = Arena::named("edge-test");
        let mut v = arena.vec::<i64>(ROWS).expect("vec");
        v.spare_mut()
            .iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = i as i64);
        v.set_len(ROWS);
        v.finish()
    } else {
        let mut v: Vec<i64> = Vec::with_capacity(ROWS);
        v.extend(0..ROWS as i64);
        Buffer::from_vec(v)
    };
    let col = Int64Array::new(ScalarBuffer::new(values, 0, ROWS), None);
    assert_eq!(col.len(), ROWS);
    let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
    let batch =
        RecordBatch::try_new(schema.clone(), vec![Arc::new(col) as ArrayRef]).expect("batch");
    let mut w = TableWriter::new(schema);
    w.write(&batch).expect("write");
    let table = w.finish().expect("finish");
    send_table(sock.as_fd(), &table).expect("send");
    println!("EDGE {}", table.stats.bytes_copied);
}

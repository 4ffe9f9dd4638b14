//! No leak: creating, sharing and dropping 10,000 tables leaves the process's fds, memfd
//! mappings and shared memory where they started.

use std::os::fd::AsFd;
use std::sync::Arc;

use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow_buffer::ScalarBuffer;
use quiver_shm::sipc::{ReadOptions, TableWriter, read_table};
use quiver_shm::transport::{RecvLimits, recv, send_table, socketpair};
use quiver_shm::{Arena, ArenaOptions, live_chunks};

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").count()
}

/// (number of memfd mappings, their total size in bytes)
fn memfd_maps() -> (usize, u64) {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    maps.lines()
        .filter(|l| l.contains("/memfd:"))
        .map(|l| {
            let (range, _) = l.split_once(' ').expect("range");
            let (a, b) = range.split_once('-').expect("a-b");
            u64::from_str_radix(b, 16).expect("hex") - u64::from_str_radix(a, 16).expect("hex")
        })
        .fold((0, 0), |(n, s), len| (n + 1, s + len))
}

fn shmem_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssShmem:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn ten_thousand_tables_leave_nothing_behind() {
    let (tx, rx) = socketpair().expect("socketpair");
    let arena = Arena::new(ArenaOptions { name: "leak".into(), first_chunk: 64 << 10, ..Default::default() });
    // One warm-up round so lazily created process state (thread locals, the registry) exists.
    let round = |i: usize| {
        let mut v = arena.vec::<i64>(256).expect("vec");
        for k in 0..256 {
            v.push((i * k) as i64).expect("push");
        }
        let ints: ArrayRef = Arc::new(Int64Array::new(ScalarBuffer::from(v.finish()), None));
        let strs: ArrayRef = Arc::new(StringArray::from_iter_values((0..256).map(|k| format!("{i}-{k}"))));
        let b = RecordBatch::try_from_iter([("i", ints), ("s", strs)]).expect("batch");
        let mut w = TableWriter::new(b.schema());
        w.write(&b).expect("write");
        let t = w.finish().expect("finish");
        assert_eq!(t.stats.bytes_referenced, 256 * 8);
        send_table(tx.as_fd(), &t).expect("send");
        drop(t);
        let (desc, fds) = recv(rx.as_fd(), &RecvLimits::default()).expect("recv");
        let read = read_table(&desc, fds, &ReadOptions::default()).expect("read");
        assert_eq!(read.batches[0], b);
    };
    round(0);
    let fds0 = fd_count();
    let maps0 = memfd_maps();
    let shm0 = shmem_kb();
    let chunks0 = live_chunks();
    for i in 1..=10_000 {
        round(i);
    }
    assert_eq!(fd_count(), fds0, "fds");
    assert_eq!(memfd_maps(), maps0, "memfd mappings (count, bytes)");
    assert_eq!(live_chunks(), chunks0, "live arena chunks");
    let shm = shmem_kb();
    assert!(shm <= shm0 + 64, "shared memory grew from {shm0} kB to {shm} kB");
}

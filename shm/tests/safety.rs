//! Hostile input: every malformed descriptor, segment or table gives a clear error, never a
//! panic, SIGBUS or out-of-bounds read; reader mappings cannot be written.

mod common;

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use arrow_array::{ArrayRef, DictionaryArray, Int64Array, RecordBatch, StringArray, UnionArray, make_array};
use arrow_buffer::{Buffer, ScalarBuffer};
use arrow_data::ArrayData;
use arrow_schema::{DataType, Field, Schema, UnionFields};
use common::Peer;
use quiver_shm::sipc::{Limits, RawDescriptor, ReadOptions, SipcTable, TableWriter, read_table};
use quiver_shm::transport::{RecvLimits, recv, send, socketpair};
use quiver_shm::{MapOptions, Segment, ShmError};

fn write(batches: &[RecordBatch]) -> SipcTable {
    let mut w = TableWriter::new(batches[0].schema());
    for b in batches {
        w.write(b).expect("write");
    }
    w.finish().expect("finish")
}

fn ints(n: i64) -> RecordBatch {
    RecordBatch::try_from_iter([("x", Arc::new(Int64Array::from_iter_values(0..n)) as ArrayRef)]).expect("batch")
}

fn strings() -> RecordBatch {
    RecordBatch::try_from_iter([("s", Arc::new(StringArray::from_iter_values(["ab", "cd", "ef"])) as ArrayRef)])
        .expect("batch")
}

fn fds(t: &SipcTable) -> Vec<OwnedFd> {
    t.segments.iter().map(|s| s.as_fd().try_clone_to_owned().expect("dup")).collect()
}

fn read(desc: &[u8], fds: Vec<OwnedFd>) -> Result<quiver_shm::sipc::SipcRead, String> {
    read_table(desc, fds, &ReadOptions::default()).map_err(|e| e.to_string())
}

fn err(desc: &[u8], fds: Vec<OwnedFd>) -> String {
    read(desc, fds).expect_err("must be refused")
}

/// Re-encodes a table's descriptor after `f` changed it.
fn mutate(t: &SipcTable, f: impl FnOnce(&mut RawDescriptor)) -> Vec<u8> {
    let mut raw = RawDescriptor::decode(&t.descriptor, &Limits::default()).expect("decode");
    f(&mut raw);
    raw.encode()
}

#[test]
fn a_valid_table_reads() {
    let t = write(&[ints(10)]);
    assert_eq!(read(&t.descriptor, fds(&t)).expect("valid").batches[0], ints(10));
}

#[test]
fn an_unsealed_memfd_is_refused() {
    let t = write(&[ints(10)]);
    let seg = Segment::create("unsealed", 4096, MapOptions::default()).expect("segment");
    let e = err(&t.descriptor, vec![seg.into_fd()]);
    assert!(e.contains("not sealed"), "{e}");
}

#[test]
fn a_regular_file_is_refused() {
    let t = write(&[ints(10)]);
    let mut f = tempfile::tempfile().expect("tempfile");
    f.write_all(&[0u8; 4096]).expect("write");
    let e = err(&t.descriptor, vec![OwnedFd::from(f)]);
    assert!(e.contains("not a memfd"), "{e}");
}

#[test]
fn a_pipe_is_refused() {
    let t = write(&[ints(10)]);
    let (r, _w) = nix::unistd::pipe().expect("pipe");
    let e = err(&t.descriptor, vec![r]);
    assert!(e.contains("not a memfd"), "{e}");
}

#[test]
fn missing_and_extra_fds_are_refused() {
    let t = write(&[ints(10)]);
    let e = err(&t.descriptor, vec![]);
    assert!(e.contains("1 segments but 0 fds"), "{e}");
    let mut more = fds(&t);
    more.extend(fds(&t));
    let e = err(&t.descriptor, more);
    assert!(e.contains("1 segments but 2 fds"), "{e}");
}

#[test]
fn a_segment_of_the_wrong_size_is_refused() {
    let t = write(&[ints(10)]);
    let d = mutate(&t, |r| r.segment_sizes[0] += 4096);
    let e = err(&d, fds(&t));
    assert!(e.contains("size is"), "{e}");
}

#[test]
fn a_reference_past_the_end_is_refused() {
    let t = write(&[ints(10)]);
    let size = t.segments[0].size();
    let d = mutate(&t, |r| r.batches[0].buffers[1].offset = size - 8);
    let e = err(&d, fds(&t));
    assert!(e.contains("past the end"), "{e}");
    let d = mutate(&t, |r| r.batches[0].buffers[1].offset = u64::MAX - 4);
    let e = err(&d, fds(&t));
    assert!(e.contains("overflows"), "{e}");
    let d = mutate(&t, |r| r.batches[0].buffers[1].segment = 7);
    let e = err(&d, fds(&t));
    assert!(e.contains("segment 7"), "{e}");
}

#[test]
fn overlapping_buffers_are_refused() {
    let t = write(&[strings()]);
    // offsets and values buffers: make the values start inside the offsets.
    let d = mutate(&t, |r| {
        let off = r.batches[0].buffers[1].offset;
        r.batches[0].buffers[2].offset = off + 4;
    });
    let e = err(&d, fds(&t));
    assert!(e.contains("overlap"), "{e}");
}

#[test]
fn misaligned_buffers_are_refused() {
    let t = write(&[ints(10)]);
    let d = mutate(&t, |r| r.batches[0].buffers[1].offset += 4);
    let e = err(&d, fds(&t));
    assert!(e.contains("not aligned"), "{e}");
}

#[test]
fn a_short_buffer_is_refused() {
    let t = write(&[ints(10)]);
    let d = mutate(&t, |r| r.batches[0].buffers[1].length -= 8);
    let e = err(&d, fds(&t));
    assert!(e.contains("Need at least 80 bytes"), "{e}");
}

#[test]
fn lengths_that_disagree_are_refused() {
    let t = write(&[ints(10)]);
    let d = mutate(&t, |r| r.batches[0].rows = 11);
    let e = err(&d, fds(&t));
    assert!(e.contains("length 10 where 11"), "{e}");
    let d = mutate(&t, |r| r.batches[0].nodes[0].null_count = 3);
    let e = err(&d, fds(&t));
    assert!(e.contains("nulls claimed without a validity bitmap"), "{e}");
}

fn unchecked_strings(offsets: &[i32], bytes: &[u8]) -> RecordBatch {
    // SAFETY: deliberately invalid data, built to be written and then refused by the reader; it
    // is never read as strings in this process.
    let data = unsafe {
        ArrayData::builder(DataType::Utf8)
            .len(offsets.len() - 1)
            .add_buffer(Buffer::from_slice_ref(offsets))
            .add_buffer(Buffer::from_slice_ref(bytes))
            .build_unchecked()
    };
    let schema = Arc::new(Schema::new(vec![Field::new("s", DataType::Utf8, false)]));
    RecordBatch::try_new(schema, vec![make_array(data)]).expect("batch")
}

#[test]
fn bad_offsets_are_refused() {
    let t = write(&[unchecked_strings(&[0, 3, 1, 4], b"abcd")]);
    let e = err(&t.descriptor, fds(&t));
    assert!(e.contains("offset"), "{e}");
    let t = write(&[unchecked_strings(&[0, 2, 400], b"abcd")]);
    let e = err(&t.descriptor, fds(&t));
    assert!(e.contains("offset"), "{e}");
}

#[test]
fn invalid_utf8_is_refused() {
    let t = write(&[unchecked_strings(&[0, 2, 4], b"ab\xff\xfe")]);
    let e = err(&t.descriptor, fds(&t));
    assert!(e.to_lowercase().contains("utf-8") || e.contains("utf8"), "{e}");
}

#[test]
fn dictionary_keys_out_of_range_are_refused() {
    let values: ArrayRef = Arc::new(StringArray::from_iter_values(["a", "b"]));
    let keys = arrow_array::Int32Array::from(vec![0, 1, 5]);
    // SAFETY: deliberately invalid, to be refused by the reader.
    let dict = unsafe { DictionaryArray::new_unchecked(keys, values) };
    let b = RecordBatch::try_from_iter([("d", Arc::new(dict) as ArrayRef)]).expect("batch");
    let t = write(&[b]);
    let e = err(&t.descriptor, fds(&t));
    assert!(e.contains("out of bounds") || e.contains("Value at position"), "{e}");
}

#[test]
fn undeclared_union_type_ids_are_refused() {
    let uf = UnionFields::try_new(vec![1, 3], vec![Field::new("a", DataType::Int64, true), Field::new("b", DataType::Int64, true)])
        .expect("fields");
    let kids: Vec<ArrayRef> = vec![Arc::new(Int64Array::from(vec![1, 2])), Arc::new(Int64Array::from(vec![3, 4]))];
    let u = UnionArray::try_new(uf.clone(), ScalarBuffer::from(vec![1i8, 3]), None, kids).expect("union");
    let b = RecordBatch::try_from_iter([("u", Arc::new(u) as ArrayRef)]).expect("batch");
    let t = write(&[b]);
    let ok = read(&t.descriptor, fds(&t)).expect("valid union");
    assert_eq!(ok.batches.len(), 1);
    // Rewrite the type ids in a copy of the segment: a table with id 2, which is not declared.
    let mut w = TableWriter::new(Arc::new(Schema::new(vec![Field::new("u", DataType::Union(uf.clone(), arrow_schema::UnionMode::Sparse), false)])));
    // SAFETY: deliberately invalid, to be refused by the reader.
    let bad = unsafe {
        UnionArray::new_unchecked(uf, ScalarBuffer::from(vec![1i8, 2]), None, vec![Arc::new(Int64Array::from(vec![1, 2])), Arc::new(Int64Array::from(vec![3, 4]))])
    };
    w.write(&RecordBatch::try_from_iter([("u", Arc::new(bad) as ArrayRef)]).expect("batch")).expect("write");
    let t = w.finish().expect("finish");
    let e = err(&t.descriptor, fds(&t));
    assert!(e.to_lowercase().contains("type id") && e.contains(" 2 "), "{e}");
}

#[test]
fn truncated_oversized_and_wrong_version_descriptors_are_refused() {
    let t = write(&[ints(10)]);
    let d = &t.descriptor;
    for cut in [0, 3, 8, 31, d.len() / 2, d.len() - 1] {
        let e = err(&d[..cut], fds(&t));
        assert!(e.contains("invalid SIPC descriptor"), "cut {cut}: {e}");
    }
    let mut longer = d.clone();
    longer.extend_from_slice(&[0; 8]);
    assert!(err(&longer, fds(&t)).contains("arrived"));
    let small = ReadOptions { limits: Limits { max_descriptor_bytes: 64, ..Limits::default() }, ..Default::default() };
    let e = read_table(d, fds(&t), &small).expect_err("over the limit").to_string();
    assert!(e.contains("over the limit"), "{e}");
    let mut v2 = d.clone();
    v2[4] = 2;
    let e = read_table(&v2, fds(&t), &ReadOptions::default()).expect_err("version");
    assert!(matches!(e, ShmError::Version { found: 2, known: 1 }), "{e}");
    let mut magic = d.clone();
    magic[0] = b'X';
    assert!(err(&magic, fds(&t)).contains("bad magic"));
}

#[test]
fn lying_counts_do_not_allocate() {
    let t = write(&[ints(10)]);
    let d = mutate(&t, |r| r.batches[0].nodes.clear());
    let mut d = d;
    // Claim 2^32-1 nodes in the first tree without the bytes for them.
    let tree_at = 32 + 8 + RawDescriptor::decode(&t.descriptor, &Limits::default()).expect("ok").schema_ipc.len().next_multiple_of(8);
    d[tree_at + 8..tree_at + 12].copy_from_slice(&u32::MAX.to_le_bytes());
    let e = err(&d, fds(&t));
    assert!(e.contains("does not fit"), "{e}");
}

#[test]
fn writing_through_a_reader_mapping_faults() {
    let t = write(&[ints(1000)]);
    let peer = Peer::spawn("write");
    quiver_shm::transport::send_table(peer_sock(&peer), &t).ok();
    let status = peer.finish();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGSEGV), "the write must fault, got {status:?}");
}

fn peer_sock(p: &Peer) -> std::os::fd::BorrowedFd<'_> {
    p.sock_fd()
}

#[test]
fn the_transport_refuses_lies() {
    let limits = RecvLimits { max_descriptor_bytes: 1 << 20, max_fds: 8 };
    // More bytes announced than sent, then the peer goes away.
    let (a, b) = socketpair().expect("socketpair");
    let mut header = Vec::new();
    header.extend_from_slice(b"QSTX");
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&100u64.to_le_bytes());
    nix::sys::socket::send(a.as_fd().as_raw_fd_(), &header, nix::sys::socket::MsgFlags::empty()).expect("send");
    drop(a);
    let e = recv(b.as_fd(), &limits).expect_err("short").to_string();
    assert!(e.contains("stopped after 0 of 100 bytes"), "{e}");
    // Too many fds.
    let (a, b) = socketpair().expect("socketpair");
    let t = write(&[ints(1)]);
    let many: Vec<_> = (0..9).map(|_| t.segments[0].as_fd()).collect();
    send(a.as_fd(), b"x", &many).expect("send");
    let e = recv(b.as_fd(), &limits).expect_err("too many").to_string();
    assert!(e.contains("over the limit"), "{e}");
    // A descriptor over the limit.
    let (a, b) = socketpair().expect("socketpair");
    // Large messages need a reader on the other end, or the sender blocks on a full socket.
    let sender = std::thread::spawn(move || {
        let _ = send(a.as_fd(), &vec![0u8; (1 << 20) + 1], &[]);
    });
    let e = recv(b.as_fd(), &limits).expect_err("too big").to_string();
    drop(b);
    sender.join().expect("sender");
    assert!(e.contains("over the limit"), "{e}");
    // A well-formed message with fds arrives whole.
    let (a, b) = socketpair().expect("socketpair");
    let fds3: Vec<OwnedFd> = (0..3).map(|_| t.segments[0].as_fd().try_clone_to_owned().expect("dup")).collect();
    let sender = std::thread::spawn(move || {
        let borrowed: Vec<_> = fds3.iter().map(|f| f.as_fd()).collect();
        send(a.as_fd(), &vec![7u8; 100_000], &borrowed).expect("send");
    });
    let (bytes, got) = recv(b.as_fd(), &limits).expect("whole");
    sender.join().expect("sender");
    assert_eq!(bytes.len(), 100_000);
    assert_eq!(got.len(), 3);
}

trait RawFdExt {
    fn as_raw_fd_(&self) -> i32;
}
impl RawFdExt for std::os::fd::BorrowedFd<'_> {
    fn as_raw_fd_(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(self)
    }
}

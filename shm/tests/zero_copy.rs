//! Zero copy, proven: arena-built batches are referenced (0 bytes copied), heap-built ones are
//! copied and counted exactly, and the reader in another process sees the very same physical
//! frames as the writer.

mod common;

use std::sync::Arc;

use arrow_array::{Array, ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow_buffer::{NullBuffer, ScalarBuffer};
use arrow_schema::{DataType, Field, Schema};
use common::arrays::{batch, leaf_types};
use common::{Peer, in_ci, is_root};
use quiver_shm::sipc::TableWriter;
use quiver_shm::{Arena, ArenaAlloc};

#[global_allocator]
static ALLOC: ArenaAlloc = ArenaAlloc::new(4096);

fn all_buffer_bytes(data: &arrow_data::ArrayData) -> u64 {
    let own: u64 = data.buffers().iter().map(|b| b.len() as u64).sum();
    let nulls = data.nulls().map_or(0, |n| n.buffer().len() as u64);
    own + nulls + data.child_data().iter().map(all_buffer_bytes).sum::<u64>()
}

/// Writes a one-column table.
fn write_column(col: Int64Array) -> quiver_shm::sipc::SipcTable {
    let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
    let b = RecordBatch::try_new(schema.clone(), vec![Arc::new(col) as ArrayRef]).expect("batch");
    let mut w = TableWriter::new(schema);
    w.write(&b).expect("write");
    w.finish().expect("finish")
}

#[test]
fn arena_built_batches_copy_nothing() {
    let arena = Arena::named("zero-copy-test");
    // Dictionaries of a few strings are built by Arrow in small `Vec`s, below the threshold:
    // the next test covers those.
    let mut types: Vec<DataType> = leaf_types()
        .into_iter()
        .filter(|t| !matches!(t, DataType::Dictionary(_, v) if matches!(v.as_ref(), DataType::Utf8 | DataType::LargeUtf8)))
        .collect();
    types.push(DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))));
    let b = arena.scope(|| batch(&types, 2000, 7));
    let mut w = TableWriter::new(b.schema());
    w.write(&b).expect("write");
    let t = w.finish().expect("finish");
    assert_eq!(t.stats.bytes_copied, 0, "{:?}", t.stats);
    assert_eq!(t.stats.buffers_copied, 0);
    assert!(t.stats.bytes_referenced > 0);
    let expected: u64 = b.columns().iter().map(|c| all_buffer_bytes(&c.to_data())).sum();
    assert_eq!(t.stats.bytes_referenced, expected, "every byte of every buffer is referenced");
}

#[test]
fn small_vec_buffers_below_the_threshold_are_copied_and_counted() {
    let arena = Arena::named("small-vecs");
    let dt = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
    let b = arena.scope(|| batch(&[dt], 2000, 11));
    let values = b.column(0).to_data().child_data()[0].clone();
    let small: u64 = values.buffers().iter().map(|b| b.len() as u64).sum();
    assert!(small < 4096);
    let mut w = TableWriter::new(b.schema());
    w.write(&b).expect("write");
    let t = w.finish().expect("finish");
    assert_eq!(t.stats.bytes_copied, small, "exactly the dictionary's offsets and bytes: {:?}", t.stats);
    assert_eq!(t.stats.buffers_copied, 2);
}

#[test]
fn arena_vec_builds_columns_in_place() {
    let arena = Arena::named("arena-vec");
    let mut v = arena.vec::<i64>(1000).expect("vec");
    for i in 0..1000 {
        v.push(i * 3).expect("push");
    }
    let col = Int64Array::new(ScalarBuffer::from(v.finish()), None);
    let t = write_column(col);
    assert_eq!(t.stats.bytes_copied, 0);
    assert_eq!(t.stats.bytes_referenced, 8000);
}

#[test]
fn heap_built_batches_are_copied_and_counted() {
    // Built outside any arena scope: every buffer is on the ordinary heap.
    let ints = Int64Array::new((0..1000i64).collect(), Some(NullBuffer::from_iter((0..1000).map(|i| i % 7 != 0))));
    let strs = StringArray::from_iter_values((0..1000).map(|i| format!("row {i}")));
    let schema = Arc::new(Schema::new(vec![
        Field::new("i", DataType::Int64, true),
        Field::new("s", DataType::Utf8, false),
    ]));
    let b = RecordBatch::try_new(schema.clone(), vec![Arc::new(ints), Arc::new(strs)]).expect("batch");
    let expected: u64 = b.columns().iter().map(|c| all_buffer_bytes(&c.to_data())).sum();
    let mut w = TableWriter::new(schema);
    w.write(&b).expect("write");
    let t = w.finish().expect("finish");
    assert_eq!(t.stats.bytes_referenced, 0);
    assert_eq!(t.stats.bytes_copied, expected);
    assert_eq!(t.stats.buffers_copied, 4, "validity + values, offsets + data");
}

#[test]
fn reader_sees_the_writers_physical_frames() {
    if !is_root() {
        assert!(!in_ci(), "CI=true: this test must run as root (pagemap frame numbers need CAP_SYS_ADMIN)");
        eprintln!("not root: cannot read physical frame numbers from /proc/self/pagemap; run as root");
        return;
    }
    let arena = Arena::named("frames-test");
    let n = 1 << 20; // 8 MiB of values: 2048 pages
    let mut v = arena.vec::<i64>(n).expect("vec");
    v.spare_mut().iter_mut().enumerate().for_each(|(i, x)| *x = i as i64);
    v.set_len(n);
    let col = Int64Array::new(ScalarBuffer::from(v.finish()), None);
    let ptr = col.values().inner().as_ptr();
    let len = col.values().inner().len();
    let t = write_column(col);
    assert_eq!(t.stats.bytes_copied, 0);

    let ours = quiver_shm::pagemap::frames(ptr, len).expect("our frames");
    let peer = Peer::spawn("frames");
    let (reply, fds) = peer.exchange(&t);
    assert!(fds.is_empty());
    let reply = String::from_utf8(reply).expect("text");
    let (inside, frames) = reply.split_once(' ').expect("'inside frames'");
    assert_eq!(inside, "true", "the reader's buffer lies inside its mapping");
    let theirs: Vec<u64> = frames.split(',').map(|f| f.parse().expect(frames)).collect();
    assert_eq!(theirs.len(), ours.len());
    assert_eq!(theirs, ours, "writer and reader map the same physical frames");
}

#[test]
fn a_table_passed_on_is_referenced_not_copied() {
    // A function that returns (part of) its input: the columns it passes on already lie in
    // sealed segments it received, so writing them again references those segments.
    let arena = Arena::named("pass-on");
    let mut v = arena.vec::<i64>(10_000).expect("vec");
    v.extend_from_slice(&(0..10_000).collect::<Vec<i64>>()).expect("fill");
    let t = write_column(Int64Array::new(ScalarBuffer::from(v.finish()), None));
    let fds = t.segments.iter().map(|s| std::os::fd::AsFd::as_fd(s).try_clone_to_owned().expect("dup")).collect();
    let read = quiver_shm::sipc::read_table(&t.descriptor, fds, &Default::default()).expect("read");
    let passed = read.batches[0].slice(100, 5000);
    let mut w = TableWriter::new(passed.schema());
    w.write(&passed).expect("write");
    let again = w.finish().expect("finish");
    assert_eq!(again.stats.bytes_copied, 0, "{:?}", again.stats);
    assert_eq!(again.stats.bytes_referenced, 40_000, "just the slice's values, in place");
    assert_eq!(again.segments[0].size(), t.segments[0].size());
}

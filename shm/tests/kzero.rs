//! The kzero way, proven where the module is loaded: batches built on the ordinary heap cross to
//! a reader with zero whole pages copied, in the very same physical frames. Built only with the
//! `kzero-vm` feature, which tests/vm/run.sh enables for the static binary it runs in a VM with
//! the module loaded (this host's kernel cannot load modules); there every test needs the
//! device and fails without it.

use std::os::fd::AsFd;
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use quiver_shm::kzero::{self, Device};
use quiver_shm::mapping::page_size;
use quiver_shm::pagemap::frames;
use quiver_shm::sipc::{KernelMove, ReadOptions, TableWriter, read_table};
use quiver_shm::{SealedSegment, ShmError};

/// The device; the tests run only where the module is loaded, so its absence is a failure.
fn device() -> Device {
    match Device::open() {
        Ok(Some(d)) => d,
        Ok(None) => panic!("{} is absent: these tests run in tests/vm/run.sh with the module loaded", kzero::DEVICE_PATH),
        Err(e) => panic!("opening the kzero device: {e}"),
    }
}

fn heap_batch(rows: usize) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("x", DataType::Float64, true),
        Field::new("s", DataType::Utf8, false),
    ]));
    let id = Int64Array::from_iter_values(0..rows as i64);
    let x = Float64Array::from_iter((0..rows).map(|i| (i % 7 != 0).then_some(i as f64 * 0.5)));
    let s = StringArray::from_iter_values((0..rows).map(|i| format!("row-{i}")));
    RecordBatch::try_new(schema, vec![Arc::new(id) as ArrayRef, Arc::new(x), Arc::new(s)]).expect("batch")
}

#[test]
fn kzero_heap_batch_moves_whole_pages_without_a_copy() {
    let dev = device();
    let before_stats = dev.stats().expect("stats");
    let b = heap_batch(500_000);
    let values = b.column(0).to_data().buffers()[0].clone();
    let frames_before = frames(values.as_ptr(), values.len()).expect("frames (run as root)");

    let mut w = TableWriter::new(b.schema());
    w.write(&b).expect("write");
    let t = w.finish().expect("finish");
    let s = t.stats;
    let page = page_size() as u64;
    assert!(s.buffers_moved >= 4, "{s:?}");
    assert!(s.bytes_moved > 8 << 20, "{s:?}");
    // Only the sub-page heads and tails of moved buffers are copied, and the small ones.
    assert!(s.bytes_copied <= 2 * page * s.buffers_moved + (64 << 10), "{s:?}");
    let after_stats = dev.stats().expect("stats");
    assert_eq!(after_stats.pages_copied, before_stats.pages_copied, "no page was shared, none copied");

    // The writer still reads its buffer, from the same frames.
    let frames_after = frames(values.as_ptr(), values.len()).expect("frames");
    let whole = |f: &[u64]| f[1..f.len() - 1].to_vec();
    assert_eq!(whole(&frames_before), whole(&frames_after), "the writer's frames changed");

    // A reader maps the sealed kzero file and sees the same values in the same frames.
    let fds = t.segments.into_iter().map(|s| s.into_fd()).collect();
    let r = read_table(&t.descriptor, fds, &ReadOptions::default()).expect("read");
    assert_eq!(r.batches.len(), 1);
    assert_eq!(r.batches[0], b, "the reader sees other values");
    let read_values = r.batches[0].column(0).to_data().buffers()[0].clone();
    assert_ne!(read_values.as_ptr(), values.as_ptr(), "the reader has its own mapping");
    let frames_read = frames(read_values.as_ptr(), read_values.len()).expect("frames");
    assert_eq!(whole(&frames_read), whole(&frames_before), "the reader's frames are not the writer's");
}

#[test]
fn kzero_buffer_used_twice_is_moved_once() {
    let _dev = device();
    let col: ArrayRef = Arc::new(Int64Array::from_iter_values(0..200_000));
    let schema = Arc::new(Schema::new(vec![
        Field::new("a", DataType::Int64, false),
        Field::new("b", DataType::Int64, false),
    ]));
    let b = RecordBatch::try_new(schema.clone(), vec![col.clone(), col]).expect("batch");
    let mut w = TableWriter::new(schema);
    w.write(&b).expect("write");
    let t = w.finish().expect("finish");
    assert_eq!(t.stats.buffers_moved, 2, "{:?}", t.stats);
    assert_eq!(t.segments.len(), 1);
    let fds = t.segments.into_iter().map(|s| s.into_fd()).collect();
    let r = read_table(&t.descriptor, fds, &ReadOptions::default()).expect("read");
    assert_eq!(r.batches[0], b);
}

#[test]
fn kzero_file_is_a_segment_only_once_sealed() {
    let dev = device();
    let file = dev.new_file().expect("new file");
    let unsealed = file.try_clone().expect("dup");
    match SealedSegment::from_fd(unsealed) {
        Err(ShmError::BadSegment { reason, .. }) => assert!(reason.contains("not sealed"), "{reason}"),
        other => panic!("an unsealed kzero file was accepted: {other:?}"),
    }
    kzero::add_seals(file.as_fd(), kzero::SEAL_ALL).expect("seal");
    let (seals, size) = kzero::seals(file.as_fd()).expect("seals");
    assert_eq!((seals, size), (kzero::SEAL_ALL, 0));
    SealedSegment::from_fd(file).expect("a sealed kzero file is a segment");
}

#[test]
fn kzero_refusals_have_typed_errors() {
    let dev = device();
    let file = dev.new_file().expect("new file");
    let v = vec![1u8; 3 * page_size()];
    let addr = (v.as_ptr() as usize).next_multiple_of(page_size());
    // SAFETY: the kernel refuses each range below before touching it.
    unsafe {
        assert!(matches!(dev.deanon(file.as_fd(), addr + 1, page_size(), 0), Err(kzero::KzeroError::Invalid)));
        assert!(matches!(dev.deanon(file.as_fd(), addr, 0, 0), Err(kzero::KzeroError::Invalid)));
        assert!(matches!(
            dev.deanon(file.as_fd(), usize::MAX - page_size() + 1, 2 * page_size(), 0),
            Err(kzero::KzeroError::Overflow)
        ));
        let not_ours = std::fs::File::open("/proc/self/stat").expect("open");
        assert!(matches!(dev.deanon(not_ours.as_fd(), addr, page_size(), 0), Err(kzero::KzeroError::Invalid)));
    }
    kzero::add_seals(file.as_fd(), kzero::SEAL_GROW).expect("seal");
    // SAFETY: refused (sealed against growth) before the range is touched.
    let r = unsafe { dev.deanon(file.as_fd(), addr, page_size(), kzero::DEANON_PRIVATE) };
    assert!(matches!(r, Err(kzero::KzeroError::NotPermitted)), "{r:?}");
}

#[test]
fn kzero_writer_without_the_module_way_copies() {
    let _dev = device();
    assert!(KernelMove::if_available().is_some());
    let b = heap_batch(100_000);
    let mut w = TableWriter::copying(b.schema());
    w.write(&b).expect("write");
    let t = w.finish().expect("finish");
    assert_eq!(t.stats.buffers_moved, 0);
    assert!(t.stats.bytes_copied > 0);
}

/// Not a pass/fail check of speed (the VM emulates its CPU): prints how long writing a
/// heap-built table takes with the module and with the copy way, for docs/benchmarks.md.
#[test]
fn kzero_heap_table_move_versus_copy_timing() {
    let _dev = device();
    for rows in [100_000usize, 1_000_000, 4_000_000] {
        let b = heap_batch(rows);
        let t0 = std::time::Instant::now();
        let mut w = TableWriter::copying(b.schema());
        w.write(&b).expect("write");
        let copied = w.finish().expect("finish");
        let t1 = std::time::Instant::now();
        let mut w = TableWriter::new(b.schema());
        w.write(&b).expect("write");
        let moved = w.finish().expect("finish");
        let t2 = std::time::Instant::now();
        let (c, m) = ((t1 - t0).as_secs_f64() * 1e3, (t2 - t1).as_secs_f64() * 1e3);
        println!(
            "# kzero bench: {rows} rows, {} MiB: copy {c:.1} ms ({} B copied), kzero {m:.1} ms ({} B moved, {} B copied), ratio {:.2}",
            (copied.stats.bytes_copied >> 20),
            copied.stats.bytes_copied,
            moved.stats.bytes_moved,
            moved.stats.bytes_copied,
            c / m
        );
        assert_eq!(moved.stats.bytes_moved + moved.stats.bytes_copied, copied.stats.bytes_copied);
    }
}

//! The interposed C allocator: inside a malloc scope C allocations land in the arena and are
//! handed on by reference; outside one, and on other threads, they stay glibc's; `free` and
//! `realloc` route each pointer back to whoever made it.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::Arc;

use arrow_array::{ArrayRef, Int64Array, RecordBatch};
use arrow_buffer::{Buffer, ScalarBuffer};
use arrow_schema::{DataType, Field, Schema};
use quiver_shm::sipc::TableWriter;
use quiver_shm::{Arena, ArenaAlloc, live_chunks};

#[global_allocator]
static ALLOC: ArenaAlloc = ArenaAlloc::new(4096);

quiver_shm::interpose_malloc!();

/// The chunk count is process-wide: tests that compare it take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Memory a C library returned, freed with C's `free` (as an Arrow C-data release would).
struct CAlloc(*mut c_void);

// SAFETY: the pointer is only freed, once, from whichever thread drops the owner.
unsafe impl Send for CAlloc {}
// SAFETY: shared access never touches the pointer.
unsafe impl Sync for CAlloc {}

impl Drop for CAlloc {
    fn drop(&mut self) {
        // SAFETY: the pointer came from libc::malloc/realloc and is freed exactly once.
        unsafe { libc::free(self.0) }
    }
}

/// n values 0..n in C memory, as an Int64 column whose buffer is that memory.
fn c_column(n: usize) -> Int64Array {
    // SAFETY: a plain C allocation of n i64s, filled before use.
    let p = unsafe { libc::malloc(n * 8) } as *mut i64;
    assert!(!p.is_null());
    for i in 0..n {
        // SAFETY: i < n, inside the allocation.
        unsafe { p.add(i).write(i as i64) };
    }
    let owner = Arc::new(CAlloc(p.cast()));
    // SAFETY: p points to n*8 initialised bytes that stay alive as long as `owner`.
    let buf = unsafe { Buffer::from_custom_allocation(NonNull::new(p.cast()).expect("non-null"), n * 8, owner) };
    Int64Array::new(ScalarBuffer::new(buf, 0, n), None)
}

fn write(col: Int64Array) -> quiver_shm::sipc::WriteStats {
    let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
    let b = RecordBatch::try_new(schema.clone(), vec![Arc::new(col) as ArrayRef]).expect("batch");
    let mut w = TableWriter::new(schema);
    w.write(&b).expect("write");
    w.finish().expect("finish").stats
}

#[test]
fn c_allocations_in_scope_are_referenced_and_freed() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let before = live_chunks();
    {
        let arena = Arena::named("cmalloc-test");
        // Both a large column and a tiny one: in a scope the size does not matter.
        let (big, small) = arena.malloc_scope(|| (c_column(100_000), c_column(3)));
        let s = write(big);
        assert_eq!((s.bytes_copied, s.bytes_referenced), (0, 800_000));
        let s = write(small);
        assert_eq!((s.bytes_copied, s.bytes_referenced), (0, 24));
    }
    assert_eq!(live_chunks(), before, "every chunk is gone once its C allocations are freed");
}

#[test]
fn c_allocations_outside_scope_or_on_other_threads_are_glibcs() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let arena = Arena::named("cmalloc-outside");
    assert_eq!(write(c_column(10_000)).bytes_copied, 80_000);
    let other = arena.malloc_scope(|| std::thread::spawn(|| c_column(10_000)).join().expect("thread"));
    assert_eq!(write(other).bytes_copied, 80_000, "the scope is the calling thread's only");
}

#[test]
fn realloc_keeps_contents_in_and_out_of_the_arena() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let arena = Arena::named("cmalloc-realloc");
    let before = live_chunks();
    let p = arena.malloc_scope(|| {
        // SAFETY: plain C allocation calls on pointers we own.
        unsafe {
            let mut p = libc::malloc(16) as *mut u8;
            for i in 0..16 {
                p.add(i).write(i as u8);
            }
            // Grows in place (last allocation of its chunk), then moves past a neighbour.
            p = libc::realloc(p.cast(), 4096) as *mut u8;
            let neighbour = libc::malloc(64);
            p = libc::realloc(p.cast(), 1 << 20) as *mut u8;
            libc::free(neighbour);
            p
        }
    });
    assert!(live_chunks() > before, "scoped allocations live in arena chunks");
    // SAFETY: p holds at least 16 bytes written above; outside the scope realloc moves it to
    // glibc, which free then takes.
    unsafe {
        let p = libc::realloc(p.cast(), 2 << 20) as *mut u8;
        assert!(!p.is_null());
        assert_eq!(std::slice::from_raw_parts(p, 16), &(0..16).collect::<Vec<u8>>()[..]);
        libc::free(p.cast());
    }
    arena.retire_current();
    assert_eq!(live_chunks(), before);
}

//! The process-wide mode of the C allocator (what `libquiver_preload.so` turns on in Python
//! function processes): large allocations from any thread and any entry point land
//! page-aligned in the process's arena and are referenced by the writer; `free` gives their
//! pages back; a forked child never touches its parent's arena.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::Arc;

use arrow_array::{ArrayRef, Int64Array, RecordBatch};
use arrow_buffer::{Buffer, ScalarBuffer};
use arrow_schema::{DataType, Field, Schema};
use quiver_shm::cmalloc;
use quiver_shm::sipc::TableWriter;

quiver_shm::interpose_malloc!();

const THRESHOLD: usize = 64 << 10;

fn page() -> usize {
    quiver_shm::mapping::page_size()
}

/// Tests take turns: one measures the process's memory, another forks (no other test thread
/// may hold an allocator lock then).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn enable() -> std::sync::MutexGuard<'static, ()> {
    let g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    cmalloc::enable_process_arena(THRESHOLD);
    g
}

/// Resident memfd (shmem) pages of this process, from /proc/self/status.
fn rss_shmem_kb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix("RssShmem:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssShmem")
}

struct CAlloc(*mut c_void);
// SAFETY: only freed, once, by whichever thread drops it.
unsafe impl Send for CAlloc {}
// SAFETY: shared access never touches the pointer.
unsafe impl Sync for CAlloc {}
impl Drop for CAlloc {
    fn drop(&mut self) {
        // SAFETY: from libc::malloc, freed once.
        unsafe { libc::free(self.0) }
    }
}

#[test]
fn large_allocations_are_page_aligned_arena_memory_the_writer_references() {
    let _g = enable();
    let n = 100_000usize;
    // SAFETY: a plain allocation, filled before use.
    let p = unsafe { libc::malloc(n * 8) } as *mut i64;
    assert!(!p.is_null());
    assert_eq!(p as usize % page(), 0, "page-aligned");
    for i in 0..n {
        // SAFETY: inside the allocation.
        unsafe { p.add(i).write(i as i64) };
    }
    // SAFETY: p holds n initialised i64s owned by the CAlloc.
    let buf = unsafe { Buffer::from_custom_allocation(NonNull::new(p.cast()).expect("p"), n * 8, Arc::new(CAlloc(p.cast()))) };
    let col: ArrayRef = Arc::new(Int64Array::new(ScalarBuffer::new(buf, 0, n), None));
    let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
    let b = RecordBatch::try_new(schema.clone(), vec![col]).expect("batch");
    let mut w = TableWriter::new(schema);
    w.write(&b).expect("write");
    let t = w.finish().expect("finish");
    assert_eq!(t.stats.bytes_copied, 0);
    assert_eq!(t.stats.bytes_referenced, (n * 8) as u64);
}

#[test]
fn small_allocations_stay_on_the_heap() {
    let _g = enable();
    // SAFETY: malloc/free pairs.
    unsafe {
        let p = libc::malloc(100);
        assert!(!p.is_null());
        assert!(cmalloc::malloc_usable_size(p) >= 100);
        let big = libc::malloc(THRESHOLD);
        assert_eq!(big as usize % page(), 0);
        assert_eq!(cmalloc::malloc_usable_size(big), THRESHOLD);
        libc::free(big);
        libc::free(p);
    }
}

#[test]
fn every_entry_point_is_served_and_freed() {
    let _g = enable();
    let size = 3 * THRESHOLD + 5;
    // SAFETY: each block is checked, used within its size and freed once.
    unsafe {
        let c = cmalloc::calloc(size, 1) as *mut u8;
        assert_eq!(c as usize % page(), 0);
        assert!(std::slice::from_raw_parts(c, size).iter().all(|&b| b == 0));
        for align in [16usize, 64, 4096] {
            let m = cmalloc::memalign(align, size);
            assert_eq!(m as usize % align.max(page()), 0);
            libc::free(m);
            let mut out = std::ptr::null_mut();
            assert_eq!(cmalloc::posix_memalign(&mut out, align, size), 0);
            assert_eq!(out as usize % page(), 0);
            libc::free(out);
        }
        let mut out = std::ptr::null_mut();
        assert_eq!(cmalloc::posix_memalign(&mut out, 3, size), libc::EINVAL);
        libc::free(c.cast());
    }
}

#[test]
fn calloc_after_a_shrink_still_reads_zero() {
    let _g = enable();
    let size = 8 * THRESHOLD;
    // SAFETY: blocks used within their sizes, freed once.
    unsafe {
        let a = libc::malloc(size) as *mut u8;
        std::ptr::write_bytes(a, 0xAB, size);
        // Shrinking gives the tail back; a calloc that lands there must see zeros.
        let a2 = libc::realloc(a.cast(), THRESHOLD) as *mut u8;
        assert_eq!(a2, a, "shrinks in place");
        assert!(std::slice::from_raw_parts(a2, THRESHOLD).iter().all(|&b| b == 0xAB));
        let c = cmalloc::calloc(size, 1) as *mut u8;
        assert!(std::slice::from_raw_parts(c, size).iter().all(|&b| b == 0), "calloc memory is zero");
        libc::free(c.cast());
        libc::free(a2.cast());
    }
}

#[test]
fn realloc_keeps_contents_across_moves_and_into_the_arena() {
    let _g = enable();
    // SAFETY: blocks used within their sizes, freed once.
    unsafe {
        // A heap block grown past the threshold moves into the arena with its bytes.
        let h = libc::malloc(1000) as *mut u8;
        for i in 0..1000 {
            h.add(i).write(i as u8);
        }
        let a = libc::realloc(h.cast(), 4 * THRESHOLD) as *mut u8;
        assert_eq!(a as usize % page(), 0, "now in the arena");
        assert!((0..1000).all(|i| *a.add(i) == i as u8));
        // Another block after it, so growing `a` must move it.
        let other = libc::malloc(THRESHOLD);
        let b = libc::realloc(a.cast(), 64 * THRESHOLD) as *mut u8;
        assert!((0..1000).all(|i| *b.add(i) == i as u8));
        assert_eq!(cmalloc::malloc_usable_size(b.cast()), 64 * THRESHOLD);
        libc::free(other);
        libc::free(b.cast());
    }
}

#[test]
fn free_returns_the_pages() {
    let _g = enable();
    let size = 64 << 20;
    let before = rss_shmem_kb();
    // SAFETY: one block, written within its size, freed once.
    unsafe {
        let p = libc::malloc(size) as *mut u8;
        std::ptr::write_bytes(p, 1, size);
        let during = rss_shmem_kb();
        assert!(during >= before + (size as u64 >> 10) / 2, "before {before} kB, during {during} kB");
        libc::free(p.cast());
        let after = rss_shmem_kb();
        assert!(after + (size as u64 >> 10) / 2 <= during, "during {during} kB, after {after} kB");
    }
}

#[test]
fn a_forked_child_never_touches_its_parents_arena() {
    let _g = enable();
    let size = 4 * THRESHOLD;
    // SAFETY: tests take turns (SERIAL), so no other test thread holds an allocator lock at
    // the fork; the child uses our allocator and raw calls, then _exit.
    unsafe {
        let p = libc::malloc(size) as *mut u8;
        std::ptr::write_bytes(p, 0x5A, size);
        let pid = libc::fork();
        assert!(pid >= 0);
        if pid == 0 {
            // Freeing the parent's block must not punch its pages (nor crash: they are not
            // mapped here), and the child's own arena is a fresh one at other addresses.
            libc::free(p.cast());
            cmalloc::enable_process_arena(THRESHOLD);
            let q = libc::malloc(size) as *mut u8;
            let fresh = !q.is_null() && (q as usize).is_multiple_of(page()) && (q as usize).abs_diff(p as usize) >= size;
            if fresh {
                std::ptr::write_bytes(q, 0x11, size);
                libc::free(q.cast());
            }
            libc::_exit(if fresh { 0 } else { 3 });
        }
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child status {status:#x}");
        assert!(std::slice::from_raw_parts(p, size).iter().all(|&b| b == 0x5A), "the parent's block is intact");
        libc::free(p.cast());
    }
}

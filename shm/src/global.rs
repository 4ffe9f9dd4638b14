//! A global allocator that serves large allocations from the current thread's arena, so that
//! any Rust code (Arrow builders and kernels, the Parquet decoder) writes its output buffers
//! straight into shareable memory.
//!
//! ```
//! use std::sync::Arc;
//! use arrow_array::{ArrayRef, Int64Array, RecordBatch};
//! use quiver_shm::{Arena, ArenaAlloc, sipc::TableWriter};
//!
//! #[global_allocator]
//! static ALLOC: ArenaAlloc = ArenaAlloc::new(64 << 10);
//!
//! fn main() {
//!     let arena = Arena::named("producer");
//!     // Plain Arrow code: its buffers land in the arena.
//!     let batch = arena.scope(|| {
//!         let col: ArrayRef = Arc::new(Int64Array::from_iter_values(0..100_000));
//!         RecordBatch::try_from_iter([("x", col)]).unwrap()
//!     });
//!     let mut w = TableWriter::new(batch.schema());
//!     w.write(&batch).unwrap();
//!     assert_eq!(w.finish().unwrap().stats.bytes_copied, 0);
//! }
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::thread::LocalKey;
use std::sync::Arc;

use crate::arena::{Arena, ArenaInner};
use crate::registry;

thread_local! {
    static SCOPE: Cell<*const ArenaInner> = const { Cell::new(std::ptr::null()) };
}

/// Routes allocations made inside [`Arena::scope`] to that arena when they are aligned to at
/// least [`crate::ALIGN`] (every Arrow `MutableBuffer`) or at least `threshold` bytes long (large
/// `Vec`s that become Arrow buffers); everything else goes to the system allocator.
///
/// Small objects (reference counts, vectors of columns) stay on the heap because a chunk turns
/// read-only once a table in it is written: state that must stay writable after that belongs
/// outside the scope or below the threshold.
#[derive(Debug)]
pub struct ArenaAlloc {
    threshold: usize,
}

impl ArenaAlloc {
    /// An allocator that also sends unaligned allocations of `threshold` bytes or more to the
    /// scoped arena.
    pub const fn new(threshold: usize) -> Self {
        ArenaAlloc { threshold }
    }

    fn scoped(&self, layout: Layout) -> Option<*const ArenaInner> {
        let wanted = layout.align() >= crate::ALIGN || layout.size() >= self.threshold;
        if !wanted || layout.size() == 0 || registry::in_arena() {
            return None;
        }
        let p = SCOPE.try_with(|s| s.get()).ok()?;
        (!p.is_null()).then_some(p)
    }
}

// SAFETY: every pointer returned is either System's or a fresh, suitably aligned arena region of
// at least layout.size() bytes that stays mapped while its chunk has live allocations; dealloc
// routes each pointer back to whoever produced it by address.
unsafe impl GlobalAlloc for ArenaAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if let Some(inner) = self.scoped(layout) {
            let _g = registry::InArena::enter();
            // SAFETY: the scope guard holds an Arc to the arena for as long as SCOPE points to it.
            let inner = unsafe { &*inner };
            if let Ok((chunk, off)) = inner.alloc_raw(layout.size(), layout.align()) {
                // SAFETY: off + size lies inside the chunk's mapping.
                return unsafe { chunk.base().add(off) as *mut u8 };
            }
        }
        // System calls C's malloc, which a malloc scope (crate::cmalloc) would send to the
        // arena; Rust's own small objects belong on the heap.
        let _g = registry::InArena::enter();
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !registry::in_arena()
            && let Some((chunk, off)) = registry::find(ptr, layout.size().max(1))
        {
            chunk.release(off, layout.size());
            return;
        }
        let _g = registry::InArena::enter();
        // SAFETY: not an arena pointer, so System produced it with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !registry::in_arena()
            && let Some((chunk, off)) = registry::find(ptr, layout.size().max(1))
            && chunk.resize_in_place(off, layout.size(), new_size)
        {
            return ptr;
        }
        // SAFETY: the new layout is valid (the caller guarantees new_size fits isize with align).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: forwarded to our own alloc, copy and dealloc, as the default realloc does.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

/// A thread's current arena for one allocator (this one's, or `crate::cmalloc`'s).
pub(crate) type ScopeKey = LocalKey<Cell<*const ArenaInner>>;

/// Makes `arena` the current one in `key` until dropped, then restores the previous one.
pub(crate) struct ScopeGuard {
    key: &'static ScopeKey,
    prev: *const ArenaInner,
    _arena: Arc<ArenaInner>,
}

impl ScopeGuard {
    pub(crate) fn enter(key: &'static ScopeKey, arena: &Arena) -> ScopeGuard {
        let arena = arena.inner().clone();
        let prev = key.with(|s| s.replace(Arc::as_ptr(&arena)));
        ScopeGuard { key, prev, _arena: arena }
    }
}

impl Drop for ScopeGuard {
    fn drop(&mut self) {
        self.key.with(|s| s.set(self.prev));
    }
}

impl Arena {
    /// Runs `f` with this arena as the target of [`ArenaAlloc`] on the current thread. Without
    /// `ArenaAlloc` installed as the global allocator this just runs `f`.
    pub fn scope<R>(&self, f: impl FnOnce() -> R) -> R {
        let _g = ScopeGuard::enter(&SCOPE, self);
        f()
    }
}

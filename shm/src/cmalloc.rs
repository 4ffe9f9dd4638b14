//! The arena for C and C++ code: `malloc`, `realloc` and `free` that serve allocations made
//! inside [`Arena::malloc_scope`] from that arena, so a C library's output (DuckDB's Arrow
//! export) is born in shareable memory and handed on by reference.
//!
//! A binary opts in with [`crate::interpose_malloc!`], which defines the C symbols; its own
//! definitions take precedence over glibc's for every library in the process. Outside a scope
//! every call goes straight to glibc (`__libc_malloc` and friends), so the cost elsewhere is one
//! thread-local read per `malloc` and an address-range check per `free`.
//!
//! Scopes are meant to be narrow: everything the scoped thread allocates lands in the arena,
//! including a library's own bookkeeping, and a chunk turns read-only once a table in it is
//! written. Memory a library writes to after that (DuckDB's array holders on release) must not
//! be released before the process exits; see the SQL worker.
//!
//! Each arena allocation carries a [`HEADER`]-byte header before the pointer with its size,
//! because `free` is not told one. `calloc`, `posix_memalign` and `aligned_alloc` are not
//! interposed: they always come from glibc, and our `free` hands them back to it.

use std::cell::Cell;
use std::ffi::c_void;
use std::sync::Arc;

use crate::arena::{Arena, ArenaInner};
use crate::global::ScopeGuard;
use crate::registry;

/// Bytes before each arena allocation holding its size (keeps the pointer 64-byte aligned).
pub const HEADER: usize = crate::ALIGN;

/// Marks a header written by [`malloc`], so a foreign pointer into a chunk is caught.
const MAGIC: u64 = 0x7175_6976_6572_6d61; // "quiverma"

unsafe extern "C" {
    fn __libc_malloc(size: usize) -> *mut c_void;
    fn __libc_realloc(ptr: *mut c_void, size: usize) -> *mut c_void;
    fn __libc_free(ptr: *mut c_void);
}

thread_local! {
    static SCOPE: Cell<*const ArenaInner> = const { Cell::new(std::ptr::null()) };
}

impl Arena {
    /// Runs `f` with this arena serving every `malloc` and `realloc` of the current thread.
    /// Without [`crate::interpose_malloc!`] in the binary this just runs `f`.
    pub fn malloc_scope<R>(&self, f: impl FnOnce() -> R) -> R {
        let _g = ScopeGuard::enter(&SCOPE, self);
        f()
    }
}

fn scoped() -> Option<*const ArenaInner> {
    if registry::in_arena() {
        return None;
    }
    let p = SCOPE.try_with(|s| s.get()).ok()?;
    (!p.is_null()).then_some(p)
}

/// An arena allocation of `size` bytes, or null when the arena cannot serve it.
fn arena_malloc(inner: *const ArenaInner, size: usize) -> *mut c_void {
    let _g = registry::InArena::enter();
    // SAFETY: the scope guard holds an Arc to the arena for as long as SCOPE points to it.
    let inner = unsafe { &*inner };
    let Some(total) = size.checked_add(HEADER) else { return std::ptr::null_mut() };
    match inner.alloc_raw(total, crate::ALIGN) {
        Ok((chunk, off)) => {
            // SAFETY: [off, off + total) lies in the chunk's writable mapping, which this fresh
            // allocation owns; the header is 64-byte aligned, so the u64 writes are aligned.
            unsafe {
                let base = chunk.base().add(off) as *mut u64;
                base.write(MAGIC);
                base.add(1).write(size as u64);
                (base as *mut u8).add(HEADER) as *mut c_void
            }
        }
        Err(_) => std::ptr::null_mut(),
    }
}

/// The arena allocation `ptr` points to: its chunk, the offset of its header and its size.
fn lookup(ptr: *mut c_void) -> Option<(Arc<crate::Chunk>, usize, usize)> {
    if ptr.is_null() || registry::in_arena() {
        return None;
    }
    let (chunk, off) = registry::find(ptr as *const u8, 1)?;
    let head = off.checked_sub(HEADER)?;
    // SAFETY: the header lies in the same live chunk, before ptr; chunks stay readable (also
    // once frozen) while registered.
    let (magic, size) = unsafe {
        let base = chunk.base().add(head) as *const u64;
        (base.read(), base.add(1).read())
    };
    if magic != MAGIC {
        // A pointer into a chunk that `malloc` did not hand out: freeing it would corrupt the
        // arena, and giving it to glibc would corrupt the heap.
        eprintln!("quiver-shm: free() of a pointer into an arena chunk that malloc did not return");
        std::process::abort();
    }
    Some((chunk, head, size as usize))
}

/// `malloc`: from the scoped arena inside [`Arena::malloc_scope`], else glibc's.
///
/// # Safety
/// As C's `malloc`.
pub unsafe fn malloc(size: usize) -> *mut c_void {
    if let Some(inner) = scoped() {
        let p = arena_malloc(inner, size);
        if !p.is_null() {
            return p;
        }
    }
    // SAFETY: forwarded unchanged.
    unsafe { __libc_malloc(size) }
}

/// `free`: returns arena allocations to their chunk, everything else to glibc.
///
/// # Safety
/// As C's `free`: `ptr` is null or a live allocation of this process's `malloc` family.
pub unsafe fn free(ptr: *mut c_void) {
    if let Some((chunk, head, size)) = lookup(ptr) {
        chunk.release(head, size + HEADER);
        return;
    }
    // SAFETY: not an arena pointer, so glibc produced it.
    unsafe { __libc_free(ptr) }
}

/// `realloc`: arena allocations grow in place when they are their chunk's last, or move (to
/// the arena inside a scope, to glibc outside one); glibc's stay glibc's.
///
/// # Safety
/// As C's `realloc`.
pub unsafe fn realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    let Some((chunk, head, old)) = lookup(ptr) else {
        if ptr.is_null() {
            // SAFETY: realloc(NULL, n) is malloc(n).
            return unsafe { malloc(size) };
        }
        // SAFETY: a glibc pointer, forwarded unchanged.
        return unsafe { __libc_realloc(ptr, size) };
    };
    if size == 0 {
        chunk.release(head, old + HEADER);
        return std::ptr::null_mut();
    }
    if chunk.resize_in_place(head, old + HEADER, size + HEADER) {
        // SAFETY: the chunk is writable (resize_in_place refuses frozen chunks) and the header
        // is ours.
        unsafe { (chunk.base().add(head) as *mut u64).add(1).write(size as u64) };
        return ptr;
    }
    // SAFETY: a fresh allocation of `size` bytes; the old one holds `old` readable bytes.
    unsafe {
        let new = malloc(size);
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr as *const u8, new as *mut u8, old.min(size));
            chunk.release(head, old + HEADER);
        }
        new
    }
}

/// Defines the C symbols `malloc`, `realloc` and `free` in this binary as
/// [`crate::cmalloc`]'s, so that C and C++ code allocates in the arena inside
/// [`Arena::malloc_scope`]. Use it once, in a binary crate.
#[macro_export]
macro_rules! interpose_malloc {
    () => {
        /// C `malloc`, routed through quiver-shm's arena inside a malloc scope.
        ///
        /// # Safety
        /// As C's `malloc`.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn malloc(size: usize) -> *mut ::std::ffi::c_void {
            // SAFETY: same contract.
            unsafe { $crate::cmalloc::malloc(size) }
        }

        /// C `free`, routed through quiver-shm's arena.
        ///
        /// # Safety
        /// As C's `free`.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn free(ptr: *mut ::std::ffi::c_void) {
            // SAFETY: same contract.
            unsafe { $crate::cmalloc::free(ptr) }
        }

        /// C `realloc`, routed through quiver-shm's arena.
        ///
        /// # Safety
        /// As C's `realloc`.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn realloc(ptr: *mut ::std::ffi::c_void, size: usize) -> *mut ::std::ffi::c_void {
            // SAFETY: same contract.
            unsafe { $crate::cmalloc::realloc(ptr, size) }
        }
    };
}

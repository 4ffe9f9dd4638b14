//! The arena for C and C++ code: `malloc`, `realloc` and `free` that serve allocations made
//! inside [`Arena::malloc_scope`] from that arena, so a C library's output (DuckDB's Arrow
//! export) is born in shareable memory and handed on by reference.
//!
//! A binary opts in with [`crate::interpose_malloc!`], which defines the C symbols; its own
//! definitions take precedence over glibc's for every library in the process. Outside a scope
//! every call goes straight to glibc (`__libc_malloc` and friends), so the cost elsewhere is a
//! thread-local read and an atomic load per `malloc` and an address-range check per `free`.
//!
//! Scopes are meant to be narrow: everything the scoped thread allocates lands in the arena,
//! including a library's own bookkeeping, and a chunk turns read-only once a table in it is
//! written. Memory a library writes to after that (DuckDB's array holders on release) must not
//! be released before the process exits; see the SQL worker.
//!
//! Each arena allocation carries a [`HEADER`]-byte header right before the pointer with its
//! size and where its block starts, because `free` is not told one. In a scope, `calloc`,
//! `posix_memalign` and `aligned_alloc` are not served: they come from glibc, and our `free`
//! hands them back to it.
//!
//! **Process-wide mode.** A function process that is not written in Rust (a Python function
//! with pandas or pyarrow) has no scope to enter: [`enable_process_arena`] makes every
//! allocation of at least a threshold, from any thread and any entry point (`malloc`,
//! `calloc`, `realloc`, the aligned ones), come from one arena of the process. Those blocks
//! are page-aligned whole pages, with one extra page in front holding the header, so `free`
//! punches every page of the block out and the memory returns at once, and any alignment up to
//! a page is met. Space past a chunk's bump pointer is always zero (fresh, or punched before a
//! shrink moves the pointer back), so `calloc` needs no `memset`. The mode is fork-safe: it
//! belongs to the process that enabled it; a forked child neither allocates from nor punches
//! its parent's chunks (they are shared memory), and gets a fresh arena by enabling again.

use std::cell::Cell;
use std::ffi::c_void;
use std::sync::Arc;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use crate::arena::{Arena, ArenaInner, ArenaOptions, Chunk};
use crate::global::ScopeGuard;
use crate::mapping::page_size;
use crate::registry;

/// Bytes before each arena allocation holding its size (keeps the pointer 64-byte aligned).
pub const HEADER: usize = crate::ALIGN;

/// Marks a header written by [`malloc`], so a foreign pointer into a chunk is caught.
const MAGIC: u64 = 0x7175_6976_6572_6d61; // "quiverma"

/// Threshold of the process-wide mode when neither the caller nor `QUIVER_ARENA_THRESHOLD`
/// gives one.
pub const DEFAULT_THRESHOLD: usize = 64 << 10;

unsafe extern "C" {
    fn __libc_malloc(size: usize) -> *mut c_void;
    fn __libc_calloc(n: usize, size: usize) -> *mut c_void;
    fn __libc_realloc(ptr: *mut c_void, size: usize) -> *mut c_void;
    fn __libc_memalign(align: usize, size: usize) -> *mut c_void;
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

/// The process-wide arena: leaked on purpose, since any thread may be inside it at any time.
struct ProcessArena {
    arena: Arena,
    threshold: usize,
    pid: u32,
}

static PROCESS: AtomicPtr<ProcessArena> = AtomicPtr::new(std::ptr::null_mut());

/// Makes every allocation of at least `threshold` bytes (0: `QUIVER_ARENA_THRESHOLD`, else
/// [`DEFAULT_THRESHOLD`]), on every thread, come page-aligned from a fresh arena of this
/// process. Only has an effect where this module's functions are the process's C allocator
/// (an `LD_PRELOAD` interposer, or [`crate::interpose_malloc!`] for `malloc`/`realloc`/`free`).
/// Enabling again in the same process changes only the threshold; in a forked child it starts
/// the child's own arena. Returns the arena.
pub fn enable_process_arena(threshold: usize) -> Arena {
    let _g = registry::InArena::enter();
    let threshold = match threshold {
        0 => std::env::var("QUIVER_ARENA_THRESHOLD")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&t| t > 0)
            .unwrap_or(DEFAULT_THRESHOLD),
        t => t,
    };
    let pid = std::process::id();
    let cur = PROCESS.load(Ordering::Acquire);
    // SAFETY: PROCESS only ever holds null or a leaked, never-freed ProcessArena.
    if let Some(p) = unsafe { cur.as_ref() }
        && p.pid == pid
    {
        if p.threshold == threshold {
            return p.arena.clone();
        }
        // A new record with the same arena: the old one stays valid for threads reading it.
        let next = Box::into_raw(Box::new(ProcessArena { arena: p.arena.clone(), threshold, pid }));
        PROCESS.store(next, Ordering::Release);
        return p.arena.clone();
    }
    let name = format!("quiver-fn-{pid}");
    let arena = Arena::new(ArenaOptions { name, ..Default::default() });
    let next = Box::into_raw(Box::new(ProcessArena { arena: arena.clone(), threshold, pid }));
    // A parent's record (after fork) is leaked in the child: its chunks are shared memory the
    // child must not touch, and they stay mapped until exec or exit.
    PROCESS.store(next, Ordering::Release);
    arena
}

/// The process-wide arena if it serves an allocation of `size` bytes on this thread now.
fn process_wide(size: usize) -> Option<&'static ProcessArena> {
    let p = PROCESS.load(Ordering::Acquire);
    if p.is_null() {
        return None;
    }
    // SAFETY: a non-null PROCESS points to a leaked ProcessArena, never freed.
    let p = unsafe { &*p };
    if size < p.threshold || size == 0 || registry::in_arena() || p.pid != std::process::id() {
        return None;
    }
    Some(p)
}

/// What the header before an arena pointer says.
#[derive(Debug, Clone, Copy)]
struct Header {
    /// Bytes asked for.
    size: usize,
    /// Offset of the pointer from the start of its block.
    lead: usize,
    /// Length of the whole block.
    total: usize,
}

/// Writes the header for a block at `start` of `chunk` and returns the pointer after it.
///
/// # Safety
/// `[start, start + h.total)` is a fresh, writable allocation in `chunk` and `h.lead >= HEADER`.
unsafe fn stamp(chunk: &Chunk, start: usize, h: Header) -> *mut c_void {
    // SAFETY: by the contract the header lies inside the fresh block; chunk bases are
    // page-aligned and h.lead - HEADER a multiple of 64, so the u64 writes are aligned.
    unsafe {
        let ptr = chunk.base().add(start + h.lead) as *mut u8;
        let head = ptr.sub(HEADER) as *mut u64;
        head.write(MAGIC);
        head.add(1).write(h.size as u64);
        head.add(2).write(h.lead as u64);
        head.add(3).write(h.total as u64);
        ptr as *mut c_void
    }
}

/// An arena allocation of `size` bytes in a scope, or null when the arena cannot serve it.
fn arena_malloc(inner: *const ArenaInner, size: usize) -> *mut c_void {
    let _g = registry::InArena::enter();
    // SAFETY: the scope guard holds an Arc to the arena for as long as SCOPE points to it.
    let inner = unsafe { &*inner };
    let Some(total) = size.checked_add(HEADER) else { return std::ptr::null_mut() };
    match inner.alloc_raw(total, crate::ALIGN) {
        // SAFETY: alloc_raw just handed out [off, off + total) of the chunk to us alone.
        Ok((chunk, off)) => unsafe { stamp(&chunk, off, Header { size, lead: HEADER, total }) },
        Err(_) => std::ptr::null_mut(),
    }
}

/// Block length of a page-mode allocation of `size` bytes: a header page, then whole pages.
fn page_block(size: usize) -> Option<usize> {
    let page = page_size();
    size.checked_next_multiple_of(page)?.checked_add(page)
}

/// A page-aligned allocation of `size` bytes from the process-wide arena, or null.
fn page_malloc(p: &ProcessArena, size: usize) -> *mut c_void {
    let _g = registry::InArena::enter();
    let Some(total) = page_block(size) else { return std::ptr::null_mut() };
    match p.arena.inner().alloc_raw(total, page_size()) {
        // SAFETY: alloc_raw just handed out [off, off + total) of the chunk to us alone, and the
        // lead of one page is at least HEADER.
        Ok((chunk, off)) => unsafe { stamp(&chunk, off, Header { size, lead: page_size(), total }) },
        Err(_) => std::ptr::null_mut(),
    }
}

/// Header of a block in a chunk inherited through `fork`: its memory is not mapped here
/// (writable chunk mappings are `MADV_DONTFORK`), so it can only be forgotten.
const INHERITED: Header = Header { size: 0, lead: 0, total: 0 };

/// The arena allocation `ptr` points to: its chunk, the offset of its block and its header
/// ([`INHERITED`] for a block of a parent's arena).
fn lookup(ptr: *mut c_void) -> Option<(Arc<Chunk>, usize, Header)> {
    if ptr.is_null() || registry::in_arena() {
        return None;
    }
    let (chunk, off) = registry::find(ptr as *const u8, 1)?;
    if chunk.is_inherited() {
        return Some((chunk, 0, INHERITED));
    }
    let head = off.checked_sub(HEADER)?;
    // SAFETY: the header lies in the same live chunk, before ptr; chunks stay readable (also
    // once frozen) while registered.
    let (magic, size, lead, total) = unsafe {
        let base = chunk.base().add(head) as *const u64;
        (base.read(), base.add(1).read(), base.add(2).read(), base.add(3).read())
    };
    let h = Header { size: size as usize, lead: lead as usize, total: total as usize };
    let start = off.checked_sub(h.lead);
    if magic != MAGIC || start.is_none() || h.lead < HEADER || h.total < h.lead + h.size {
        // A pointer into a chunk that `malloc` did not hand out: freeing it would corrupt the
        // arena, and giving it to glibc would corrupt the heap.
        eprintln!("quiver-shm: free() of a pointer into an arena chunk that malloc did not return");
        std::process::abort();
    }
    Some((chunk, start.unwrap_or(0), h))
}

/// `malloc`: from the scoped arena inside [`Arena::malloc_scope`], from the process-wide arena
/// for large sizes once enabled, else glibc's.
///
/// # Safety
/// As C's `malloc`.
pub unsafe fn malloc(size: usize) -> *mut c_void {
    if let Some(inner) = scoped() {
        let p = arena_malloc(inner, size);
        if !p.is_null() {
            return p;
        }
    } else if let Some(pa) = process_wide(size) {
        let p = page_malloc(pa, size);
        if !p.is_null() {
            return p;
        }
    }
    // SAFETY: forwarded unchanged.
    unsafe { __libc_malloc(size) }
}

/// `calloc`: from the process-wide arena for large sizes once enabled (arena space past the
/// bump pointer is zero), else glibc's.
///
/// # Safety
/// As C's `calloc`.
pub unsafe fn calloc(n: usize, size: usize) -> *mut c_void {
    let Some(bytes) = n.checked_mul(size) else {
        set_errno(libc::ENOMEM);
        return std::ptr::null_mut();
    };
    if scoped().is_none()
        && let Some(pa) = process_wide(bytes)
    {
        let p = page_malloc(pa, bytes);
        if !p.is_null() {
            return p;
        }
    }
    // SAFETY: forwarded unchanged.
    unsafe { __libc_calloc(n, size) }
}

/// `memalign`, `aligned_alloc`, `valloc` and `pvalloc`: page-aligned from the process-wide
/// arena for large sizes once enabled (any `align` up to a page), else glibc's.
///
/// # Safety
/// As C's `memalign`.
pub unsafe fn memalign(align: usize, size: usize) -> *mut c_void {
    if align <= page_size()
        && scoped().is_none()
        && let Some(pa) = process_wide(size)
    {
        let p = page_malloc(pa, size);
        if !p.is_null() {
            return p;
        }
    }
    // SAFETY: forwarded unchanged; glibc checks the alignment.
    unsafe { __libc_memalign(align, size) }
}

/// `posix_memalign`, on [`memalign`].
///
/// # Safety
/// As C's `posix_memalign`: `out` is valid for one pointer write.
pub unsafe fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> libc::c_int {
    if !align.is_power_of_two() || !align.is_multiple_of(size_of::<*mut c_void>()) {
        return libc::EINVAL;
    }
    // SAFETY: same contract as memalign.
    let p = unsafe { memalign(align, size) };
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: the caller gives a valid out pointer.
    unsafe { out.write(p) };
    0
}

/// `free`: returns arena allocations to their chunk, everything else to glibc.
///
/// # Safety
/// As C's `free`: `ptr` is null or a live allocation of this process's `malloc` family.
pub unsafe fn free(ptr: *mut c_void) {
    if let Some((chunk, start, h)) = lookup(ptr) {
        // An inherited block's memory is the parent's: leave it alone.
        if h.lead != INHERITED.lead {
            chunk.release(start, h.total);
        }
        return;
    }
    // SAFETY: not an arena pointer, so glibc produced it.
    unsafe { __libc_free(ptr) }
}

/// `malloc_usable_size`: the size asked for, for arena allocations; glibc's answer otherwise.
///
/// # Safety
/// As C's `malloc_usable_size`.
pub unsafe fn malloc_usable_size(ptr: *mut c_void) -> usize {
    if ptr.is_null() {
        return 0;
    }
    if let Some((_, _, h)) = lookup(ptr) {
        return h.size;
    }
    // SAFETY: a glibc pointer.
    unsafe { libc_usable_size(ptr) }
}

/// glibc's `malloc_usable_size` (it has no `__libc_` alias), found once with `dlsym`.
///
/// # Safety
/// `ptr` is a live glibc allocation.
unsafe fn libc_usable_size(ptr: *mut c_void) -> usize {
    static FOUND: AtomicUsize = AtomicUsize::new(0);
    let mut f = FOUND.load(Ordering::Acquire);
    if f == 0 {
        // SAFETY: dlsym with a static, NUL-terminated name; RTLD_NEXT skips our own definition.
        f = unsafe { libc::dlsym(libc::RTLD_NEXT, c"malloc_usable_size".as_ptr()) } as usize;
        if f == 0 {
            return 0;
        }
        FOUND.store(f, Ordering::Release);
    }
    // SAFETY: f is glibc's malloc_usable_size, of this signature.
    let f: unsafe extern "C" fn(*mut c_void) -> usize = unsafe { std::mem::transmute(f) };
    // SAFETY: forwarded unchanged.
    unsafe { f(ptr) }
}

fn set_errno(e: libc::c_int) {
    // SAFETY: __errno_location always returns this thread's errno.
    unsafe { *libc::__errno_location() = e };
}

/// `realloc`: arena allocations grow in place when they are their chunk's last, or move (to
/// the arena inside a scope or when large in the process-wide mode, else to glibc); glibc's
/// stay glibc's, except that in the process-wide mode a glibc block grown past the threshold
/// moves into the arena.
///
/// # Safety
/// As C's `realloc`.
pub unsafe fn realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    let Some((chunk, start, h)) = lookup(ptr) else {
        if ptr.is_null() {
            // SAFETY: realloc(NULL, n) is malloc(n).
            return unsafe { malloc(size) };
        }
        if scoped().is_none()
            && let Some(pa) = process_wide(size)
        {
            // SAFETY: a live glibc pointer.
            let old = unsafe { libc_usable_size(ptr) };
            if old > 0 && old < size {
                let new = page_malloc(pa, size);
                if !new.is_null() {
                    // SAFETY: old readable bytes at ptr, a fresh disjoint block of size > old.
                    unsafe {
                        std::ptr::copy_nonoverlapping(ptr as *const u8, new as *mut u8, old);
                        __libc_free(ptr);
                    }
                    return new;
                }
            }
        }
        // SAFETY: a glibc pointer, forwarded unchanged.
        return unsafe { __libc_realloc(ptr, size) };
    };
    if h.lead == INHERITED.lead {
        if size == 0 {
            return std::ptr::null_mut();
        }
        // Its bytes are not mapped in this process: nothing can be carried over.
        eprintln!("quiver-shm: realloc() of a block of the parent's arena after fork");
        std::process::abort();
    }
    if size == 0 {
        chunk.release(start, h.total);
        return std::ptr::null_mut();
    }
    {
        let want = if h.lead == HEADER { size.checked_add(HEADER) } else { page_block(size) };
        if let Some(want) = want
            && resize(&chunk, start, h, want)
        {
            // SAFETY: the block is ours and writable (resize refuses frozen chunks); the
            // header's size word is at ptr - HEADER + 8.
            unsafe { ((ptr as *mut u8).sub(HEADER) as *mut u64).add(1).write(size as u64) };
            return ptr;
        }
    }
    // SAFETY: a fresh allocation of `size` bytes; the old one holds `h.size` readable bytes.
    unsafe {
        let new = malloc(size);
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr as *const u8, new as *mut u8, h.size.min(size));
            chunk.release(start, h.total);
        }
        new
    }
}

/// Resizes the block at `start` to `want` bytes in place; page-mode blocks punch the pages they
/// give up first, so the chunk's space past its bump pointer stays zero.
fn resize(chunk: &Chunk, start: usize, h: Header, want: usize) -> bool {
    if want == h.total {
        return !chunk.is_sealed();
    }
    let page_mode = h.lead != HEADER;
    if page_mode && want < h.total && chunk.punch(start + want, h.total - want).is_err() {
        return false;
    }
    if chunk.resize_in_place(start, h.total, want) {
        // SAFETY: the header lies in the block, which is ours and writable (resize_in_place
        // refuses frozen chunks).
        unsafe { (chunk.base().add(start + h.lead - HEADER) as *mut u64).add(3).write(want as u64) };
        return true;
    }
    // A page-mode shrink that could not move the bump pointer keeps the block (now with holes)
    // whole.
    page_mode && want < h.total
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

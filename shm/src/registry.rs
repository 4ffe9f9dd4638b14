//! Process-wide index of live arena chunks by address, so a buffer's pointer tells which
//! segment holds it (the writer's "reference" way) and which chunk frees it (the global
//! allocator).
//!
//! Lookups run on every deallocation of a process that installs [`crate::ArenaAlloc`], so they
//! take a read lock only when the address falls within the span of all chunks.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};

use crate::arena::Chunk;
use crate::sipc::SharedMapping;

static CHUNKS: RwLock<Vec<Arc<Chunk>>> = RwLock::new(Vec::new());
static LOW: AtomicUsize = AtomicUsize::new(usize::MAX);
static HIGH: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static IN_ARENA: Cell<bool> = const { Cell::new(false) };
}

/// Marks the current thread as inside arena bookkeeping: allocations made meanwhile (by the
/// registry's own vector, a chunk's name) go to the system allocator and never re-enter the
/// registry, which would deadlock on its lock.
pub(crate) struct InArena {
    prev: bool,
}

impl InArena {
    pub(crate) fn enter() -> Self {
        let prev = IN_ARENA.with(|f| f.replace(true));
        InArena { prev }
    }
}

impl Drop for InArena {
    fn drop(&mut self) {
        IN_ARENA.with(|f| f.set(self.prev));
    }
}

/// Whether the current thread is inside arena bookkeeping.
pub(crate) fn in_arena() -> bool {
    IN_ARENA.try_with(|f| f.get()).unwrap_or(true)
}

pub(crate) fn insert(chunk: Arc<Chunk>) {
    let _g = InArena::enter();
    static ATFORK: std::sync::Once = std::sync::Once::new();
    // SAFETY: registers a handler that only makes raw syscalls and takes no blocking lock.
    ATFORK.call_once(|| unsafe {
        libc::pthread_atfork(None, None, Some(hold_inherited_spans));
    });
    let (start, end) = chunk.span();
    let mut v = CHUNKS.write().unwrap_or_else(|e| e.into_inner());
    let at = v.partition_point(|c| c.span().0 < start);
    v.insert(at, chunk);
    LOW.fetch_min(start, Ordering::AcqRel);
    HIGH.fetch_max(end, Ordering::AcqRel);
}

pub(crate) fn remove(chunk: &Chunk) {
    let _g = InArena::enter();
    let removed = {
        let mut v = CHUNKS.write().unwrap_or_else(|e| e.into_inner());
        let start = chunk.span().0;
        match v.binary_search_by(|c| c.span().0.cmp(&start)) {
            // The id check keeps a forked child's own chunk safe from an inherited one that
            // once had the same address.
            Ok(i) if v[i].id() == chunk.id() => Some(v.remove(i)),
            _ => None,
        }
    };
    // Dropped outside the lock: the chunk's own drop frees memory and must not find it held.
    drop(removed);
}

/// Runs in a child right after `fork`. Writable chunk mappings are `MADV_DONTFORK`, so the
/// child has nothing at their addresses while the registry still names them: inaccessible
/// placeholders keep the child's own mappings (glibc's, a new arena's) from landing there and
/// being taken for the parent's chunks. Read-only (sealed) mappings are inherited and stay.
extern "C" fn hold_inherited_spans() {
    // A lock held by a thread of the parent stays held in the child: then nothing can be done.
    let Ok(v) = CHUNKS.try_read() else { return };
    for c in v.iter() {
        let (start, end) = c.span();
        // SAFETY: MAP_FIXED_NOREPLACE maps only where nothing is mapped (it fails with EEXIST
        // over a sealed chunk's inherited mapping), so no live memory is replaced.
        unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                end - start,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            );
        }
    }
}

/// The chunk that contains `[ptr, ptr+len)`, with the offset of `ptr` in it.
pub(crate) fn find(ptr: *const u8, len: usize) -> Option<(Arc<Chunk>, usize)> {
    let p = ptr as usize;
    if p < LOW.load(Ordering::Acquire) || p >= HIGH.load(Ordering::Acquire) {
        return None;
    }
    let v = CHUNKS.read().unwrap_or_else(|e| e.into_inner());
    let i = v.partition_point(|c| c.span().0 <= p);
    let c = v.get(i.checked_sub(1)?)?;
    let (start, end) = c.span();
    let off = p - start;
    (p.checked_add(len)? <= end).then(|| (c.clone(), off))
}

/// Number of live chunks in this process (for leak tests and metrics).
pub fn live_chunks() -> usize {
    CHUNKS.read().map(|v| v.len()).unwrap_or(0)
}

static MAPPED: RwLock<Vec<Weak<SharedMapping>>> = RwLock::new(Vec::new());
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A process-wide unique id for a shareable segment (arena chunk or received mapping).
pub(crate) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Registers a sealed segment mapped by a reader, so a table that passes its input buffers on
/// references them instead of copying.
pub(crate) fn insert_mapped(m: &Arc<SharedMapping>) {
    let mut v = MAPPED.write().unwrap_or_else(|e| e.into_inner());
    v.retain(|w| w.strong_count() > 0);
    v.push(Arc::downgrade(m));
}

/// Forgets mappings that are gone (called as one goes away).
pub(crate) fn prune_mapped() {
    let mut v = MAPPED.write().unwrap_or_else(|e| e.into_inner());
    v.retain(|w| w.strong_count() > 0);
}

/// The received mapping that contains `[ptr, ptr+len)`, with the offset of `ptr` in it.
pub(crate) fn find_mapped(ptr: *const u8, len: usize) -> Option<(Arc<SharedMapping>, usize)> {
    // Upgrade under the lock, search and drop after it: the last reference to a mapping may be
    // one of these, and dropping it prunes the registry, which takes the write lock.
    let live: Vec<Arc<SharedMapping>> = MAPPED.read().unwrap_or_else(|e| e.into_inner()).iter().filter_map(Weak::upgrade).collect();
    live.into_iter().find_map(|m| m.mapping().offset_of(ptr, len).map(|off| (m, off)))
}

//! An arena over memfd segments: 64-byte aligned regions that Arrow buffers are built in, so a
//! producer's RecordBatch already lives in shareable memory and is handed on by reference.
//!
//! An arena is a list of chunks, each one [`Segment`]. Allocation bumps a pointer in the
//! current chunk and starts a new, larger chunk when it is full. A chunk stays registered (see
//! [`crate::registry`]) while anything allocated in it is alive. Freed whole pages are punched
//! out until the chunk is frozen for sharing; after that its bytes belong to its readers.

use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arrow_buffer::{ArrowNativeType, Buffer};

use crate::error::{Result, ShmError};
use crate::mapping::{MapOptions, Mapping, page_size};
use crate::registry::{self, InArena};
use crate::segment::{SHARED_SEALS, SealedSegment, Segment};

/// Alignment of every arena region, as the Arrow format recommends.
pub const ALIGN: usize = 64;

/// How an arena sizes and maps its chunks.
#[derive(Debug, Clone)]
pub struct ArenaOptions {
    /// Name shown in `/proc/PID/fd` as `memfd:NAME.N`.
    pub name: String,
    /// Size of the first chunk; each next chunk doubles, up to `max_chunk`.
    pub first_chunk: u64,
    /// Largest chunk made for small allocations (a larger allocation gets a chunk of its own).
    pub max_chunk: u64,
    /// Paging options of the writable mappings.
    pub map: MapOptions,
}

impl Default for ArenaOptions {
    fn default() -> Self {
        ArenaOptions {
            name: "quiver-arena".into(),
            first_chunk: 1 << 20,
            max_chunk: 256 << 20,
            map: MapOptions::default(),
        }
    }
}

#[derive(Debug)]
struct ChunkState {
    /// Next free offset.
    bump: usize,
    /// Live allocations, plus one while the owning arena may still allocate here.
    live: usize,
}

/// One segment of an arena, mapped writable until frozen.
#[derive(Debug)]
pub struct Chunk {
    id: u64,
    /// The process that created the chunk: a forked child inherits the mapping, which is shared
    /// with its parent, so it must never punch or write there.
    owner: u32,
    segment: Segment,
    map: Mapping,
    state: Mutex<ChunkState>,
    frozen: AtomicBool,
    sealed: Mutex<Option<SealedSegment>>,
}

impl Chunk {
    fn create(name: &str, size: u64, opts: MapOptions) -> Result<Arc<Chunk>> {
        let _g = InArena::enter();
        let id = registry::next_id();
        let segment = Segment::create(&format!("{name}.{id}"), size, opts)?;
        let map = segment.map_mut(opts)?;
        let chunk = Arc::new(Chunk {
            id,
            owner: std::process::id(),
            segment,
            map,
            state: Mutex::new(ChunkState { bump: 0, live: 1 }),
            frozen: AtomicBool::new(false),
            sealed: Mutex::new(None),
        });
        registry::insert(chunk.clone());
        Ok(chunk)
    }

    /// Unique id of this chunk within the process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// `[start, end)` of the chunk's mapping.
    pub(crate) fn span(&self) -> (usize, usize) {
        let s = self.map.as_ptr() as usize;
        (s, s + self.map.len())
    }

    /// Whether this process inherited the chunk through `fork` rather than creating it: its
    /// memory is shared with the creator, so it is neither allocated from nor punched.
    pub fn is_inherited(&self) -> bool {
        self.owner != std::process::id()
    }

    /// Punches out `[offset, offset+len)` (page-aligned) of a writable chunk this process
    /// created; reads there return zeros after.
    pub(crate) fn punch(&self, offset: usize, len: usize) -> Result<()> {
        if self.frozen.load(Ordering::Acquire) || self.is_inherited() {
            return Err(ShmError::layout("punch into a sealed or inherited chunk"));
        }
        self.segment.punch_hole(offset as u64, len as u64)
    }

    /// Size of the chunk's segment.
    pub fn size(&self) -> u64 {
        self.segment.size()
    }

    /// Start of the chunk's mapping.
    pub fn base(&self) -> *const u8 {
        self.map.as_ptr()
    }

    /// Bumps out `size` bytes aligned to `align`; `None` if the chunk is full or frozen.
    fn try_alloc(&self, size: usize, align: usize) -> Option<usize> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // Checked under the state lock, which `seal` holds while it freezes the chunk.
        if self.frozen.load(Ordering::Acquire) {
            return None;
        }
        let start = st.bump.checked_next_multiple_of(align)?;
        let end = start.checked_add(size)?;
        if end > self.map.len() {
            return None;
        }
        st.bump = end;
        st.live += 1;
        Some(start)
    }

    /// Grows or shrinks the allocation at `offset` in place when it is the last one; returns
    /// whether the chunk's free space moved.
    pub(crate) fn resize_in_place(&self, offset: usize, old: usize, new: usize) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if self.frozen.load(Ordering::Acquire) {
            return false;
        }
        if offset + old != st.bump {
            return false;
        }
        match offset.checked_add(new) {
            Some(end) if end <= self.map.len() => {
                st.bump = end;
                true
            }
            _ => false,
        }
    }

    /// Releases one allocation: punches out the whole pages it alone covered, and retires the
    /// chunk when nothing in it is alive.
    pub(crate) fn release(&self, offset: usize, len: usize) {
        if !self.frozen.load(Ordering::Acquire) {
            let page = page_size();
            let start = offset.next_multiple_of(page);
            let end = (offset + len) / page * page;
            if end > start && !self.is_inherited() {
                // Best effort: a failure only means the memory stays until the chunk goes.
                let _ = self.segment.punch_hole(start as u64, (end - start) as u64);
            }
        }
        self.unref();
    }

    fn unref(&self) {
        let retire = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.live -= 1;
            st.live == 0
        };
        if retire {
            registry::remove(self);
        }
    }

    /// Ends writing to this chunk: punches out its unused tail, swaps the writable mapping for a
    /// read-only one and seals the segment. Pointers into the chunk stay valid. Idempotent.
    pub fn seal(&self) -> Result<SealedSegment> {
        let _g = InArena::enter();
        let mut sealed = self.sealed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = sealed.as_ref() {
            return s.try_clone();
        }
        let used = {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            self.frozen.store(true, Ordering::Release);
            st.bump.next_multiple_of(page_size()) as u64
        };
        if used < self.segment.size() {
            self.segment.punch_hole(used, self.segment.size() - used)?;
        }
        let ro = self.segment.reopen_read_only()?;
        self.map.freeze(ro.as_fd())?;
        nix::fcntl::fcntl(&self.segment, nix::fcntl::FcntlArg::F_ADD_SEALS(SHARED_SEALS))
            .map_err(|e| ShmError::Seal(crate::error::errno(e)))?;
        let fd = self
            .segment
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| ShmError::Fd { call: "dup", source })?;
        let s = SealedSegment::check(fd, 0)?;
        let out = s.try_clone()?;
        *sealed = Some(s);
        Ok(out)
    }

    /// Whether the chunk was sealed.
    pub fn is_sealed(&self) -> bool {
        self.frozen.load(Ordering::Acquire)
    }
}

impl AsFd for Chunk {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.segment.as_fd()
    }
}

/// A memfd arena. Cloning gives another handle to the same arena.
#[derive(Debug, Clone)]
pub struct Arena {
    inner: Arc<ArenaInner>,
}

#[derive(Debug)]
pub(crate) struct ArenaInner {
    opts: ArenaOptions,
    chunks: Mutex<ArenaChunks>,
}

#[derive(Debug)]
struct ArenaChunks {
    current: Option<Arc<Chunk>>,
    next_size: u64,
    reserved: u64,
}

impl Drop for ArenaInner {
    fn drop(&mut self) {
        let st = self.chunks.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = st.current.take() {
            c.unref();
        }
    }
}

/// A region of an arena, alive as long as this lease. It is the Arrow [`Buffer`] owner for
/// buffers made with [`ArenaVec::finish`].
#[derive(Debug)]
pub struct ArenaRegion {
    chunk: Arc<Chunk>,
    offset: usize,
    len: usize,
}

impl ArenaRegion {
    /// Start of the region.
    pub fn as_ptr(&self) -> *mut u8 {
        // SAFETY: offset is within the chunk's mapping by construction.
        unsafe { self.chunk.map.as_mut_ptr().add(self.offset) }
    }

    /// Length of the region.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The chunk the region lives in.
    pub fn chunk(&self) -> &Arc<Chunk> {
        &self.chunk
    }

    /// Offset of the region in its chunk's segment.
    pub fn offset(&self) -> usize {
        self.offset
    }
}

impl Drop for ArenaRegion {
    fn drop(&mut self) {
        self.chunk.release(self.offset, self.len);
    }
}

impl Arena {
    /// Creates an empty arena; chunks are made on first allocation.
    pub fn new(opts: ArenaOptions) -> Arena {
        let first = opts.first_chunk.max(page_size() as u64);
        Arena {
            inner: Arc::new(ArenaInner {
                chunks: Mutex::new(ArenaChunks { current: None, next_size: first, reserved: 0 }),
                opts,
            }),
        }
    }

    /// An arena with default options and this name.
    pub fn named(name: &str) -> Arena {
        Arena::new(ArenaOptions { name: name.into(), ..Default::default() })
    }

    pub(crate) fn inner(&self) -> &Arc<ArenaInner> {
        &self.inner
    }

    /// Allocates `size` bytes aligned to `align` (at least [`ALIGN`]).
    pub fn alloc(&self, size: usize, align: usize) -> Result<ArenaRegion> {
        let (chunk, offset) = self.inner.alloc_raw(size, align)?;
        Ok(ArenaRegion { chunk, offset, len: size })
    }

    /// A growable vector of `T` in the arena, with room for `capacity` elements.
    pub fn vec<T: ArrowNativeType>(&self, capacity: usize) -> Result<ArenaVec<T>> {
        let bytes = capacity.checked_mul(size_of::<T>()).ok_or(ShmError::Alloc {
            size: usize::MAX,
            align: ALIGN,
            reason: "capacity overflows",
        })?;
        Ok(ArenaVec { arena: self.clone(), region: self.alloc(bytes, ALIGN)?, len: 0, _t: PhantomData })
    }

    /// Copies `bytes` into a fresh region of the arena.
    pub fn copy_from(&self, bytes: &[u8], align: usize) -> Result<ArenaRegion> {
        let r = self.alloc(bytes.len(), align)?;
        // SAFETY: the region is fresh, writable, `bytes.len()` long and disjoint from `bytes`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), r.as_ptr(), bytes.len()) };
        Ok(r)
    }

    /// Bytes reserved by all chunks this arena ever created (cumulative; a chunk's unused tail
    /// is given back when it is sealed, and a chunk's memory when its last allocation goes).
    pub fn reserved_bytes(&self) -> u64 {
        self.inner.chunks.lock().map(|c| c.reserved).unwrap_or(0)
    }

    /// Stops allocating in the current chunk so it can be sealed; the next allocation starts a
    /// new chunk.
    pub fn retire_current(&self) {
        let cur = self.inner.chunks.lock().unwrap_or_else(|e| e.into_inner()).current.take();
        if let Some(c) = cur {
            c.unref();
        }
    }
}

impl ArenaInner {
    pub(crate) fn alloc_raw(&self, size: usize, align: usize) -> Result<(Arc<Chunk>, usize)> {
        let align = align.max(ALIGN);
        if !align.is_power_of_two() || align > page_size() {
            return Err(ShmError::Alloc { size, align, reason: "alignment must be a power of two up to a page" });
        }
        let mut st = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = &st.current
            && let Some(off) = c.try_alloc(size, align)
        {
            return Ok((c.clone(), off));
        }
        // Grow the chunk size only when the current chunk filled up, not when it was sealed
        // for sharing: a producer of many small tables keeps small chunks.
        if st.current.as_ref().is_some_and(|c| !c.is_sealed()) {
            st.next_size = (st.next_size * 2).min(self.opts.max_chunk);
        }
        let want = (size as u64).max(st.next_size);
        let chunk = Chunk::create(&self.opts.name, want, self.opts.map)?;
        st.reserved += chunk.size();
        let Some(off) = chunk.try_alloc(size, align) else {
            chunk.unref();
            return Err(ShmError::Alloc { size, align, reason: "fresh chunk too small" });
        };
        // A huge allocation gets its own chunk and leaves the current one in place.
        if st.current.as_ref().is_none_or(|c| c.is_sealed() || size as u64 <= self.opts.max_chunk) {
            if let Some(old) = st.current.replace(chunk.clone()) {
                old.unref();
            }
        } else {
            chunk.unref();
        }
        Ok((chunk, off))
    }
}

/// A vector of `T` built in place in the arena; [`ArenaVec::finish`] turns it into an Arrow
/// [`Buffer`] without copying.
#[derive(Debug)]
pub struct ArenaVec<T: ArrowNativeType> {
    arena: Arena,
    region: ArenaRegion,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: ArrowNativeType> ArenaVec<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the vector is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Capacity in elements.
    pub fn capacity(&self) -> usize {
        self.region.len / size_of::<T>().max(1)
    }

    fn reserve(&mut self, extra: usize) -> Result<()> {
        let need = self.len.checked_add(extra).ok_or(ShmError::Alloc {
            size: usize::MAX,
            align: ALIGN,
            reason: "length overflows",
        })?;
        if need <= self.capacity() {
            return Ok(());
        }
        let new_cap = need.max(self.capacity() * 2).max(8);
        let new_bytes = new_cap * size_of::<T>();
        let r = &self.region;
        if r.chunk.resize_in_place(r.offset, r.len, new_bytes) {
            self.region.len = new_bytes;
            return Ok(());
        }
        // Moves within the producer's own arena, before anything is shared: not a handoff copy.
        let new = self.arena.alloc(new_bytes, ALIGN)?;
        let used = self.len * size_of::<T>();
        // SAFETY: both regions are ours, at least `used` bytes long, and disjoint.
        unsafe { std::ptr::copy_nonoverlapping(self.region.as_ptr(), new.as_ptr(), used) };
        self.region = new;
        Ok(())
    }

    /// Appends one value.
    pub fn push(&mut self, v: T) -> Result<()> {
        self.reserve(1)?;
        // SAFETY: reserve made room for one more element inside our region.
        unsafe { self.region.as_ptr().cast::<T>().add(self.len).write(v) };
        self.len += 1;
        Ok(())
    }

    /// Appends a slice of values.
    pub fn extend_from_slice(&mut self, vs: &[T]) -> Result<()> {
        self.reserve(vs.len())?;
        // SAFETY: reserve made room for vs.len() more elements; the regions are disjoint.
        unsafe {
            std::ptr::copy_nonoverlapping(vs.as_ptr(), self.region.as_ptr().cast::<T>().add(self.len), vs.len())
        };
        self.len += vs.len();
        Ok(())
    }

    /// The elements written so far.
    pub fn as_slice(&self) -> &[T] {
        // SAFETY: the first len elements were written; the region is aligned to ALIGN >= align_of T.
        unsafe { std::slice::from_raw_parts(self.region.as_ptr().cast::<T>(), self.len) }
    }

    /// The whole capacity as a mutable slice (fresh arena pages read as zero), for producers
    /// that fill by index; call [`ArenaVec::set_len`] after.
    pub fn spare_mut(&mut self) -> &mut [T] {
        let cap = self.capacity();
        // SAFETY: the region is ours alone, writable and aligned; every ArrowNativeType is plain
        // old data, so whatever bytes are there form valid values.
        unsafe { std::slice::from_raw_parts_mut(self.region.as_ptr().cast::<T>(), cap) }
    }

    /// Sets the length after filling through [`ArenaVec::spare_mut`].
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity(), "length past capacity");
        self.len = len;
    }

    /// Turns the vector into an Arrow buffer whose owner is the arena region: no copy.
    pub fn finish(self) -> Buffer {
        let bytes = self.len * size_of::<T>();
        let mut region = self.region;
        // Give the unused capacity back when this is the chunk's last allocation.
        if region.chunk.resize_in_place(region.offset, region.len, bytes) {
            region.len = bytes;
        }
        let ptr = NonNull::new(region.as_ptr()).expect("arena pointers are non-null");
        // SAFETY: ptr..ptr+bytes lies in the region's mapping, which `region` keeps alive for as
        // long as the buffer (it is the buffer's owner).
        unsafe { Buffer::from_custom_allocation(ptr, bytes, Arc::new(region)) }
    }
}

//! Memory mappings of segments, with the placement and paging options the benchmarks compare.

use std::num::NonZeroUsize;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use nix::sys::mman::{self, MapFlags, MmapAdvise, ProtFlags};

use crate::error::{Result, ShmError, errno};

/// Size of a huge page on x86-64, the alignment `MapOptions::huge_align` asks for.
pub const HUGE_PAGE: usize = 2 << 20;

/// Paging options for a mapping: what each is worth is measured by `quiver-bench handoff`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MapOptions {
    /// Place the mapping at a 2 MiB aligned address so the kernel can back it with huge pages.
    pub huge_align: bool,
    /// Advise `MADV_HUGEPAGE` on the mapping.
    pub hugepage: bool,
    /// Fault every page in up front (`MADV_POPULATE_READ`, or `_WRITE` for writable maps).
    pub prefault: bool,
    /// Back the segment with the kernel's reserved pool of 2 MiB pages (`MFD_HUGETLB`) instead
    /// of ordinary shared memory. Used when creating a segment; an empty pool gives `ENOSPC`.
    pub hugetlb: bool,
}

/// A shared mapping of (part of) a segment, unmapped on drop.
///
/// It is the [`arrow_buffer::alloc::Allocation`] owner of every Arrow buffer that points into it.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    writable: std::sync::atomic::AtomicBool,
}

// SAFETY: a Mapping is a plain address range; the kernel keeps it valid until munmap in Drop,
// and concurrent reads are fine. Writes go only through `as_mut_ptr` callers who own a region.
unsafe impl Send for Mapping {}
// SAFETY: see Send; no interior state besides the immutable range.
unsafe impl Sync for Mapping {}
impl std::panic::RefUnwindSafe for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from offset 0, read-only or read-write, shared.
    pub fn new(fd: BorrowedFd<'_>, len: usize, writable: bool, opts: MapOptions) -> Result<Self> {
        let len_nz = NonZeroUsize::new(len).ok_or(ShmError::Map {
            len,
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        let prot = if writable {
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
        } else {
            ProtFlags::PROT_READ
        };
        let ptr = if opts.huge_align {
            map_aligned(fd, len_nz, prot)?
        } else {
            // SAFETY: a fresh mapping chosen by the kernel; it overlaps nothing we own.
            unsafe { mman::mmap(None, len_nz, prot, MapFlags::MAP_SHARED, fd, 0) }
                .map_err(|e| ShmError::Map { len, source: errno(e) })?
                .cast::<u8>()
        };
        let map = Mapping { ptr, len, writable: writable.into() };
        if writable {
            // A child forked meanwhile (to exec a worker, say) would otherwise hold a writable
            // view of the segment until it execs, making sealing fail with EBUSY, and could
            // write into a table being built.
            map.advise(MmapAdvise::MADV_DONTFORK, "MADV_DONTFORK")?;
        }
        if opts.hugepage && !opts.hugetlb {
            map.advise(MmapAdvise::MADV_HUGEPAGE, "MADV_HUGEPAGE")?;
        }
        if opts.prefault {
            if writable {
                map.advise(MmapAdvise::MADV_POPULATE_WRITE, "MADV_POPULATE_WRITE")?;
            } else {
                map.advise(MmapAdvise::MADV_POPULATE_READ, "MADV_POPULATE_READ")?;
            }
        }
        Ok(map)
    }

    fn advise(&self, advice: MmapAdvise, name: &'static str) -> Result<()> {
        // SAFETY: the range is exactly our own mapping; advice does not change its contents.
        unsafe { mman::madvise(self.ptr.cast(), self.len, advice) }
            .map_err(|e| ShmError::Advise { advice: name, source: errno(e) })
    }

    /// Faults every page of the mapping in (`MADV_POPULATE_READ`).
    pub fn prefault(&self) -> Result<()> {
        self.advise(MmapAdvise::MADV_POPULATE_READ, "MADV_POPULATE_READ")
    }

    /// Start of the mapping.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Start of the mapping, for writers; writing through it faults unless the map is writable.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: mappings have at least one page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the mapping was made writable.
    pub fn is_writable(&self) -> bool {
        self.writable.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether `[ptr, ptr+len)` lies inside this mapping; returns the offset if so.
    pub fn offset_of(&self, ptr: *const u8, len: usize) -> Option<usize> {
        let start = self.ptr.as_ptr() as usize;
        let p = ptr as usize;
        let off = p.checked_sub(start)?;
        (off.checked_add(len)? <= self.len).then_some(off)
    }

    /// The mapped bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the range is mapped for as long as self lives; shared memory may change under
        // a writable mapping held elsewhere, which is why readers only ever map sealed segments.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Replaces this writable mapping in place with a read-only one of `ro_fd` (a read-only
    /// open of the same file), so the segment can be sealed while pointers into it stay valid.
    pub fn freeze(&self, ro_fd: BorrowedFd<'_>) -> Result<()> {
        let len = NonZeroUsize::new(self.len).expect("mappings are never empty");
        // SAFETY: MAP_FIXED replaces exactly our own mapping with one of the same file and
        // length, atomically; every pointer into it keeps seeing the same bytes, now read-only.
        unsafe {
            mman::mmap(
                Some(NonZeroUsize::new(self.ptr.as_ptr() as usize).expect("mapped address")),
                len,
                ProtFlags::PROT_READ,
                MapFlags::MAP_SHARED | MapFlags::MAP_FIXED,
                ro_fd,
                0,
            )
        }
        .map_err(|e| ShmError::Map { len: self.len, source: errno(e) })?;
        self.writable.store(false, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own the range since mmap; nothing points into it once its owner drops.
        let _ = unsafe { mman::munmap(self.ptr.cast(), self.len) };
    }
}

/// Maps `fd` at a 2 MiB aligned address: reserve a larger range, map over its aligned middle,
/// and give back the slack on both sides.
fn map_aligned(fd: BorrowedFd<'_>, len: NonZeroUsize, prot: ProtFlags) -> Result<NonNull<u8>> {
    let err = |e| ShmError::Map { len: len.get(), source: errno(e) };
    let span = len.get().checked_add(HUGE_PAGE).ok_or(ShmError::Map {
        len: len.get(),
        source: std::io::Error::from_raw_os_error(libc::EOVERFLOW),
    })?;
    let span_nz = NonZeroUsize::new(span).expect("span > len > 0");
    // SAFETY: a fresh PROT_NONE reservation that nothing else uses.
    let base = unsafe {
        mman::mmap_anonymous(None, span_nz, ProtFlags::PROT_NONE, MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE)
    }
    .map_err(err)?;
    let base_addr = base.as_ptr() as usize;
    let aligned = (base_addr + HUGE_PAGE - 1) & !(HUGE_PAGE - 1);
    // SAFETY: [aligned, aligned+len) lies inside our reservation, which MAP_FIXED replaces.
    let mapped = unsafe {
        mman::mmap(
            NonZeroUsize::new(aligned),
            len,
            prot,
            MapFlags::MAP_SHARED | MapFlags::MAP_FIXED,
            fd,
            0,
        )
    };
    let head = aligned - base_addr;
    let tail_start = aligned + len.get();
    let tail = base_addr + span - tail_start;
    if head > 0 {
        // SAFETY: the head slack is part of our reservation and holds nothing.
        let _ = unsafe { mman::munmap(base, head) };
    }
    if tail > 0 {
        // SAFETY: the tail slack is part of our reservation and holds nothing.
        let _ = unsafe {
            mman::munmap(NonNull::new(tail_start as *mut _).expect("non-null"), tail)
        };
    }
    match mapped {
        Ok(p) => Ok(p.cast()),
        Err(e) => {
            // SAFETY: the aligned middle of the reservation is still ours to release.
            let _ = unsafe { mman::munmap(NonNull::new(aligned as *mut _).expect("non-null"), len.get()) };
            Err(err(e))
        }
    }
}

/// The system page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as usize } else { 4096 }
}

/// Returns `fd` as seen by `fstat`: (size, is regular file).
pub(crate) fn fstat_size(fd: BorrowedFd<'_>) -> Result<(u64, bool)> {
    let st = nix::sys::stat::fstat(fd).map_err(|e| ShmError::Fd { call: "fstat", source: errno(e) })?;
    let is_reg = (st.st_mode & libc::S_IFMT) == libc::S_IFREG;
    Ok((st.st_size as u64, is_reg))
}


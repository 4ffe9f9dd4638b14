//! The ways a buffer reaches shareable memory, tried in order for every buffer the writer
//! meets: reference it where it already lies in an arena, move its pages with the kernel
//! module when it is loaded ([`KernelMove`]), or copy it, which always works and is always
//! counted.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::fmt::Debug;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use nix::sys::mman::{self, MapFlags, ProtFlags};

use crate::arena::{Arena, ArenaOptions, ArenaRegion, Chunk};
use crate::error::{Result, ShmError, errno};
use crate::kzero::{self, KzeroError};
use crate::mapping::page_size;
use crate::registry;
use crate::segment::SealedSegment;
use crate::sipc::SharedMapping;

/// How a buffer became shareable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Way {
    /// It already lay in an arena segment: referenced, zero bytes copied.
    Reference,
    /// Its pages were moved into a segment by the kernel: zero whole pages copied.
    Moved,
    /// It was copied into an output segment.
    Copy,
}

/// A segment that buffers can be placed in and that is sealed before it is shared.
pub trait Shareable: Send + Sync + Debug {
    /// Identity of the segment within this process, to reference each segment once.
    fn key(&self) -> u64;
    /// Ends writing and returns a sealed handle (idempotent).
    fn seal(&self) -> Result<SealedSegment>;
}

impl Shareable for Chunk {
    fn key(&self) -> u64 {
        self.id()
    }

    fn seal(&self) -> Result<SealedSegment> {
        Chunk::seal(self)
    }
}

/// Where a way put a buffer.
#[derive(Debug, Clone)]
pub struct Placement {
    /// The segment holding the bytes.
    pub segment: Arc<dyn Shareable>,
    /// Their offset in it.
    pub offset: u64,
    /// Bytes the way had to copy to get there (0 for a reference).
    pub copied: u64,
}

/// One way of making a buffer shareable.
pub trait Deanonymize: Send + Debug {
    /// Which way this is, for the statistics.
    fn way(&self) -> Way;
    /// Places `bytes` (which must end up aligned to `align`), or returns `None` to let the
    /// next way try.
    fn place(&mut self, bytes: &[u8], align: usize) -> Result<Option<Placement>>;
}

/// References buffers that already lie in shareable memory of this process: a live arena
/// chunk, or a sealed segment it received and mapped (a function passing its input's columns
/// on hands the very same segment on).
#[derive(Debug, Default)]
pub struct Reference;

impl Deanonymize for Reference {
    fn way(&self) -> Way {
        Way::Reference
    }

    fn place(&mut self, bytes: &[u8], align: usize) -> Result<Option<Placement>> {
        let (p, n) = (bytes.as_ptr(), bytes.len());
        if !(p as usize).is_multiple_of(align) {
            return Ok(None);
        }
        let found = registry::find(p, n)
            .map(|(c, off)| (c as Arc<dyn Shareable>, off))
            .or_else(|| registry::find_mapped(p, n).map(|(m, off)| (m as Arc<dyn Shareable>, off)));
        Ok(found.map(|(segment, off)| Placement { segment, offset: off as u64, copied: 0 }))
    }
}

impl Shareable for SharedMapping {
    fn key(&self) -> u64 {
        self.id()
    }

    fn seal(&self) -> Result<SealedSegment> {
        self.segment().try_clone()
    }
}

/// Copies buffers into an output arena of its own; keeps their regions alive until dropped
/// (the sealed segments keep the bytes for readers after that).
#[derive(Debug)]
pub struct CopyToArena {
    arena: Arena,
    regions: Vec<ArenaRegion>,
}

impl CopyToArena {
    /// A copier into a fresh arena named `name`.
    pub fn new(name: &str) -> Self {
        CopyToArena {
            arena: Arena::new(ArenaOptions { name: name.into(), ..Default::default() }),
            regions: Vec::new(),
        }
    }
}

impl Deanonymize for CopyToArena {
    fn way(&self) -> Way {
        Way::Copy
    }

    fn place(&mut self, bytes: &[u8], align: usize) -> Result<Option<Placement>> {
        let r = self.arena.copy_from(bytes, align)?;
        let p = Placement {
            segment: r.chunk().clone() as Arc<dyn Shareable>,
            offset: r.offset() as u64,
            copied: bytes.len() as u64,
        };
        self.regions.push(r);
        Ok(Some(p))
    }
}

/// A kzero file that moved pages are appended to; sealed with the module's ioctl.
#[derive(Debug)]
pub struct KzeroFile {
    id: u64,
    fd: OwnedFd,
    sealed: Mutex<Option<SealedSegment>>,
}

impl KzeroFile {
    fn new(dev: &kzero::Device) -> Result<Self> {
        Ok(KzeroFile { id: registry::next_id(), fd: dev.new_file()?, sealed: Mutex::new(None) })
    }
}

impl Shareable for KzeroFile {
    fn key(&self) -> u64 {
        self.id
    }

    fn seal(&self) -> Result<SealedSegment> {
        let mut sealed = self.sealed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = sealed.as_ref() {
            return s.try_clone();
        }
        kzero::add_seals(self.fd.as_fd(), kzero::SEAL_ALL)?;
        let fd = self.fd.try_clone().map_err(|source| ShmError::Fd { call: "dup", source })?;
        let s = SealedSegment::check(fd, 0)?;
        let out = s.try_clone()?;
        *sealed = Some(s);
        Ok(out)
    }
}

/// Moves the whole pages of a buffer lying in ordinary (anonymous) memory into a kzero file
/// with the kernel module, and copies only its sub-page head and tail (counted). The buffer's
/// pages become a private copy-on-write mapping of the file: the process keeps reading the same
/// bytes from the same frames, and whatever the allocator later writes there is copied away
/// from the file.
#[derive(Debug)]
pub struct KernelMove {
    dev: Arc<kzero::Device>,
    file: Option<Arc<KzeroFile>>,
    min_len: usize,
    /// Buffers placed so far: start address -> (length, file offset).
    placed: BTreeMap<usize, (usize, u64)>,
    /// Page ranges moved so far: start -> end.
    moved: BTreeMap<usize, usize>,
}

impl KernelMove {
    /// Buffers shorter than this are left to the next way (a copy is cheaper).
    pub const DEFAULT_MIN_LEN: usize = 64 << 10;

    /// A mover using the opened device; buffers of at least `min_len` bytes are moved.
    pub fn new(dev: Arc<kzero::Device>, min_len: usize) -> Self {
        KernelMove { dev, file: None, min_len, placed: BTreeMap::new(), moved: BTreeMap::new() }
    }

    /// The mover when `/dev/quiver-kzero` is present, `None` otherwise (or if it cannot be
    /// opened).
    pub fn if_available() -> Option<Self> {
        let dev = kzero::Device::open().ok().flatten()?;
        Some(Self::new(Arc::new(dev), Self::DEFAULT_MIN_LEN))
    }

    fn file(&mut self) -> Result<Arc<KzeroFile>> {
        if let Some(f) = &self.file {
            return Ok(f.clone());
        }
        let f = Arc::new(KzeroFile::new(&self.dev)?);
        self.file = Some(f.clone());
        Ok(f)
    }

    fn overlaps_moved(&self, start: usize, end: usize) -> bool {
        self.moved.range(..end).next_back().is_some_and(|(_, &e)| e > start)
    }

    /// Appends one page holding `bytes` at `at` (zeros elsewhere); returns its file offset.
    fn append_copy(&self, file: &KzeroFile, bytes: &[u8], at: usize) -> Result<u64> {
        let page = page_size();
        let staging = Staging::new(page)?;
        // SAFETY: `at + bytes.len() <= page` (a head or tail is shorter than a page), inside the
        // staging page this function owns; the source is a live slice elsewhere.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), staging.ptr.as_ptr().cast::<u8>().add(at), bytes.len()) };
        // SAFETY: the staging page is this function's own private anonymous mapping, which
        // nothing else touches; it is unmapped right after.
        let m = unsafe { self.dev.deanon(file.fd.as_fd(), staging.ptr.as_ptr() as usize, page, kzero::DEANON_PRIVATE) }?;
        Ok(m.offset)
    }
}

/// One private anonymous page, unmapped on drop: where a buffer's head or tail is staged.
struct Staging {
    ptr: NonNull<c_void>,
    len: usize,
}

impl Staging {
    fn new(len: usize) -> Result<Self> {
        let nz = NonZeroUsize::new(len).expect("a page is never empty");
        // SAFETY: a fresh anonymous mapping chosen by the kernel; it overlaps nothing we own.
        let ptr = unsafe { mman::mmap_anonymous(None, nz, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_PRIVATE) }
            .map_err(|e| ShmError::Map { len, source: errno(e) })?;
        Ok(Staging { ptr, len })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`; nothing points into it any more.
        let _ = unsafe { mman::munmap(self.ptr, self.len) };
    }
}

impl Deanonymize for KernelMove {
    fn way(&self) -> Way {
        Way::Moved
    }

    fn place(&mut self, bytes: &[u8], align: usize) -> Result<Option<Placement>> {
        let (p, n) = (bytes.as_ptr() as usize, bytes.len());
        let page = page_size();
        if n < self.min_len || align > page || !p.is_multiple_of(align) {
            return Ok(None);
        }
        if let Some(&(len, offset)) = self.placed.get(&p)
            && len == n
            && let Some(f) = &self.file
        {
            return Ok(Some(Placement { segment: f.clone() as Arc<dyn Shareable>, offset, copied: 0 }));
        }
        let (first, last) = (p.next_multiple_of(page), (p + n) / page * page);
        if last <= first || self.overlaps_moved(p / page * page, (p + n).next_multiple_of(page)) {
            return Ok(None);
        }
        let file = self.file()?;
        let (head, tail) = (first - p, p + n - last);
        let head_off = if head > 0 { Some(self.append_copy(&file, &bytes[..head], page - head)?) } else { None };
        // SAFETY: the range lies wholly inside `bytes`, an immutable buffer this writer reads;
        // with DEANON_PRIVATE the process keeps reading the same bytes there and any later
        // write (by the allocator, once the buffer is freed) is copied away from the file.
        let moved = unsafe { self.dev.deanon(file.fd.as_fd(), first, last - first, kzero::DEANON_PRIVATE) };
        let m = match moved {
            Ok(m) => m,
            // Memory the module does not take (not private anonymous, mlocked, pinned by
            // someone else): the next way copies it. A staged head page stays unused.
            Err(KzeroError::Invalid | KzeroError::NotMapped | KzeroError::NotPermitted | KzeroError::Busy) => {
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let offset = match head_off {
            Some(h) if h + page as u64 == m.offset => h + (page - head) as u64,
            Some(_) => return Err(ShmError::layout("kzero file grew between a buffer's head and body")),
            None => m.offset,
        };
        if tail > 0 {
            let t = self.append_copy(&file, &bytes[n - tail..], 0)?;
            if t != m.offset + (last - first) as u64 {
                return Err(ShmError::layout("kzero file grew between a buffer's body and tail"));
            }
        }
        self.moved.insert(first, last);
        self.placed.insert(p, (n, offset));
        let copied = (head + tail) as u64 + m.pages_copied * page as u64;
        Ok(Some(Placement { segment: file as Arc<dyn Shareable>, offset, copied }))
    }
}

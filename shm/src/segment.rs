//! memfd-backed segments: created sealable, space reserved before any write, sealed before any
//! reader maps them.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::fcntl::{self, FallocateFlags, FcntlArg, OFlag, SealFlag};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::stat::Mode;

use crate::error::{Result, ShmError, errno};
use crate::mapping::{HUGE_PAGE, MapOptions, Mapping, fstat_size, page_size};

/// The seals a segment carries once shared: no write, shrink, grow, and no change of seals.
pub const SHARED_SEALS: SealFlag = SealFlag::F_SEAL_WRITE
    .union(SealFlag::F_SEAL_SHRINK)
    .union(SealFlag::F_SEAL_GROW)
    .union(SealFlag::F_SEAL_SEAL);

/// A writable memfd segment whose whole size is reserved.
#[derive(Debug)]
pub struct Segment {
    fd: OwnedFd,
    name: String,
    size: u64,
}

impl Segment {
    /// Creates a segment of at least `size` bytes (rounded up to a page, or to 2 MiB when
    /// `opts.huge_align`) and reserves all of it, so a full tmpfs or cgroup fails here with
    /// `ENOSPC` instead of a `SIGBUS` at first write.
    pub fn create(name: &str, size: u64, opts: MapOptions) -> Result<Self> {
        let unit = if opts.huge_align || opts.hugetlb { HUGE_PAGE } else { page_size() } as u64;
        let size = size.max(1).div_ceil(unit).checked_mul(unit).ok_or(ShmError::Reserve {
            name: name.to_owned(),
            size,
            source: std::io::Error::from_raw_os_error(libc::EOVERFLOW),
        })?;
        let cname = CString::new(name.replace('\0', "_")).expect("nul bytes replaced");
        let mut flags = MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING;
        if opts.hugetlb {
            flags |= MFdFlags::MFD_HUGETLB | MFdFlags::MFD_HUGE_2MB;
        }
        let fd = memfd_create(cname.as_c_str(), flags)
            .map_err(|e| ShmError::MemfdCreate { name: name.to_owned(), source: errno(e) })?;
        nix::unistd::ftruncate(&fd, size as i64).map_err(|e| ShmError::Truncate {
            name: name.to_owned(),
            size,
            source: errno(e),
        })?;
        fcntl::fallocate(&fd, FallocateFlags::empty(), 0, size as i64).map_err(|e| {
            ShmError::Reserve { name: name.to_owned(), size, source: errno(e) }
        })?;
        Ok(Segment { fd, name: name.to_owned(), size })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Name given at creation (shown in `/proc/PID/fd` as `memfd:NAME`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Maps the whole segment writable and shared.
    pub fn map_mut(&self, opts: MapOptions) -> Result<Mapping> {
        Mapping::new(self.fd.as_fd(), self.size as usize, true, opts)
    }

    /// Releases the memory behind `[offset, offset+len)`; reads there return zeros.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        punch_hole(self.fd.as_fd(), offset, len)
    }

    /// A read-only open of the same file: mappings made from it do not block `F_SEAL_WRITE`.
    pub fn reopen_read_only(&self) -> Result<OwnedFd> {
        reopen_read_only(self.fd.as_fd())
    }

    /// Seals the segment against write, shrink, grow and further seals. Fails (EBUSY) while any
    /// writable mapping of it is left anywhere.
    pub fn seal(self) -> Result<SealedSegment> {
        fcntl::fcntl(&self.fd, FcntlArg::F_ADD_SEALS(SHARED_SEALS))
            .map_err(|e| ShmError::Seal(errno(e)))?;
        Ok(SealedSegment { fd: self.fd, size: self.size })
    }

    /// Consumes the segment, returning its fd.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for Segment {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A sealed segment: nobody can change its bytes or size any more, so it is safe to map.
#[derive(Debug)]
pub struct SealedSegment {
    fd: OwnedFd,
    size: u64,
}

impl SealedSegment {
    /// Takes an fd received from elsewhere and checks it is a memfd carrying every seal of
    /// [`SHARED_SEALS`]. Anything else (a regular file, a pipe, an unsealed memfd) is refused.
    pub fn from_fd(fd: OwnedFd) -> Result<Self> {
        Self::check(fd, 0)
    }

    pub(crate) fn check(fd: OwnedFd, index: usize) -> Result<Self> {
        let bad = |reason: String| ShmError::BadSegment { index, reason };
        let (size, is_reg) = fstat_size(fd.as_fd())?;
        // A file of the kzero module: fcntl seals exist for shmem files only, so it carries
        // the same four seals through the module's own ioctl.
        if crate::kzero::is_kzero(fd.as_fd()) {
            let (seals, _) = crate::kzero::seals(fd.as_fd()).map_err(|e| bad(format!("kzero file: {e}")))?;
            if seals & crate::kzero::SEAL_ALL != crate::kzero::SEAL_ALL {
                return Err(bad(format!("kzero file is not sealed (seals {seals:#x}, need {:#x})", crate::kzero::SEAL_ALL)));
            }
            return Ok(SealedSegment { fd, size });
        }
        if !is_reg {
            return Err(bad("not a memfd (not a regular file: a pipe, socket or device?)".into()));
        }
        // F_GET_SEALS only works on memfds (and shmem files); EINVAL means an ordinary file.
        let seals = fcntl::fcntl(&fd, FcntlArg::F_GET_SEALS)
            .map_err(|e| bad(format!("not a memfd (F_GET_SEALS: {e})")))?;
        let seals = SealFlag::from_bits_truncate(seals);
        if !seals.contains(SHARED_SEALS) {
            return Err(bad(format!("memfd is not sealed (seals {seals:?}, need {SHARED_SEALS:?})")));
        }
        Ok(SealedSegment { fd, size })
    }

    /// Size in bytes, fixed by the seals.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Maps the segment read-only. A write through the mapping faults.
    pub fn map(&self, opts: MapOptions) -> Result<Mapping> {
        Mapping::new(self.fd.as_fd(), self.size as usize, false, opts)
    }

    /// Consumes the segment, returning its fd.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Duplicates the fd (for sending the segment to several readers).
    pub fn try_clone(&self) -> Result<SealedSegment> {
        let fd = self.fd.try_clone().map_err(|source| ShmError::Fd { call: "dup", source })?;
        Ok(SealedSegment { fd, size: self.size })
    }
}

impl AsFd for SealedSegment {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

pub(crate) fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    fcntl::fallocate(
        fd,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        len as i64,
    )
    .map_err(|e| ShmError::PunchHole { offset, len, source: errno(e) })
}

pub(crate) fn reopen_read_only(fd: BorrowedFd<'_>) -> Result<OwnedFd> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    fcntl::open(path.as_str(), OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| ShmError::Fd { call: "open(/proc/self/fd, O_RDONLY)", source: errno(e) })
}

//! The quiver-kzero kernel module (`kmod/`), when it is loaded: moves the pages behind private
//! anonymous memory into a shareable file without copying them.
//!
//! [`Device::open`] returns `Ok(None)` when `/dev/quiver-kzero` does not exist, so callers fall
//! back to copying. The ioctl numbers and structs mirror `kmod/include/uapi/linux/quiver_kzero.h`.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// Where the module's device appears.
pub const DEVICE_PATH: &str = "/dev/quiver-kzero";
/// `fstatfs` `f_type` of a kzero file.
pub const MAGIC: i64 = 0x717a_6b30;

/// Seal against further seals (`F_SEAL_SEAL`).
pub const SEAL_SEAL: u64 = 0x1;
/// Seal against shrinking (`F_SEAL_SHRINK`).
pub const SEAL_SHRINK: u64 = 0x2;
/// Seal against growing (`F_SEAL_GROW`): `DEANON` refuses with `EPERM`.
pub const SEAL_GROW: u64 = 0x4;
/// Seal against writing (`F_SEAL_WRITE`): no writable shared mapping is left or allowed.
pub const SEAL_WRITE: u64 = 0x8;
/// All four seals, what a segment carries once shared.
pub const SEAL_ALL: u64 = 0xf;

/// The caller's range becomes a private (copy-on-write) mapping of the file.
pub const DEANON_PRIVATE: u64 = 1 << 0;
/// Refuse (`EBUSY`) instead of copying pages shared with another process.
pub const DEANON_NO_COPY: u64 = 1 << 1;

const IOC_MAGIC: u64 = 0xb9;

const fn iowr<T>(nr: u64) -> u64 {
    (3 << 30) | ((size_of::<T>() as u64) << 16) | (IOC_MAGIC << 8) | nr
}

#[repr(C)]
#[derive(Debug, Default)]
struct NewFileArg {
    flags: u64,
    fd: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct DeanonArg {
    fd: u64,
    addr: u64,
    len: u64,
    flags: u64,
    offset: u64,
    pages_moved: u64,
    pages_copied: u64,
    pages_zeroed: u64,
}

/// The module's counters (also in `/sys/class/misc/quiver-kzero/`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Pages moved without a copy, in total.
    pub pages_moved: u64,
    /// Pages copied because they were shared after fork, in total.
    pub pages_copied: u64,
    /// Never-touched pages filled with zeros, in total.
    pub pages_zeroed: u64,
    /// Pages held by live files now.
    pub pages_live: u64,
    /// Files not yet released.
    pub files_live: u64,
    /// Successful `DEANON` calls.
    pub deanon_calls: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct SealsArg {
    seals: u64,
    size: u64,
}

const NEW_FILE: u64 = iowr::<NewFileArg>(0x01);
const DEANON: u64 = iowr::<DeanonArg>(0x02);
const STATS: u64 = iowr::<Stats>(0x03);
const ADD_SEALS: u64 = iowr::<SealsArg>(0x10);
const GET_SEALS: u64 = iowr::<SealsArg>(0x11);

/// What went wrong talking to the module; each variant names the refusal by its errno.
#[derive(Debug, thiserror::Error)]
pub enum KzeroError {
    /// The device exists but could not be opened.
    #[error("opening {DEVICE_PATH} failed")]
    Open(#[source] io::Error),
    /// Unaligned address or length, zero length, unknown flags, memory that is not private
    /// anonymous data, or an fd that is not a kzero file (`EINVAL`).
    #[error("DEANON refused the range or the fd (EINVAL)")]
    Invalid,
    /// Part of the range is not mapped (`ENOMEM`).
    #[error("part of the range is not mapped (ENOMEM)")]
    NotMapped,
    /// The range wraps around the address space (`EOVERFLOW`).
    #[error("the range wraps around (EOVERFLOW)")]
    Overflow,
    /// mlocked memory, or a file sealed against growth (`EPERM`).
    #[error("mlocked memory or a file sealed against growth (EPERM)")]
    NotPermitted,
    /// Pages pinned by someone else, or shared pages with [`DEANON_NO_COPY`]; or a write seal
    /// while a writable mapping exists (`EBUSY`).
    #[error("pages pinned elsewhere or shared, or a writable mapping is left (EBUSY)")]
    Busy,
    /// Any other failure of an ioctl.
    #[error("{call} failed")]
    Ioctl {
        /// The ioctl.
        call: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

impl KzeroError {
    fn from_errno(call: &'static str, e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::EINVAL) => KzeroError::Invalid,
            Some(libc::ENOMEM) => KzeroError::NotMapped,
            Some(libc::EOVERFLOW) => KzeroError::Overflow,
            Some(libc::EPERM) => KzeroError::NotPermitted,
            Some(libc::EBUSY) => KzeroError::Busy,
            _ => KzeroError::Ioctl { call, source: e },
        }
    }
}

/// What one `DEANON` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    /// File offset where the range's first page landed.
    pub offset: u64,
    /// Pages whose frame did not change.
    pub pages_moved: u64,
    /// Pages the kernel copied (they were shared with another process after fork).
    pub pages_copied: u64,
    /// Never-touched pages, now zero-filled.
    pub pages_zeroed: u64,
}

fn ioctl<T>(fd: BorrowedFd<'_>, call: &'static str, req: u64, arg: &mut T) -> Result<(), KzeroError> {
    // SAFETY: `req` encodes the size of `T`, a #[repr(C)] struct matching the uapi header, and
    // `arg` is a valid exclusive reference for the call's duration.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
    if r < 0 { Err(KzeroError::from_errno(call, io::Error::last_os_error())) } else { Ok(()) }
}

/// An open `/dev/quiver-kzero`.
#[derive(Debug)]
pub struct Device {
    fd: OwnedFd,
}

impl Device {
    /// Opens the device; `Ok(None)` when the module is not loaded.
    pub fn open() -> Result<Option<Device>, KzeroError> {
        match OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open(DEVICE_PATH) {
            Ok(f) => Ok(Some(Device { fd: f.into() })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(KzeroError::Open(e)),
        }
    }

    /// A new empty kzero file (close-on-exec).
    pub fn new_file(&self) -> Result<OwnedFd, KzeroError> {
        let mut a = NewFileArg { flags: 1, fd: 0 };
        ioctl(self.fd.as_fd(), "NEW_FILE", NEW_FILE, &mut a)?;
        // SAFETY: the kernel installed a new descriptor whose number it returned; nobody else
        // owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(a.fd as i32) })
    }

    /// Moves the pages of `[addr, addr+len)` (page aligned) to the end of `file`.
    ///
    /// # Safety
    ///
    /// Afterwards the range is a mapping of `file`: shared (a write reaches the file and every
    /// reader) unless `flags` has [`DEANON_PRIVATE`]. The caller must own the range and no other
    /// thread may change its mappings during the call.
    pub unsafe fn deanon(&self, file: BorrowedFd<'_>, addr: usize, len: usize, flags: u64) -> Result<Moved, KzeroError> {
        let mut a = DeanonArg { fd: file.as_raw_fd() as u64, addr: addr as u64, len: len as u64, flags, ..Default::default() };
        ioctl(self.fd.as_fd(), "DEANON", DEANON, &mut a)?;
        Ok(Moved {
            offset: a.offset,
            pages_moved: a.pages_moved,
            pages_copied: a.pages_copied,
            pages_zeroed: a.pages_zeroed,
        })
    }

    /// The module's counters.
    pub fn stats(&self) -> Result<Stats, KzeroError> {
        let mut s = Stats::default();
        ioctl(self.fd.as_fd(), "STATS", STATS, &mut s)?;
        Ok(s)
    }
}

/// Adds seals (`SEAL_*` bits) to a kzero file.
pub fn add_seals(file: BorrowedFd<'_>, seals: u64) -> Result<(), KzeroError> {
    let mut a = SealsArg { seals, size: 0 };
    ioctl(file, "ADD_SEALS", ADD_SEALS, &mut a)
}

/// The seals and size of a kzero file.
pub fn seals(file: BorrowedFd<'_>) -> Result<(u64, u64), KzeroError> {
    let mut a = SealsArg::default();
    ioctl(file, "GET_SEALS", GET_SEALS, &mut a)?;
    Ok((a.seals, a.size))
}

/// Whether `fd` is a kzero file (by its file system's magic number, so no ioctl is sent to a
/// file of another kind).
pub fn is_kzero(fd: BorrowedFd<'_>) -> bool {
    const FS_TYPE: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0x717a_6b30);
    nix::sys::statfs::fstatfs(fd).is_ok_and(|s| s.filesystem_type() == FS_TYPE)
}

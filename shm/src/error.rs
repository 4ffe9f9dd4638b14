//! Errors of the shared-memory layer, one variant per failing step.

use std::io;

/// What went wrong in a segment, arena, SIPC or transport operation.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// `memfd_create` failed.
    #[error("memfd_create({name}) failed")]
    MemfdCreate {
        /// Segment name.
        name: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reserving the segment's space failed (ENOSPC when tmpfs or the cgroup is full).
    #[error("reserving {size} bytes for segment {name} failed")]
    Reserve {
        /// Segment name.
        name: String,
        /// Bytes asked for.
        size: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Setting the segment's size failed.
    #[error("ftruncate of segment {name} to {size} bytes failed")]
    Truncate {
        /// Segment name.
        name: String,
        /// Size asked for.
        size: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// `mmap` failed.
    #[error("mmap of {len} bytes failed")]
    Map {
        /// Length asked for.
        len: usize,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// `madvise` failed.
    #[error("madvise({advice}) failed")]
    Advise {
        /// The advice given.
        advice: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Punching a hole failed.
    #[error("punching a hole at {offset}+{len} failed")]
    PunchHole {
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Adding seals failed (EBUSY while a writable mapping is left).
    #[error("sealing segment failed (a writable mapping may still exist)")]
    Seal(#[source] io::Error),
    /// A system call on a segment's fd failed.
    #[error("{call} on a segment fd failed")]
    Fd {
        /// The call that failed.
        call: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// An fd given as a segment is not a sealed memfd.
    #[error("segment {index}: {reason}")]
    BadSegment {
        /// Index of the segment in the descriptor.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// An allocation does not fit the arena's limits.
    #[error("arena allocation of {size} bytes (align {align}) refused: {reason}")]
    Alloc {
        /// Bytes asked for.
        size: usize,
        /// Alignment asked for.
        align: usize,
        /// Why.
        reason: &'static str,
    },
    /// The descriptor is malformed.
    #[error("invalid SIPC descriptor: {0}")]
    Descriptor(String),
    /// The descriptor's version is not one this reader knows.
    #[error("unsupported SIPC version {found} (this reader knows {known})")]
    Version {
        /// Version found.
        found: u16,
        /// Version known.
        known: u16,
    },
    /// The table's data is not valid Arrow.
    #[error("invalid table data: {0}")]
    Layout(String),
    /// The de-anonymization kernel module refused or failed.
    #[error("quiver-kzero: {0}")]
    Kzero(#[from] crate::kzero::KzeroError),
    /// An Arrow operation failed.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    /// Sending or receiving over a socket failed.
    #[error("transport: {call} failed")]
    Transport {
        /// The call that failed.
        call: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The peer broke the transport protocol.
    #[error("transport protocol: {0}")]
    Protocol(String),
}

impl ShmError {
    pub(crate) fn desc(msg: impl Into<String>) -> Self {
        Self::Descriptor(msg.into())
    }

    pub(crate) fn layout(msg: impl Into<String>) -> Self {
        Self::Layout(msg.into())
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = ShmError> = std::result::Result<T, E>;

pub(crate) fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

//! The ways a buffer reaches shareable memory, tried in order for every buffer the writer
//! meets: reference it where it already lies in an arena, move its pages with the kernel
//! module (a later addition), or copy it, which always works and is always counted.

use std::fmt::Debug;
use std::sync::Arc;

use crate::arena::{Arena, ArenaOptions, ArenaRegion, Chunk};
use crate::error::Result;
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

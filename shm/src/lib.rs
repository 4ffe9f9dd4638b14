//! quiver-shm: memfd segments, an arena that Arrow buffers are built in, and SIPC, the format
//! that hands Arrow tables between processes without copying their bytes.
//!
//! A producer builds batches in an [`Arena`] (directly with [`ArenaVec`], or with any Arrow code
//! inside [`Arena::scope`] when [`ArenaAlloc`] is the global allocator), writes them with a
//! [`sipc::TableWriter`] (which references arena buffers and copies the rest), and sends the
//! result with [`transport::send_table`]. A consumer receives it with [`transport::recv`] and
//! maps it with [`sipc::read_table`].

pub mod arena;
pub mod cmalloc;
pub mod error;
pub mod global;
pub mod kzero;
pub mod mapping;
pub mod pagemap;
pub mod registry;
pub mod segment;
pub mod sipc;
pub mod transport;

pub use arena::{ALIGN, Arena, ArenaOptions, ArenaRegion, ArenaVec, Chunk};
pub use error::{Result, ShmError};
pub use global::ArenaAlloc;
pub use mapping::{MapOptions, Mapping};
pub use registry::live_chunks;
pub use segment::{SHARED_SEALS, SealedSegment, Segment};

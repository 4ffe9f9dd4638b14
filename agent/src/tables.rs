//! Tables the agent holds: sealed segments and their descriptor. The agent reads descriptors
//! (to describe a table) but never maps table data.

use std::sync::Arc;

use quiver_shm::SealedSegment;
use serde::Serialize;

/// A table in sealed segments.
#[derive(Debug)]
pub struct StoredTable {
    /// The SIPC descriptor.
    pub descriptor: Vec<u8>,
    /// One sealed memfd per segment.
    pub segments: Vec<SealedSegment>,
    /// Rows.
    pub rows: u64,
    /// Bytes of its segments.
    pub bytes: u64,
    /// The Arrow IPC schema flatbuffer, from the descriptor.
    pub schema_ipc: Vec<u8>,
    /// Memory its segments hold (allocated pages, from `fstat`), at most `bytes`.
    pub alloc_bytes: u64,
    /// Its segments in the memory manager's books, until dropped.
    tracked: Vec<crate::memory::SegKey>,
}

impl Drop for StoredTable {
    fn drop(&mut self) {
        crate::memory::untrack(&self.tracked);
    }
}

/// A table as the API lists it.
#[derive(Debug, Clone, Serialize)]
pub struct TableInfo {
    /// Name (`RUN.NODE` for a run's pinned tables).
    pub name: String,
    /// Rows.
    pub rows: u64,
    /// Bytes of its segments.
    pub bytes: u64,
    /// Segments.
    pub segments: usize,
    /// Columns as `name: type`.
    pub columns: Vec<String>,
}

impl StoredTable {
    /// A table in `segments`, noted in the memory manager's books while it lives.
    pub fn new(descriptor: Vec<u8>, segments: Vec<SealedSegment>, rows: u64, schema_ipc: Vec<u8>) -> StoredTable {
        let bytes = segments.iter().map(|s| s.size()).sum();
        let (tracked, alloc_bytes) = crate::memory::track(&segments);
        StoredTable { descriptor, segments, rows, bytes, schema_ipc, alloc_bytes, tracked }
    }

    /// The table's schema (from its descriptor's flatbuffer).
    pub fn schema(&self) -> Option<arrow_schema::Schema> {
        arrow_ipc::root_as_schema(&self.schema_ipc).ok().and_then(|fb| arrow_ipc::convert::try_fb_to_schema(fb).ok())
    }

    /// Describes the table from its schema.
    pub fn info(&self, name: &str) -> TableInfo {
        let columns = self
            .schema()
            .map(|s| s.fields().iter().map(|f| format!("{}: {}", f.name(), f.data_type())).collect())
            .unwrap_or_default();
        TableInfo { name: name.to_owned(), rows: self.rows, bytes: self.bytes, segments: self.segments.len(), columns }
    }
}

/// Shared handle to a stored table.
pub type TableRef = Arc<StoredTable>;

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
    /// Describes the table from its schema.
    pub fn info(&self, name: &str) -> TableInfo {
        let columns = arrow_ipc::root_as_schema(&self.schema_ipc)
            .ok()
            .and_then(|fb| arrow_ipc::convert::try_fb_to_schema(fb).ok())
            .map(|s| s.fields().iter().map(|f| format!("{}: {}", f.name(), f.data_type())).collect())
            .unwrap_or_default();
        TableInfo { name: name.to_owned(), rows: self.rows, bytes: self.bytes, segments: self.segments.len(), columns }
    }
}

/// Shared handle to a stored table.
pub type TableRef = Arc<StoredTable>;

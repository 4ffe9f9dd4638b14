//! The SIPC descriptor's byte layout (see docs/sipc.md): a fixed header, the segment table, the
//! Arrow IPC schema message, then one tree of nodes and buffer references per dictionary and
//! per record batch. Everything is little-endian with fixed-width fields, so decoding is a
//! bounded walk with no recursion; the tree's shape comes from the schema.

use crate::error::{Result, ShmError};

/// First bytes of every descriptor.
pub const MAGIC: [u8; 4] = *b"QSPC";
/// The format version this crate writes and reads.
pub const VERSION: u16 = 1;
/// Segment index meaning "no buffer" (an absent validity bitmap, an empty buffer).
pub const NO_SEGMENT: u32 = u32::MAX;

pub(crate) const HEADER_LEN: usize = 32;
pub(crate) const NODE_LEN: usize = 40;
pub(crate) const BUFFER_LEN: usize = 24;

/// Hard limits a reader enforces before trusting any count in a descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest descriptor accepted, in bytes.
    pub max_descriptor_bytes: usize,
    /// Most segments (and so fds) per descriptor.
    pub max_segments: usize,
    /// Deepest type nesting accepted.
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_descriptor_bytes: 64 << 20, max_segments: 4096, max_depth: 64 }
    }
}

/// One array (or child array) of a tree, in pre-order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Node {
    /// Logical length.
    pub length: u64,
    /// Offset into the buffers, in elements (non-zero for sliced arrays).
    pub offset: u64,
    /// Number of nulls.
    pub null_count: u64,
    /// Bit offset of the validity bitmap.
    pub validity_offset: u64,
    /// Dictionary index for dictionary arrays, variadic buffer count for view arrays, else 0.
    pub aux: u64,
}

/// Where one buffer's bytes are: a range of one of the descriptor's segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BufferRef {
    /// Index into the segment table, or [`NO_SEGMENT`].
    pub segment: u32,
    /// Byte offset in the segment.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

impl BufferRef {
    /// The reference for "no buffer".
    pub const NONE: BufferRef = BufferRef { segment: NO_SEGMENT, offset: 0, length: 0 };
}

/// Nodes and buffers of one record batch or dictionary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    /// Number of rows (for a dictionary, its length).
    pub rows: u64,
    /// Nodes in pre-order.
    pub nodes: Vec<Node>,
    /// Buffers in the order the nodes use them.
    pub buffers: Vec<BufferRef>,
}

/// A decoded descriptor, checked for structure but not yet against segments or schema.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawDescriptor {
    /// Size of each segment as the writer saw it.
    pub segment_sizes: Vec<u64>,
    /// The Arrow IPC `Message` flatbuffer holding the schema.
    pub schema_ipc: Vec<u8>,
    /// Dictionaries, referenced by index from dictionary nodes.
    pub dictionaries: Vec<Tree>,
    /// Record batches.
    pub batches: Vec<Tree>,
}

impl RawDescriptor {
    /// Serializes the descriptor.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(self.segment_sizes.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.schema_ipc.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.dictionaries.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.batches.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.encoded_len() as u64).to_le_bytes());
        for s in &self.segment_sizes {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out.extend_from_slice(&self.schema_ipc);
        out.resize(out.len().next_multiple_of(8), 0);
        for t in self.dictionaries.iter().chain(&self.batches) {
            out.extend_from_slice(&t.rows.to_le_bytes());
            out.extend_from_slice(&(t.nodes.len() as u32).to_le_bytes());
            out.extend_from_slice(&(t.buffers.len() as u32).to_le_bytes());
            for n in &t.nodes {
                for v in [n.length, n.offset, n.null_count, n.validity_offset, n.aux] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            for b in &t.buffers {
                out.extend_from_slice(&b.segment.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
                out.extend_from_slice(&b.offset.to_le_bytes());
                out.extend_from_slice(&b.length.to_le_bytes());
            }
        }
        debug_assert_eq!(out.len(), self.encoded_len());
        out
    }

    fn encoded_len(&self) -> usize {
        let trees: usize = self
            .dictionaries
            .iter()
            .chain(&self.batches)
            .map(|t| 16 + t.nodes.len() * NODE_LEN + t.buffers.len() * BUFFER_LEN)
            .sum();
        HEADER_LEN + self.segment_sizes.len() * 8 + self.schema_ipc.len().next_multiple_of(8) + trees
    }

    /// Parses a descriptor, checking every count against `limits` and the bytes present before
    /// allocating for it. Never panics, whatever the input.
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<RawDescriptor> {
        if bytes.len() > limits.max_descriptor_bytes {
            return Err(ShmError::desc(format!(
                "{} bytes is over the limit of {}",
                bytes.len(),
                limits.max_descriptor_bytes
            )));
        }
        let mut r = Cursor { bytes, pos: 0 };
        if r.take(4)? != MAGIC {
            return Err(ShmError::desc("bad magic (not a SIPC descriptor)"));
        }
        let version = r.u16()?;
        if version != VERSION {
            return Err(ShmError::Version { found: version, known: VERSION });
        }
        if r.u16()? != 0 {
            return Err(ShmError::desc("reserved flags are set"));
        }
        let n_segments = r.u32()? as usize;
        let schema_len = r.u32()? as usize;
        let n_dicts = r.u32()? as usize;
        let n_batches = r.u32()? as usize;
        let total = r.u64()?;
        if total != bytes.len() as u64 {
            return Err(ShmError::desc(format!(
                "descriptor says {total} bytes but {} arrived (truncated or padded)",
                bytes.len()
            )));
        }
        if n_segments > limits.max_segments {
            return Err(ShmError::desc(format!(
                "{n_segments} segments is over the limit of {}",
                limits.max_segments
            )));
        }
        // Each entry takes at least 8 bytes, so a count larger than what is left is a lie.
        let left = r.left();
        if n_segments.saturating_mul(8) > left || n_dicts.saturating_add(n_batches).saturating_mul(16) > left {
            return Err(ShmError::desc("counts exceed the descriptor's size"));
        }
        let segment_sizes = (0..n_segments).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
        let schema_ipc = r.take(schema_len)?.to_vec();
        r.take(schema_len.next_multiple_of(8) - schema_len)?;
        let mut trees = Vec::with_capacity(n_dicts + n_batches);
        for _ in 0..n_dicts + n_batches {
            trees.push(r.tree()?);
        }
        if r.left() != 0 {
            return Err(ShmError::desc(format!("{} trailing bytes", r.left())));
        }
        let batches = trees.split_off(n_dicts);
        Ok(RawDescriptor { segment_sizes, schema_ipc, dictionaries: trees, batches })
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.left() {
            return Err(ShmError::desc(format!(
                "truncated: wanted {n} bytes at offset {}, {} left",
                self.pos,
                self.left()
            )));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn tree(&mut self) -> Result<Tree> {
        let rows = self.u64()?;
        let n_nodes = self.u32()? as usize;
        let n_buffers = self.u32()? as usize;
        let need = n_nodes.saturating_mul(NODE_LEN).saturating_add(n_buffers.saturating_mul(BUFFER_LEN));
        if need > self.left() {
            return Err(ShmError::desc(format!(
                "tree of {n_nodes} nodes and {n_buffers} buffers does not fit in {} bytes",
                self.left()
            )));
        }
        let mut nodes = Vec::with_capacity(n_nodes);
        for _ in 0..n_nodes {
            nodes.push(Node {
                length: self.u64()?,
                offset: self.u64()?,
                null_count: self.u64()?,
                validity_offset: self.u64()?,
                aux: self.u64()?,
            });
        }
        let mut buffers = Vec::with_capacity(n_buffers);
        for _ in 0..n_buffers {
            let segment = self.u32()?;
            if self.u32()? != 0 {
                return Err(ShmError::desc("reserved buffer field is set"));
            }
            buffers.push(BufferRef { segment, offset: self.u64()?, length: self.u64()? });
        }
        Ok(Tree { rows, nodes, buffers })
    }
}

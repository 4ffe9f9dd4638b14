//! The SIPC writer: turns RecordBatches into a descriptor plus sealed segments, referencing
//! every buffer that already lies in shareable memory and copying (and counting) the rest.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow_array::{Array, RecordBatch};
use arrow_data::{ArrayData, BufferSpec, layout};
use arrow_ipc::convert::IpcSchemaEncoder;
use arrow_ipc::writer::DictionaryTracker;
use arrow_schema::{DataType, SchemaRef};

use super::deanon::{CopyToArena, Deanonymize, KernelMove, Placement, Reference, Shareable, Way};
use super::format::{BufferRef, Node, RawDescriptor, Tree};
use crate::error::{Result, ShmError};
use crate::segment::SealedSegment;

/// What a write cost: how many buffers and bytes went each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Buffers referenced where they lay.
    pub buffers_referenced: u64,
    /// Bytes referenced where they lay.
    pub bytes_referenced: u64,
    /// Buffers whose pages the kernel moved.
    pub buffers_moved: u64,
    /// Bytes the kernel moved.
    pub bytes_moved: u64,
    /// Buffers copied (wholly or in part).
    pub buffers_copied: u64,
    /// Bytes copied.
    pub bytes_copied: u64,
}

impl WriteStats {
    fn count(&mut self, way: Way, len: u64, copied: u64) {
        match way {
            Way::Reference => {
                self.buffers_referenced += 1;
                self.bytes_referenced += len;
            }
            Way::Moved => {
                self.buffers_moved += 1;
                self.bytes_moved += len - copied;
            }
            Way::Copy => {}
        }
        if copied > 0 {
            self.buffers_copied += 1;
            self.bytes_copied += copied;
        }
    }

    /// Adds another write's statistics to these.
    pub fn add(&mut self, o: &WriteStats) {
        self.buffers_referenced += o.buffers_referenced;
        self.bytes_referenced += o.bytes_referenced;
        self.buffers_moved += o.buffers_moved;
        self.bytes_moved += o.bytes_moved;
        self.buffers_copied += o.buffers_copied;
        self.bytes_copied += o.bytes_copied;
    }
}

/// A table ready to cross a process boundary: the descriptor and its sealed segments, in the
/// order the descriptor indexes them.
#[derive(Debug)]
pub struct SipcTable {
    /// The encoded descriptor.
    pub descriptor: Vec<u8>,
    /// Sealed segments, one fd each.
    pub segments: Vec<SealedSegment>,
    /// What writing cost.
    pub stats: WriteStats,
}

/// Builds one SIPC table from record batches of one schema.
#[derive(Debug)]
pub struct TableWriter {
    schema: SchemaRef,
    ways: Vec<Box<dyn Deanonymize>>,
    segments: Vec<Arc<dyn Shareable>>,
    segment_index: HashMap<u64, u32>,
    /// Per segment, the ranges referenced so far (offset -> length), to keep them disjoint.
    ranges: Vec<BTreeMap<u64, u64>>,
    dictionaries: Vec<(ArrayData, Tree)>,
    batches: Vec<Tree>,
    stats: WriteStats,
}

impl TableWriter {
    /// A writer that references buffers in arena chunks and in received segments, moves the
    /// pages of other large buffers into a kzero file when `/dev/quiver-kzero` is
    /// present, and copies everything else.
    pub fn new(schema: SchemaRef) -> Self {
        let mut ways: Vec<Box<dyn Deanonymize>> = vec![Box::new(Reference)];
        if let Some(k) = KernelMove::if_available() {
            ways.push(Box::new(k));
        }
        ways.push(Box::new(CopyToArena::new("quiver-copy")));
        Self::with_ways(schema, ways)
    }

    /// A writer that forces a copy of every buffer (the baseline benchmarks compare against).
    pub fn copying(schema: SchemaRef) -> Self {
        Self::with_ways(schema, vec![Box::new(CopyToArena::new("quiver-copy"))])
    }

    /// A writer trying `ways` in order for each buffer; the last one should always succeed.
    pub fn with_ways(schema: SchemaRef, ways: Vec<Box<dyn Deanonymize>>) -> Self {
        TableWriter {
            schema,
            ways,
            segments: Vec::new(),
            segment_index: HashMap::new(),
            ranges: Vec::new(),
            dictionaries: Vec::new(),
            batches: Vec::new(),
            stats: WriteStats::default(),
        }
    }

    /// Adds one batch; its schema must equal the writer's.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.schema().fields() != self.schema.fields() {
            return Err(ShmError::layout(format!(
                "batch schema {:?} differs from the table's {:?}",
                batch.schema(),
                self.schema
            )));
        }
        let mut tree = Tree { rows: batch.num_rows() as u64, ..Default::default() };
        for col in batch.columns() {
            self.encode_array(&col.to_data(), &mut tree)?;
        }
        self.batches.push(tree);
        Ok(())
    }

    /// Seals every segment the table references and encodes the descriptor.
    pub fn finish(self) -> Result<SipcTable> {
        let mut tracker = DictionaryTracker::new(false);
        let fbb = IpcSchemaEncoder::new().with_dictionary_tracker(&mut tracker).schema_to_fb(&self.schema);
        let schema_ipc = fbb.finished_data().to_vec();
        let segments = self.segments.iter().map(|s| s.seal()).collect::<Result<Vec<_>>>()?;
        let raw = RawDescriptor {
            segment_sizes: segments.iter().map(|s| s.size()).collect(),
            schema_ipc,
            dictionaries: self.dictionaries.into_iter().map(|(_, t)| t).collect(),
            batches: self.batches,
        };
        Ok(SipcTable { descriptor: raw.encode(), segments, stats: self.stats })
    }

    fn encode_array(&mut self, data: &ArrayData, tree: &mut Tree) -> Result<()> {
        let dt = data.data_type();
        let spec = layout(dt);
        let at = tree.nodes.len();
        tree.nodes.push(Node {
            length: data.len() as u64,
            offset: data.offset() as u64,
            null_count: data.null_count() as u64,
            ..Default::default()
        });
        if spec.can_contain_null_mask {
            let r = match data.nulls() {
                Some(n) => {
                    tree.nodes[at].validity_offset = n.offset() as u64;
                    self.place(n.buffer().as_slice(), 1)?
                }
                None => BufferRef::NONE,
            };
            tree.buffers.push(r);
        }
        for (i, b) in data.buffers().iter().enumerate() {
            let align = match spec.buffers.get(i) {
                Some(BufferSpec::FixedWidth { alignment, .. }) => *alignment,
                _ => 1,
            };
            let r = self.place(b.as_slice(), align)?;
            tree.buffers.push(r);
        }
        match dt {
            DataType::Utf8View | DataType::BinaryView => {
                tree.nodes[at].aux = data.buffers().len().saturating_sub(1) as u64;
            }
            DataType::Dictionary(_, _) => {
                let values = data
                    .child_data()
                    .first()
                    .ok_or_else(|| ShmError::layout("dictionary array without values"))?;
                tree.nodes[at].aux = self.dictionary(values)?;
            }
            _ => {
                for child in data.child_data() {
                    self.encode_array(child, tree)?;
                }
            }
        }
        Ok(())
    }

    /// Index of the dictionary `values`, encoding it on first sight: batches that share a
    /// dictionary share its buffers.
    fn dictionary(&mut self, values: &ArrayData) -> Result<u64> {
        if let Some(i) = self.dictionaries.iter().position(|(d, _)| d.ptr_eq(values)) {
            return Ok(i as u64);
        }
        let mut tree = Tree { rows: values.len() as u64, ..Default::default() };
        self.encode_array(values, &mut tree)?;
        self.dictionaries.push((values.clone(), tree));
        Ok(self.dictionaries.len() as u64 - 1)
    }

    fn place(&mut self, bytes: &[u8], align: usize) -> Result<BufferRef> {
        if bytes.is_empty() {
            return Ok(BufferRef::NONE);
        }
        let len = bytes.len() as u64;
        for i in 0..self.ways.len() {
            let way = self.ways[i].way();
            let Some(p) = self.ways[i].place(bytes, align)? else { continue };
            let seg = self.segment(&p);
            match self.claim(seg, p.offset, len) {
                Ok(()) => {
                    self.stats.count(way, len, p.copied);
                    return Ok(BufferRef { segment: seg, offset: p.offset, length: len });
                }
                // A partial overlap with an earlier buffer: readers refuse those, so let a
                // later way (a copy) place this one.
                Err(()) if way == Way::Reference => continue,
                Err(()) => {
                    return Err(ShmError::layout(format!(
                        "{way:?} placed a buffer over part of another in segment {seg}"
                    )));
                }
            }
        }
        Err(ShmError::layout("no de-anonymization way could place a buffer"))
    }

    fn segment(&mut self, p: &Placement) -> u32 {
        let key = p.segment.key();
        if let Some(&i) = self.segment_index.get(&key) {
            return i;
        }
        let i = self.segments.len() as u32;
        self.segments.push(p.segment.clone());
        self.ranges.push(BTreeMap::new());
        self.segment_index.insert(key, i);
        i
    }

    /// Records `[off, off+len)` of segment `seg`; the same range twice is fine (a shared
    /// buffer), a partial overlap is not.
    fn claim(&mut self, seg: u32, off: u64, len: u64) -> Result<(), ()> {
        let ranges = &mut self.ranges[seg as usize];
        if ranges.get(&off) == Some(&len) {
            return Ok(());
        }
        let end = off + len;
        if let Some((&s, &l)) = ranges.range(..end).next_back()
            && s + l > off
        {
            return Err(());
        }
        ranges.insert(off, len);
        Ok(())
    }
}

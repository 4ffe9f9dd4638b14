//! The SIPC reader: checks a descriptor and its fds, maps each segment once read-only and
//! builds RecordBatches whose buffers point into those mappings.
//!
//! Descriptors come from untrusted processes. Before any byte of a segment is touched, every
//! fd must be a sealed memfd of the declared size and every buffer reference in bounds,
//! aligned and disjoint from the others; unless the producer is trusted, every array is then
//! validated as Arrow (offsets, UTF-8, dictionary keys, union type ids, null counts).

use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use arrow_array::{RecordBatch, RecordBatchOptions, make_array};
use arrow_buffer::{BooleanBuffer, Buffer, MutableBuffer, NullBuffer};
use arrow_data::{ArrayData, ArrayDataBuilder, BufferSpec, layout};
use arrow_schema::{DataType, Field, Schema, SchemaRef, UnionMode};

use super::format::{BufferRef, Limits, NO_SEGMENT, Node, RawDescriptor, Tree};
use crate::error::{Result, ShmError};
use crate::mapping::{MapOptions, Mapping};
use crate::segment::SealedSegment;

/// How to read a table.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadOptions {
    /// Limits on the descriptor.
    pub limits: Limits,
    /// Paging options of the read-only mappings.
    pub map: MapOptions,
    /// Fault the mappings in on a background thread (`MADV_POPULATE_READ`), so the handoff
    /// stays O(segments) while the reader's first pass meets fewer page faults.
    pub background_prefault: bool,
}

/// A table read from SIPC: batches whose buffers live in `mappings`.
#[derive(Debug)]
pub struct SipcRead {
    /// The table's schema.
    pub schema: SchemaRef,
    /// The record batches.
    pub batches: Vec<RecordBatch>,
    /// One read-only mapping per segment (kept alive by the batches too).
    pub mappings: Vec<Arc<SharedMapping>>,
}

/// A received sealed segment and its read-only mapping: the owner of every buffer read from
/// it, and a place a writer can reference when the table's buffers are passed on.
#[derive(Debug)]
pub struct SharedMapping {
    id: u64,
    segment: SealedSegment,
    map: Mapping,
}

impl SharedMapping {
    fn new(segment: SealedSegment, map: Mapping) -> Arc<Self> {
        let m = Arc::new(SharedMapping { id: crate::registry::next_id(), segment, map });
        crate::registry::insert_mapped(&m);
        m
    }

    /// Process-wide id of this segment.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The read-only mapping.
    pub fn mapping(&self) -> &Mapping {
        &self.map
    }

    /// The sealed segment.
    pub fn segment(&self) -> &SealedSegment {
        &self.segment
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        crate::registry::prune_mapped();
    }
}

/// Reads a table, validating everything: the way to read from any process not fully trusted.
pub fn read_table(descriptor: &[u8], fds: Vec<OwnedFd>, opts: &ReadOptions) -> Result<SipcRead> {
    read(descriptor, fds, opts, true)
}

/// Reads a table, checking segments and references but not the Arrow contents of the arrays.
///
/// # Safety
///
/// The producer must be trusted to have written valid Arrow data (offsets in range, UTF-8
/// strings, dictionary keys and union type ids in range); invalid data is undefined behaviour
/// for whoever reads the arrays.
pub unsafe fn read_table_trusted(descriptor: &[u8], fds: Vec<OwnedFd>, opts: &ReadOptions) -> Result<SipcRead> {
    read(descriptor, fds, opts, false)
}

fn read(descriptor: &[u8], fds: Vec<OwnedFd>, opts: &ReadOptions, validate: bool) -> Result<SipcRead> {
    let raw = RawDescriptor::decode(descriptor, &opts.limits)?;
    if fds.len() != raw.segment_sizes.len() {
        return Err(ShmError::desc(format!(
            "descriptor names {} segments but {} fds came with it",
            raw.segment_sizes.len(),
            fds.len()
        )));
    }
    let schema = Arc::new(decode_schema(&raw.schema_ipc, &opts.limits)?);
    check_references(&raw)?;
    let mut mappings = Vec::with_capacity(fds.len());
    for (i, (fd, &size)) in fds.into_iter().zip(&raw.segment_sizes).enumerate() {
        let seg = SealedSegment::check(fd, i)?;
        if seg.size() != size {
            return Err(ShmError::BadSegment {
                index: i,
                reason: format!("size is {} but the descriptor says {size}", seg.size()),
            });
        }
        let map = Mapping::new(seg.as_fd(), size as usize, false, opts.map)?;
        mappings.push(SharedMapping::new(seg, map));
    }
    if opts.background_prefault && !opts.map.prefault {
        let maps = mappings.clone();
        // Best effort: a failure only means the reader takes the faults itself.
        let _ = std::thread::Builder::new().name("sipc-prefault".into()).spawn(move || {
            for m in maps {
                let _ = m.mapping().prefault();
            }
        });
    }
    let mut dicts = vec![DictSlot::Unvisited; raw.dictionaries.len()];
    let mut batches = Vec::with_capacity(raw.batches.len());
    for (b, tree) in raw.batches.iter().enumerate() {
        let mut w = Walker { tree, raw: &raw, node: 0, buf: 0, mappings: &mappings, dicts: &mut dicts, validate };
        let mut cols = Vec::with_capacity(schema.fields().len());
        for f in schema.fields() {
            cols.push(make_array(w.array(f.data_type(), tree.rows)?));
        }
        w.finish().map_err(|e| ShmError::layout(format!("batch {b}: {e}")))?;
        let rows = usize::try_from(tree.rows).map_err(|_| ShmError::desc("row count overflows"))?;
        let options = RecordBatchOptions::new().with_row_count(Some(rows));
        batches.push(RecordBatch::try_new_with_options(schema.clone(), cols, &options)?);
    }
    Ok(SipcRead { schema, batches, mappings })
}

fn decode_schema(bytes: &[u8], limits: &Limits) -> Result<Schema> {
    let fb = arrow_ipc::root_as_schema(bytes).map_err(|e| ShmError::desc(format!("schema flatbuffer: {e}")))?;
    let schema = arrow_ipc::convert::try_fb_to_schema(fb)?;
    for f in schema.fields() {
        check_type(f, 1, limits)?;
    }
    Ok(schema)
}

/// Refuses types whose layout would panic or recurse past the limit.
fn check_type(f: &Field, depth: usize, limits: &Limits) -> Result<()> {
    if depth > limits.max_depth {
        return Err(ShmError::desc(format!("type nesting deeper than {}", limits.max_depth)));
    }
    let sub = |f: &Field| check_type(f, depth + 1, limits);
    match f.data_type() {
        DataType::FixedSizeBinary(n) if *n < 0 => Err(ShmError::desc("negative FixedSizeBinary width")),
        DataType::FixedSizeList(c, n) => {
            if *n < 0 {
                return Err(ShmError::desc("negative FixedSizeList size"));
            }
            sub(c)
        }
        DataType::List(c)
        | DataType::LargeList(c)
        | DataType::ListView(c)
        | DataType::LargeListView(c)
        | DataType::Map(c, _) => sub(c),
        DataType::Struct(fs) => fs.iter().try_for_each(|c| sub(c)),
        DataType::Union(fs, _) => fs.iter().try_for_each(|(_, c)| sub(c)),
        DataType::Dictionary(k, v) => {
            if !k.is_dictionary_key_type() {
                return Err(ShmError::desc(format!("dictionary key type {k} is not an integer")));
            }
            sub(&Field::new("values", v.as_ref().clone(), true))
        }
        DataType::RunEndEncoded(r, v) => {
            if !matches!(r.data_type(), DataType::Int16 | DataType::Int32 | DataType::Int64) {
                return Err(ShmError::desc("run ends must be Int16, Int32 or Int64"));
            }
            sub(r)?;
            sub(v)
        }
        _ => Ok(()),
    }
}

/// Every reference lies inside its segment, and references are pairwise identical or disjoint.
fn check_references(raw: &RawDescriptor) -> Result<()> {
    let mut refs: Vec<(u32, u64, u64)> = Vec::new();
    for t in raw.dictionaries.iter().chain(&raw.batches) {
        for b in &t.buffers {
            if b.segment == NO_SEGMENT {
                if b.length != 0 || b.offset != 0 {
                    return Err(ShmError::desc("a buffer without segment has a range"));
                }
                continue;
            }
            let size = *raw.segment_sizes.get(b.segment as usize).ok_or_else(|| {
                ShmError::desc(format!("buffer names segment {} of {}", b.segment, raw.segment_sizes.len()))
            })?;
            let end = b.offset.checked_add(b.length).ok_or_else(|| ShmError::desc("buffer range overflows"))?;
            if end > size {
                return Err(ShmError::desc(format!(
                    "buffer {}+{} runs past the end of segment {} ({size} bytes)",
                    b.offset, b.length, b.segment
                )));
            }
            if b.length > 0 {
                refs.push((b.segment, b.offset, b.length));
            }
        }
    }
    refs.sort_unstable();
    refs.dedup();
    for w in refs.windows(2) {
        let ((s0, o0, l0), (s1, o1, _)) = (w[0], w[1]);
        if s0 == s1 && o0 + l0 > o1 {
            return Err(ShmError::desc(format!(
                "buffers overlap in segment {s0}: {o0}+{l0} and {o1}+{}",
                w[1].2
            )));
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum DictSlot {
    Unvisited,
    InProgress,
    Done(DataType, ArrayData),
}

/// Walks one tree in step with the schema's types.
struct Walker<'a> {
    tree: &'a Tree,
    raw: &'a RawDescriptor,
    node: usize,
    buf: usize,
    mappings: &'a [Arc<SharedMapping>],
    dicts: &'a mut Vec<DictSlot>,
    validate: bool,
}

fn usize_of(v: u64, what: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| ShmError::desc(format!("{what} {v} overflows")))
}

impl Walker<'_> {
    fn finish(&self) -> Result<()> {
        if self.node != self.tree.nodes.len() || self.buf != self.tree.buffers.len() {
            return Err(ShmError::desc(format!(
                "tree has {} nodes and {} buffers, the schema uses {} and {}",
                self.tree.nodes.len(),
                self.tree.buffers.len(),
                self.node,
                self.buf
            )));
        }
        Ok(())
    }

    fn next_node(&mut self) -> Result<Node> {
        let n = *self.tree.nodes.get(self.node).ok_or_else(|| ShmError::desc("too few nodes for the schema"))?;
        self.node += 1;
        Ok(n)
    }

    fn next_ref(&mut self) -> Result<BufferRef> {
        let b = *self.tree.buffers.get(self.buf).ok_or_else(|| ShmError::desc("too few buffers for the schema"))?;
        self.buf += 1;
        Ok(b)
    }

    /// The buffer behind a reference (already bounds-checked), as a zero-copy Arrow buffer.
    fn buffer(&self, r: BufferRef, align: usize) -> Result<Option<Buffer>> {
        if r.segment == NO_SEGMENT {
            return Ok(None);
        }
        if !r.offset.is_multiple_of(align as u64) {
            return Err(ShmError::desc(format!("buffer at offset {} is not aligned to {align}", r.offset)));
        }
        let map = &self.mappings[r.segment as usize];
        // SAFETY: check_references proved offset+length <= the segment size, which is the
        // mapping's length; the segment is sealed, so its size and bytes cannot change.
        let ptr = unsafe { map.mapping().as_ptr().add(r.offset as usize) } as *mut u8;
        let ptr = NonNull::new(ptr).expect("mapped addresses are non-null");
        // SAFETY: ptr..ptr+length is inside `map`, which the buffer keeps alive as its owner.
        Ok(Some(unsafe { Buffer::from_custom_allocation(ptr, r.length as usize, map.clone()) }))
    }

    fn array(&mut self, dt: &DataType, expect_len: u64) -> Result<ArrayData> {
        let node = self.next_node()?;
        if node.length != expect_len {
            return Err(ShmError::layout(format!(
                "{dt} array has length {} where {expect_len} was expected",
                node.length
            )));
        }
        self.array_from(dt, node)
    }

    fn array_from(&mut self, dt: &DataType, node: Node) -> Result<ArrayData> {
        let len = usize_of(node.length, "length")?;
        let offset = usize_of(node.offset, "offset")?;
        let spec = layout(dt);
        let mut b = ArrayDataBuilder::new(dt.clone()).len(len).offset(offset);
        if spec.can_contain_null_mask {
            let r = self.next_ref()?;
            b = b.nulls(self.nulls(r, &node, len)?);
        } else if node.null_count != 0 && !matches!(dt, DataType::Null) {
            return Err(ShmError::layout(format!("{dt} array cannot have nulls")));
        }
        let mut specs: Vec<BufferSpec> = spec.buffers;
        if spec.variadic {
            let n = usize_of(node.aux, "variadic buffer count")?;
            if n > self.tree.buffers.len() - self.buf {
                return Err(ShmError::desc(format!("{n} variadic buffers claimed, fewer left in the tree")));
            }
            specs.extend((0..n).map(|_| BufferSpec::VariableWidth));
        }
        for s in &specs {
            let r = self.next_ref()?;
            let align = match s {
                BufferSpec::FixedWidth { alignment, byte_width } => {
                    // arrow-data's validation panics on a typed buffer of a ragged length.
                    if *byte_width != 0 && r.length % *byte_width as u64 != 0 {
                        return Err(ShmError::layout(format!(
                            "{dt} buffer of {} bytes is not a whole number of {byte_width}-byte values",
                            r.length
                        )));
                    }
                    *alignment
                }
                _ => 1,
            };
            let buf = self.buffer(r, align)?.unwrap_or_else(|| MutableBuffer::new(0).into());
            b = b.add_buffer(buf);
        }
        match dt {
            DataType::Dictionary(_, vt) => {
                let values = self.dictionary(vt, node.aux)?;
                b = b.add_child_data(values);
            }
            DataType::List(c) | DataType::LargeList(c) | DataType::Map(c, _) | DataType::ListView(c) | DataType::LargeListView(c) => {
                let n = self.next_node()?;
                b = b.add_child_data(self.array_from(c.data_type(), n)?);
            }
            DataType::FixedSizeList(c, _) => {
                let n = self.next_node()?;
                b = b.add_child_data(self.array_from(c.data_type(), n)?);
            }
            DataType::Struct(fs) => {
                for f in fs {
                    let n = self.next_node()?;
                    b = b.add_child_data(self.array_from(f.data_type(), n)?);
                }
            }
            DataType::Union(fs, _) => {
                for (_, f) in fs.iter() {
                    let n = self.next_node()?;
                    b = b.add_child_data(self.array_from(f.data_type(), n)?);
                }
            }
            DataType::RunEndEncoded(r, v) => {
                let n = self.next_node()?;
                b = b.add_child_data(self.array_from(r.data_type(), n)?);
                let n = self.next_node()?;
                b = b.add_child_data(self.array_from(v.data_type(), n)?);
            }
            _ => {}
        }
        if self.validate {
            let data = build_validated(b)?;
            if let DataType::Union(_, _) = dt {
                check_union(&data)?;
            }
            Ok(data)
        } else {
            // SAFETY: the caller of read_table_trusted vouched for the producer; buffer ranges
            // were still checked against the segments.
            Ok(unsafe { b.build_unchecked() })
        }
    }

    fn nulls(&self, r: BufferRef, node: &Node, len: usize) -> Result<Option<NullBuffer>> {
        let Some(buf) = self.buffer(r, 1)? else {
            if node.null_count != 0 {
                return Err(ShmError::layout(format!("{} nulls claimed without a validity bitmap", node.null_count)));
            }
            return Ok(None);
        };
        let bit_off = usize_of(node.validity_offset, "validity offset")?;
        let bits = bit_off.checked_add(len).ok_or_else(|| ShmError::desc("validity range overflows"))?;
        if bits > buf.len().saturating_mul(8) {
            return Err(ShmError::layout(format!(
                "validity bitmap of {} bytes is too short for {bits} bits",
                buf.len()
            )));
        }
        let bb = BooleanBuffer::new(buf, bit_off, len);
        let nulls = if self.validate {
            let n = NullBuffer::new(bb);
            if n.null_count() as u64 != node.null_count {
                return Err(ShmError::layout(format!(
                    "null count says {} but the bitmap has {}",
                    node.null_count,
                    n.null_count()
                )));
            }
            n
        } else {
            let count = usize_of(node.null_count, "null count")?.min(len);
            // SAFETY: trusted producer; the count only steers fast paths of readers.
            unsafe { NullBuffer::new_unchecked(bb, count) }
        };
        Ok(Some(nulls).filter(|n| n.null_count() > 0))
    }

    fn dictionary(&mut self, value_type: &DataType, index: u64) -> Result<ArrayData> {
        let i = usize_of(index, "dictionary index")?;
        match self.dicts.get(i) {
            None => Err(ShmError::desc(format!("dictionary {i} of {}", self.dicts.len()))),
            Some(DictSlot::InProgress) => Err(ShmError::desc(format!("dictionary {i} contains itself"))),
            Some(DictSlot::Done(t, d)) => {
                if t != value_type {
                    return Err(ShmError::layout(format!("dictionary {i} is {t}, used as {value_type}")));
                }
                Ok(d.clone())
            }
            Some(DictSlot::Unvisited) => {
                self.dicts[i] = DictSlot::InProgress;
                let tree = &self.raw.dictionaries[i];
                let mut w = Walker {
                    tree,
                    raw: self.raw,
                    node: 0,
                    buf: 0,
                    mappings: self.mappings,
                    dicts: &mut *self.dicts,
                    validate: self.validate,
                };
                let d = w.array(value_type, tree.rows)?;
                w.finish().map_err(|e| ShmError::layout(format!("dictionary {i}: {e}")))?;
                self.dicts[i] = DictSlot::Done(value_type.clone(), d.clone());
                Ok(d)
            }
        }
    }
}

/// Builds and validates an array. arrow-data's validation is meant to return errors, but a
/// panic there must not take down a daemon reading an untrusted table, so it becomes an error
/// too (except under the fuzzer, which is there to find such panics).
fn build_validated(b: ArrayDataBuilder) -> Result<ArrayData> {
    #[cfg(fuzzing)]
    return Ok(b.build()?);
    #[cfg(not(fuzzing))]
    {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.build()));
        match r {
            Ok(r) => Ok(r?),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| p.downcast_ref::<&str>().copied())
                    .unwrap_or("unknown");
                Err(ShmError::layout(format!("arrow validation panicked: {msg}")))
            }
        }
    }
}

/// Union type ids name declared children, and dense offsets fall inside them (arrow-data does
/// not check either).
fn check_union(data: &ArrayData) -> Result<()> {
    let DataType::Union(fields, mode) = data.data_type() else { return Ok(()) };
    let range = data.offset()..data.offset() + data.len();
    let ids = &data.buffer::<i8>(0)[range.clone()];
    let mut child_of = [usize::MAX; 128];
    for (pos, (id, _)) in fields.iter().enumerate() {
        if id >= 0 {
            child_of[id as usize] = pos;
        }
    }
    for (i, &id) in ids.iter().enumerate() {
        let pos = if id >= 0 { child_of[id as usize] } else { usize::MAX };
        if pos == usize::MAX {
            return Err(ShmError::layout(format!("union type id {id} at {i} is not declared")));
        }
        if *mode == UnionMode::Dense {
            let off = data.buffer::<i32>(1)[range.start + i];
            let child = &data.child_data()[pos];
            if off < 0 || off as usize >= child.len() {
                return Err(ShmError::layout(format!("dense union offset {off} at {i} is out of its child")));
            }
        }
    }
    Ok(())
}

//! The scan function: Parquet files into Arrow built directly in the arena, with column
//! projection, row-group pruning from statistics, and the exact filter applied after; row
//! groups are decoded in parallel, one thread per core.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arrow_array::RecordBatch;
use arrow_schema::{Schema, SchemaRef};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
use quiver_shm::Arena;

use super::source::Source;
use super::{Output, WorkError};
use crate::filter::Filter;

/// Rows per output batch: many batches let DuckDB scan with all its threads.
pub(super) const BATCH_ROWS: usize = 128 * 1024;

/// The Parquet files of `path`: itself, or the `*.parquet` files in it, sorted.
pub fn parquet_files(path: &Path) -> Result<Vec<PathBuf>, WorkError> {
    let meta = std::fs::metadata(path).map_err(|e| WorkError::User(format!("{}: {e}", path.display())))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| WorkError::User(format!("{}: {e}", path.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    out.sort();
    if out.is_empty() {
        return Err(WorkError::User(format!("{} holds no .parquet files", path.display())));
    }
    Ok(out)
}

pub fn run(sources: &[Source], columns: Option<&[String]>, filter: Option<&Filter>) -> Result<Output, WorkError> {
    let arena = Arena::named("scan");
    let items = plan(sources, columns, filter)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(items.len()).max(1);
    // Row groups are decoded in parallel; each thread enters the arena's scope, so every Arrow
    // buffer the decoder and the filter allocate lands in the arena and is handed on by
    // reference.
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Result<Vec<RecordBatch>, WorkError>>>> = items.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                arena.scope(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        let r = decode(item, filter);
                        let failed = r.is_err();
                        *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                        if failed {
                            // Later items are not needed once one failed.
                            next.store(items.len(), Ordering::Relaxed);
                        }
                    }
                })
            });
        }
    });
    let mut out = Collected::default();
    for (item, r) in items.iter().zip(results) {
        let Some(r) = r.into_inner().unwrap_or_else(|e| e.into_inner()) else { continue };
        for b in r? {
            out.push(&item.source.path, b)?;
        }
    }
    Ok(out.finish())
}

/// A scan's output as it is assembled: every file must give the same schema; empty batches
/// are dropped.
#[derive(Default)]
pub(super) struct Collected {
    schema: Option<SchemaRef>,
    batches: Vec<RecordBatch>,
}

impl Collected {
    /// Adds a batch decoded from `file`.
    pub(super) fn push(&mut self, file: &Path, b: RecordBatch) -> Result<(), WorkError> {
        match &self.schema {
            None => self.schema = Some(b.schema()),
            Some(s) if s.fields() != b.schema().fields() => {
                return Err(WorkError::User(format!("{} has a different schema than the files before it", file.display())));
            }
            Some(_) => {}
        }
        if b.num_rows() > 0 {
            self.batches.push(b);
        }
        Ok(())
    }

    /// The output table.
    pub(super) fn finish(self) -> Output {
        Output::Table(self.batches, self.schema.unwrap_or_else(|| Arc::new(Schema::empty())))
    }
}

/// One unit of parallel work: one row group of one file.
pub(super) struct Item {
    pub(super) source: Source,
    pub(super) meta: ArrowReaderMetadata,
    pub(super) row_group: usize,
    /// Columns to read (projection plus filter columns), as root indices.
    pub(super) read: Vec<usize>,
    /// Columns to keep, by name.
    pub(super) wanted: Vec<String>,
}

/// Reads every file's footer once, checks the columns and prunes row groups by statistics.
pub(super) fn plan(sources: &[Source], columns: Option<&[String]>, filter: Option<&Filter>) -> Result<Vec<Item>, WorkError> {
    let mut items = Vec::new();
    for source in sources {
        let file = &source.path;
        let user = |e: &dyn std::fmt::Display| WorkError::User(format!("{}: {e}", file.display()));
        let meta = ArrowReaderMetadata::load(source, ArrowReaderOptions::default()).map_err(|e| user(&e))?;
        let file_schema = meta.schema().clone();
        let wanted: Vec<String> = match columns {
            Some(c) => c.to_vec(),
            None => file_schema.fields().iter().map(|f| f.name().clone()).collect(),
        };
        // Read the projection plus whatever the filter needs; drop the extra after filtering.
        let mut read_names: Vec<String> = wanted.clone();
        if let Some(f) = filter {
            for p in &f.0 {
                if !read_names.iter().any(|c| c == p.column()) {
                    read_names.push(p.column().to_owned());
                }
            }
        }
        let mut read = Vec::with_capacity(read_names.len());
        for c in &read_names {
            let i = file_schema.index_of(c).map_err(|_| {
                WorkError::User(format!("{} has no column {c:?} (it has: {})", file.display(), names(&file_schema)))
            })?;
            read.push(i);
        }
        let pq = meta.metadata().clone();
        for rg in 0..pq.num_row_groups() {
            if filter.is_none_or(|f| crate::filter::may_match(f, pq.row_group(rg), meta.parquet_schema())) {
                items.push(Item { source: source.clone(), meta: meta.clone(), row_group: rg, read: read.clone(), wanted: wanted.clone() });
            }
        }
    }
    Ok(items)
}

/// Decodes one row group, filters and projects it.
fn decode(item: &Item, filter: Option<&Filter>) -> Result<Vec<RecordBatch>, WorkError> {
    let user = |e: &dyn std::fmt::Display| WorkError::User(format!("{}: {e}", item.source.path.display()));
    let builder = ParquetRecordBatchReaderBuilder::new_with_metadata(item.source.clone(), item.meta.clone());
    let mask = ProjectionMask::roots(builder.parquet_schema(), item.read.iter().copied());
    let reader = builder
        .with_projection(mask)
        .with_row_groups(vec![item.row_group])
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(|e| user(&e))?;
    let mut out = Vec::new();
    for b in reader {
        let b = b.map_err(|e| user(&e))?;
        let b = match filter {
            Some(f) => crate::filter::apply(f, &b).map_err(WorkError::User)?,
            None => b,
        };
        out.push(project(&b, &item.wanted)?);
    }
    Ok(out)
}

pub(super) fn project(b: &RecordBatch, wanted: &[String]) -> Result<RecordBatch, WorkError> {
    let idx: Vec<usize> = wanted.iter().map(|c| b.schema().index_of(c).map_err(WorkError::system)).collect::<Result<_, _>>()?;
    b.project(&idx).map_err(WorkError::system)
}

fn names(s: &Schema) -> String {
    s.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
}

//! The scan function: Parquet files into Arrow built directly in the arena, with column
//! projection, row-group pruning from statistics, and the exact filter applied after.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::{Schema, SchemaRef};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use quiver_shm::Arena;

use super::{Output, WorkError};
use crate::filter::Filter;

/// Rows per output batch: many batches let DuckDB scan with all its threads.
const BATCH_ROWS: usize = 128 * 1024;

/// The Parquet files of `path`: itself, or the `*.parquet` files in it, sorted.
pub fn files(path: &Path) -> Result<Vec<PathBuf>, WorkError> {
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

pub fn run(path: &str, columns: Option<&[String]>, filter: Option<&Filter>) -> Result<Output, WorkError> {
    let arena = Arena::named("scan");
    // Inside the scope every Arrow buffer the decoder and the filter allocate lands in the
    // arena, so the output is handed on by reference.
    arena.scope(|| scan(Path::new(path), columns, filter))
}

fn scan(path: &Path, columns: Option<&[String]>, filter: Option<&Filter>) -> Result<Output, WorkError> {
    let mut out_schema: Option<SchemaRef> = None;
    let mut batches = Vec::new();
    for file in files(path)? {
        let f = File::open(&file).map_err(|e| WorkError::User(format!("{}: {e}", file.display())))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(f)
            .map_err(|e| WorkError::User(format!("{}: {e}", file.display())))?;
        let file_schema = builder.schema().clone();
        let wanted: Vec<String> = match columns {
            Some(c) => c.to_vec(),
            None => file_schema.fields().iter().map(|f| f.name().clone()).collect(),
        };
        // Read the projection plus whatever the filter needs; drop the extra after filtering.
        let mut read: Vec<String> = wanted.clone();
        if let Some(f) = filter {
            for p in &f.0 {
                if !read.iter().any(|c| c == p.column()) {
                    read.push(p.column().to_owned());
                }
            }
        }
        let mut indices = Vec::with_capacity(read.len());
        for c in &read {
            let i = file_schema.index_of(c).map_err(|_| {
                WorkError::User(format!("{} has no column {c:?} (it has: {})", file.display(), names(&file_schema)))
            })?;
            indices.push(i);
        }
        let meta = builder.metadata().clone();
        let row_groups: Vec<usize> = (0..meta.num_row_groups())
            .filter(|&rg| filter.is_none_or(|f| crate::filter::may_match(f, meta.row_group(rg), builder.parquet_schema())))
            .collect();
        let mask = ProjectionMask::roots(builder.parquet_schema(), indices.iter().copied());
        let reader = builder
            .with_projection(mask)
            .with_row_groups(row_groups)
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(|e| WorkError::User(format!("{}: {e}", file.display())))?;
        for b in reader {
            let b = b.map_err(|e| WorkError::User(format!("{}: {e}", file.display())))?;
            let b = match filter {
                Some(f) => crate::filter::apply(f, &b).map_err(WorkError::User)?,
                None => b,
            };
            let projected = project(&b, &wanted)?;
            match &out_schema {
                None => out_schema = Some(projected.schema()),
                Some(s) if s.fields() != projected.schema().fields() => {
                    return Err(WorkError::User(format!("{} has a different schema than the files before it", file.display())));
                }
                Some(_) => {}
            }
            if projected.num_rows() > 0 {
                batches.push(projected);
            }
        }
    }
    let schema = out_schema.unwrap_or_else(|| Arc::new(Schema::empty()));
    Ok(Output::Table(batches, schema))
}

fn project(b: &RecordBatch, wanted: &[String]) -> Result<RecordBatch, WorkError> {
    let idx: Vec<usize> = wanted.iter().map(|c| b.schema().index_of(c).map_err(WorkError::system)).collect::<Result<_, _>>()?;
    b.project(&idx).map_err(WorkError::system)
}

fn names(s: &Schema) -> String {
    s.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
}

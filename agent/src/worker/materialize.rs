//! The materialize function: a table written as Parquet into a staging folder and synced, so
//! the agent can publish it when the whole run has succeeded.

use std::fs::File;
use std::path::{Path, PathBuf};

use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use quiver_shm::sipc::SipcRead;

use super::{Output, WorkError};

pub fn run(table: &str, input: &SipcRead, staging: &Path) -> Result<Output, WorkError> {
    std::fs::create_dir_all(staging).map_err(WorkError::system)?;
    let path: PathBuf = staging.join(format!("{table}-0.parquet"));
    let f = File::create(&path).map_err(|e| WorkError::System(format!("{}: {e}", path.display())))?;
    let props = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
    let mut w = ArrowWriter::try_new(f, input.schema.clone(), Some(props)).map_err(WorkError::system)?;
    let mut rows = 0;
    for b in &input.batches {
        w.write(b).map_err(WorkError::system)?;
        rows += b.num_rows() as u64;
    }
    let f = w.into_inner().map_err(WorkError::system)?;
    f.sync_all().map_err(WorkError::system)?;
    File::open(staging).and_then(|d| d.sync_all()).map_err(WorkError::system)?;
    Ok(Output::Staged(rows, vec![path]))
}

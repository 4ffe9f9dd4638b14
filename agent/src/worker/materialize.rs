//! The materialize function: a table written as Parquet into a staging folder and synced, so
//! the agent can publish it when the whole run has succeeded.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, openat};
use nix::sys::stat::Mode;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use quiver_shm::sipc::SipcRead;

use super::{Output, WorkError};

/// The file a materialization writes in its staging folder, created (while the worker is still
/// root, before landlock) in `dir`, which is kept to sync the folder afterwards.
pub struct Staged {
    /// Its path on the host, for the agent to publish.
    pub path: PathBuf,
    file: File,
    dir: OwnedFd,
}

/// Creates `table`'s file in the staging folder `staging` (opened as `dir`).
pub fn create(table: &str, staging: &Path, dir: OwnedFd) -> Result<Staged, WorkError> {
    let name = format!("{table}-0.parquet");
    let path: PathBuf = staging.join(&name);
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC;
    let file = openat(&dir, name.as_str(), flags, Mode::from_bits_truncate(0o644)).map_err(|e| WorkError::System(format!("{}: {e}", path.display())))?;
    Ok(Staged { path, file: File::from(file), dir })
}

/// Writes `input` as Parquet into `out` and syncs it and its folder.
pub fn run(input: &SipcRead, out: &Staged) -> Result<Output, WorkError> {
    let f = out.file.try_clone().map_err(WorkError::system)?;
    let props = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
    let mut w = ArrowWriter::try_new(f, input.schema.clone(), Some(props)).map_err(WorkError::system)?;
    let mut rows = 0;
    for b in &input.batches {
        w.write(b).map_err(WorkError::system)?;
        rows += b.num_rows() as u64;
    }
    let f = w.into_inner().map_err(WorkError::system)?;
    f.sync_all().map_err(WorkError::system)?;
    let d = out.dir.try_clone().map_err(WorkError::system)?;
    File::from(d).sync_all().map_err(WorkError::system)?;
    Ok(Output::Staged(rows, vec![out.path.clone()]))
}

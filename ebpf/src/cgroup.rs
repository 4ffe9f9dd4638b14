//! cgroup v2 directories: checking one and finding its id.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};

use crate::Error;

/// The id the kernel gives the cgroup v2 at `dir` (what `bpf_get_current_cgroup_id` returns
/// for its processes): on kernfs a directory's inode number is its cgroup id.
pub fn cgroup_id(dir: &Path) -> Result<u64, Error> {
    let io = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    let fs = statfs(dir).map_err(|e| io(e.into()))?;
    if fs.filesystem_type() != CGROUP2_SUPER_MAGIC {
        return Err(Error::NotCgroup2(dir.to_path_buf()));
    }
    let meta = std::fs::metadata(dir).map_err(io)?;
    if !meta.is_dir() {
        return Err(Error::NotCgroup2(dir.to_path_buf()));
    }
    Ok(meta.ino())
}

//! The host's file system, reached from inside the sandbox through a directory fd opened before
//! the process left the host's mount namespace.
//!
//! quiver's native workers are started before they know their task. They enter every namespace
//! and their new root while waiting, holding this fd; when their request names the files they
//! need, they open those through it, close it and give up root, so the function itself runs
//! with open files only and cannot name a host path. An fd keeps the mount namespace it was
//! opened in, so paths resolve with the host's mounts even though the process's own root
//! holds none of them.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::dir::Dir;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, open, openat2};
use nix::sys::stat::Mode;

use crate::error::{Result, SandboxError};

/// The host's root directory, held open.
#[derive(Debug)]
pub struct HostRoot(OwnedFd);

impl HostRoot {
    /// Opens the calling process's root (call it before [`crate::enter_namespaces`]).
    pub fn open() -> Result<HostRoot> {
        let fd = open("/", OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| SandboxError::sys("opening the host's root", e))?;
        Ok(HostRoot(fd))
    }

    /// The fd, for [`crate::Spec::keep_fds`].
    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Opens the host file or folder at the absolute `path` for reading. Symbolic links
    /// resolve as on the host (an absolute target against the host's root, never the
    /// sandbox's); links into `/proc/PID/fd` and the like are refused.
    pub fn open_read(&self, path: &Path) -> io::Result<File> {
        self.open_with(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC).map(File::from)
    }

    /// Opens the host folder at `path` (to create files in with `openat`).
    pub fn open_dir(&self, path: &Path) -> io::Result<OwnedFd> {
        self.open_with(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
    }

    /// The names in the host folder at `path`, without `.` and `..`.
    pub fn list(&self, path: &Path) -> io::Result<Vec<OsString>> {
        let dir = Dir::from_fd(self.open_dir(path)?)?;
        let mut names = Vec::new();
        for entry in dir {
            let name = entry?.file_name().to_bytes().to_vec();
            if name != b"." && name != b".." {
                names.push(std::ffi::OsStr::from_bytes(&name).to_owned());
            }
        }
        Ok(names)
    }

    fn open_with(&self, path: &Path, flags: OFlag) -> io::Result<OwnedFd> {
        if !path.is_absolute() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not an absolute path", path.display())));
        }
        let how = OpenHow::new().flags(flags).resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        Ok(openat2(&self.0, path, how)?)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn host_files_open_through_the_root_and_links_resolve_against_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.parquet"), b"PAR1").expect("write");
        std::os::unix::fs::symlink(dir.path().join("a.parquet"), dir.path().join("link")).expect("symlink");
        let host = HostRoot::open().expect("root");
        let mut s = String::new();
        host.open_read(&dir.path().join("link")).expect("open").read_to_string(&mut s).expect("read");
        assert_eq!(s, "PAR1");
        let mut names = host.list(dir.path()).expect("list");
        names.sort();
        assert_eq!(names, ["a.parquet", "link"]);
        assert_eq!(host.open_read(Path::new("relative")).expect_err("relative").kind(), io::ErrorKind::InvalidInput);
        let missing = host.open_read(&dir.path().join("missing")).expect_err("missing");
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        assert!(host.open_read(Path::new("/proc/self/fd/0")).is_err(), "magic links are refused");
    }
}

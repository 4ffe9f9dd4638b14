//! A scan's Parquet files, opened when its request arrives and before the worker gives up root:
//! from then on the scan reads through these handles and never names a host path.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use parquet::file::reader::{ChunkReader, Length};
use quiver_sandbox::HostRoot;

use super::WorkError;

/// One open Parquet file of a scan. Reads are positioned (`pread`), so the threads decoding its
/// row groups share one handle without sharing a file offset.
#[derive(Debug, Clone)]
pub struct Source {
    /// The path the plan named (messages, the cache's key).
    pub path: PathBuf,
    file: Arc<File>,
    len: u64,
}

impl Source {
    fn new(path: PathBuf, file: File) -> Result<Source, WorkError> {
        let len = file.metadata().map_err(|e| WorkError::User(format!("{}: {e}", path.display())))?.len();
        Ok(Source { path, file: Arc::new(file), len })
    }

    /// What the file is now (size and modification time change when it is rewritten).
    pub fn metadata(&self) -> io::Result<std::fs::Metadata> {
        self.file.metadata()
    }
}

/// Opens the Parquet files of `path` through `host`: the file itself, or the `*.parquet` files
/// in the folder, sorted.
pub fn open(host: &HostRoot, path: &Path) -> Result<Vec<Source>, WorkError> {
    let user = |p: &Path, e: io::Error| WorkError::User(format!("{}: {e}", p.display()));
    let file = host.open_read(path).map_err(|e| user(path, e))?;
    if !file.metadata().map_err(|e| user(path, e))?.is_dir() {
        return Ok(vec![Source::new(path.to_path_buf(), file)?]);
    }
    let mut names: Vec<PathBuf> = host
        .list(path)
        .map_err(|e| user(path, e))?
        .into_iter()
        .map(|n| path.join(n))
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(WorkError::User(format!("{} holds no .parquet files", path.display())));
    }
    names
        .into_iter()
        .map(|p| {
            let f = host.open_read(&p).map_err(|e| user(&p, e))?;
            Source::new(p, f)
        })
        .collect()
}

impl Length for Source {
    fn len(&self) -> u64 {
        self.len
    }
}

impl ChunkReader for Source {
    type T = At;

    fn get_read(&self, start: u64) -> parquet::errors::Result<At> {
        Ok(At { file: self.file.clone(), pos: start })
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        let mut buf = vec![0u8; length];
        self.file.read_exact_at(&mut buf, start)?;
        Ok(buf.into())
    }
}

/// A reader from a position of a [`Source`], with an offset of its own.
pub struct At {
    file: Arc<File>,
    pos: u64,
}

impl Read for At {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_gives_its_parquet_files_sorted_and_reads_are_positioned() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, body) in [("b.parquet", "0123456789"), ("a.parquet", "abcdef"), ("notes.txt", "x")] {
            std::fs::write(dir.path().join(name), body).expect("write");
        }
        let host = HostRoot::open().expect("root");
        let files = open(&host, dir.path()).expect("open");
        let names: Vec<_> = files.iter().map(|s| s.path.file_name().expect("name").to_owned()).collect();
        assert_eq!(names, ["a.parquet", "b.parquet"]);
        let b = &files[1];
        assert_eq!(b.len(), 10);
        assert_eq!(&b.get_bytes(3, 4).expect("bytes")[..], b"3456");
        let (mut r1, mut r2) = (b.get_read(8).expect("read"), b.get_read(0).expect("read"));
        let mut s = String::new();
        r1.read_to_string(&mut s).expect("read");
        let mut t = [0u8; 2];
        r2.read_exact(&mut t).expect("read");
        assert_eq!((s.as_str(), &t), ("89", b"01"));
        let empty = tempfile::tempdir().expect("tempdir");
        let e = open(&host, empty.path()).expect_err("no parquet");
        assert!(e.to_string().contains("holds no .parquet files"), "{e}");
        let e = open(&host, &dir.path().join("missing")).expect_err("missing");
        assert!(e.to_string().contains("No such file"), "{e}");
    }
}

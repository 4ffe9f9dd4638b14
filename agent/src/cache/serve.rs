//! The agent's side of a caching scan (between the worker's Hello and its Reply; the messages
//! are in `proto.rs`). The worker is untrusted, so:
//!
//! - every file it names must be the scan's path or a `*.parquet` file directly in that folder,
//!   and its identity (device, inode, size, mtime) must be what the agent's own `stat` says: a
//!   worker cannot key chunks to a file version it did not read;
//! - counts, indices and names are bounded, and a plan naming one chunk twice is refused;
//! - each decoded chunk is admitted like any output (a descriptor that parses within limits,
//!   sealed memfds of the declared sizes), must have exactly the rows it announced and a schema
//!   of one field with the chunk's column name. Its content is validated by every reader
//!   (`read_table`), never by the agent, which reads none of it.
//!
//! No scan waits for another while it holds chunks it was told to decode: a round gives what is
//! present and has the worker decode what nobody is decoding; only a round with nothing to give
//! or decode waits. So two scans needing each other's chunks cannot deadlock, and a chunk is
//! decoded once however many scans want it at the same time.

use std::collections::HashSet;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quiver_shm::transport::{RecvLimits, recv, send};

use super::{Cache, ChunkKey, ScanStats};
use crate::launch::{NodeError, admit};
use crate::memory::Memory;
use crate::proto::{ChunkReq, DECODE_OPTIONS, FileIdent, Round, ScanUp, recv_json, send_json};
use crate::tables::StoredTable;

/// Most files and chunks one plan may name.
const MAX_FILES: usize = 100_000;
const MAX_CHUNKS: usize = 1_000_000;
const MAX_NAME: usize = 1024;

/// Claims this scan holds; any not fulfilled are given up when it ends (a failed worker), so
/// the scans waiting for them decode them instead.
struct Claims<'a> {
    cache: &'a Cache,
    keys: HashSet<ChunkKey>,
}

impl Drop for Claims<'_> {
    fn drop(&mut self) {
        for k in self.keys.drain() {
            self.cache.unclaim(&k);
        }
    }
}

/// Serves the scan's rounds; returns its figures and the chunks it holds (pinned until dropped).
pub fn serve_scan(cache: &Cache, memory: &Memory, sock: BorrowedFd<'_>, scan_path: &str) -> Result<(ScanStats, Vec<Arc<StoredTable>>), NodeError> {
    let lost = |e: quiver_shm::ShmError| NodeError::System(format!("worker connection: {e}"));
    let bad = |m: String| NodeError::System(format!("worker sent a bad scan plan: {m}"));
    let (files, chunks) = match recv_json::<ScanUp>(sock).map_err(lost)? {
        ScanUp::Plan { files, chunks } => (files, chunks),
        ScanUp::Failed { user, message } => return Err(failed(user, message)),
        ScanUp::Decoded { .. } => return Err(bad("chunks before a plan".into())),
    };
    let keys = check_plan(scan_path, &files, &chunks).map_err(bad)?;
    for f in &files {
        cache.invalidate_other_versions(f);
    }
    let mut stats = ScanStats::default();
    let mut resolved: Vec<Option<Arc<StoredTable>>> = vec![None; keys.len()];
    let mut claims = Claims { cache, keys: HashSet::new() };
    loop {
        let a = cache.acquire(&keys, &mut resolved);
        claims.keys.extend(a.claims.iter().map(|&i| keys[i].clone()));
        if a.give.is_empty() && a.claims.is_empty() && a.waiting > 0 {
            // Everything left is being decoded by other scans.
            cache.wait(Duration::from_millis(100));
            if peer_spoke_or_left(sock) {
                // It may have failed (its message says why) or died.
                return Err(match recv_json::<ScanUp>(sock) {
                    Ok(ScanUp::Failed { user, message }) => failed(user, message),
                    _ => NodeError::System("the worker left while waiting for chunks".into()),
                });
            }
            continue;
        }
        let last = a.waiting == 0;
        let round = Round { give: a.give.iter().map(|&i| i as u32).collect(), decode: a.claims.iter().map(|&i| i as u32).collect(), last };
        send_json(sock, &round).map_err(lost)?;
        for &i in &a.give {
            let t = resolved[i].as_ref().ok_or_else(|| NodeError::System("a given chunk vanished".into()))?;
            let fds: Vec<_> = t.segments.iter().map(|s| s.as_fd()).collect();
            send(sock, &t.descriptor, &fds).map_err(lost)?;
        }
        stats.chunks_hit += a.give.len() as u64;
        if !a.claims.is_empty() {
            match recv_json::<ScanUp>(sock).map_err(lost)? {
                ScanUp::Decoded { count } if count as usize == a.claims.len() => {}
                ScanUp::Failed { user, message } => return Err(failed(user, message)),
                other => return Err(bad(format!("expected {} decoded chunks, got {other:?}", a.claims.len()))),
            }
            for &i in &a.claims {
                let (desc, fds) = recv(sock, &RecvLimits::default()).map_err(lost)?;
                let t = admit(desc, fds, chunks[i].rows).map_err(|e| bad(format!("chunk {}: {e}", chunks[i].name)))?;
                let one_field = t.schema().is_some_and(|s| s.fields().len() == 1 && s.field(0).name() == &chunks[i].name);
                if !one_field {
                    return Err(bad(format!("chunk {} is not one column of that name", chunks[i].name)));
                }
                stats.chunks_decoded += 1;
                stats.bytes_decoded += t.alloc_bytes;
                claims.keys.remove(&keys[i]);
                resolved[i] = Some(cache.insert(keys[i].clone(), t));
            }
            // Keep the node inside its budget: older unpinned chunks make room for new ones.
            cache.evict(memory.excess());
        }
        if last {
            break;
        }
    }
    Ok((stats, resolved.into_iter().flatten().collect()))
}

fn failed(user: bool, message: String) -> NodeError {
    if user { NodeError::User(message) } else { NodeError::System(message) }
}

/// Whether the worker sent something or hung up while it should be waiting for a round.
fn peer_spoke_or_left(sock: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: poll reads and writes the one pollfd given, for a live fd; it does not block.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n != 0
}

/// Checks a worker's plan and turns it into keys (see the module's comment).
fn check_plan(scan_path: &str, files: &[FileIdent], chunks: &[ChunkReq]) -> Result<Vec<ChunkKey>, String> {
    if files.len() > MAX_FILES || chunks.len() > MAX_CHUNKS {
        return Err(format!("{} files, {} chunks: too many", files.len(), chunks.len()));
    }
    let root = Path::new(scan_path);
    for f in files {
        let inside = f.path == root || (f.path.parent() == Some(root) && f.path.extension().is_some_and(|x| x == "parquet"));
        if !inside {
            return Err(format!("{} is not part of {scan_path}", f.path.display()));
        }
        let ours = identity(&f.path).map_err(|e| format!("{}: {e}", f.path.display()))?;
        if ours != *f {
            return Err(format!("{} changed during the scan (run it again)", f.path.display()));
        }
    }
    let mut seen = HashSet::with_capacity(chunks.len());
    let mut keys = Vec::with_capacity(chunks.len());
    for c in chunks {
        let file = files.get(c.file as usize).ok_or_else(|| format!("chunk names file {} of {}", c.file, files.len()))?;
        if c.name.is_empty() || c.name.len() > MAX_NAME {
            return Err("a chunk's column name is empty or too long".into());
        }
        let k = ChunkKey { file: file.clone(), row_group: c.row_group, column: c.column, name: c.name.clone(), options: DECODE_OPTIONS };
        if !seen.insert(k.clone()) {
            return Err(format!("chunk {}/{}/{} named twice", file.path.display(), c.row_group, c.name));
        }
        keys.push(k);
    }
    Ok(keys)
}

/// A file's identity from `stat` (following symlinks, as opening it does).
fn identity(path: &Path) -> std::io::Result<FileIdent> {
    Ok(FileIdent::of(path, &std::fs::metadata(path)?))
}

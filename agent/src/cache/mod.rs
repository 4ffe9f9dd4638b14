//! The deserialization cache: Parquet column chunks (one column of one row group, decoded to
//! Arrow) in sealed segments the agent holds, keyed by the file's identity, row group, column
//! and decoding options. Scans take the chunks present and decode only the missing ones, in
//! their own worker process; the agent never reads a byte of them (see `serve.rs` for the
//! conversation and what is checked).
//!
//! Eviction is least recently used among unpinned chunks; a chunk is pinned while a running
//! scan holds it. A chunk of a file whose identity changed is dropped when a scan next sees the
//! file, and can never be served, since the identity is part of its key.

pub mod api;
pub mod serve;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::CacheConfig;
use crate::proto::FileIdent;
use crate::tables::StoredTable;

/// What identifies one decoded column chunk.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    /// The file, as `stat` saw it.
    pub file: FileIdent,
    /// Row group.
    pub row_group: u32,
    /// Root column index.
    pub column: u32,
    /// Column name (checked against the chunk's schema).
    pub name: String,
    /// Decoding options ([`crate::proto::DECODE_OPTIONS`]).
    pub options: &'static str,
}

/// Per-scan figures, shown in run status.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct ScanStats {
    /// Chunks taken from the cache.
    pub chunks_hit: u64,
    /// Chunks this scan decoded.
    pub chunks_decoded: u64,
    /// Bytes of the chunks it decoded (their segments).
    pub bytes_decoded: u64,
}

#[derive(Debug)]
struct Entry {
    table: Arc<StoredTable>,
    last_used: u64,
    created: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<ChunkKey, Entry>,
    inflight: HashSet<ChunkKey>,
    tick: u64,
    bytes: u64,
}

/// Cache-wide counters.
#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    decoded: AtomicU64,
    bytes_decoded: AtomicU64,
    evicted: AtomicU64,
    evicted_bytes: AtomicU64,
    invalidated: AtomicU64,
}

/// The cache.
#[derive(Debug)]
pub struct Cache {
    inner: Mutex<Inner>,
    cond: Condvar,
    counters: Counters,
    /// Whether scans use it.
    pub enabled: bool,
    max_bytes: u64,
}

/// One chunk as `GET /v1/cache` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkInfo {
    /// The file.
    pub path: String,
    /// Row group.
    pub row_group: u32,
    /// Column name.
    pub column: String,
    /// Rows.
    pub rows: u64,
    /// Memory its segments hold.
    pub bytes: u64,
    /// Its segments.
    pub segments: usize,
    /// Held by a running scan.
    pub pinned: bool,
    /// Seconds since it was decoded.
    pub age_s: f64,
}

/// The cache's figures, as `GET /v1/cache/stats` shows them.
#[derive(Debug, Clone, Serialize)]
pub struct CacheStats {
    /// Whether scans use the cache.
    pub enabled: bool,
    /// Chunks held.
    pub chunks: usize,
    /// Bytes of their segments.
    pub bytes: u64,
    /// Chunks being decoded now.
    pub inflight: usize,
    /// Chunks handed to scans from the cache, in all.
    pub hits: u64,
    /// Chunks decoded by scans and added, in all.
    pub decoded: u64,
    /// Bytes of those.
    pub bytes_decoded: u64,
    /// Chunks evicted (budget, size limit, `drop`), in all.
    pub evicted: u64,
    /// Bytes of those.
    pub evicted_bytes: u64,
    /// Chunks dropped because their file changed.
    pub invalidated: u64,
}

/// What one look-up found.
#[derive(Debug, Default)]
pub struct Acquired {
    /// Indices now resolved from the cache.
    pub give: Vec<usize>,
    /// Indices this scan must decode (claimed: others wait for them).
    pub claims: Vec<usize>,
    /// Indices another scan is decoding.
    pub waiting: usize,
}

impl Cache {
    /// An empty cache.
    pub fn new(config: &CacheConfig) -> Arc<Cache> {
        Arc::new(Cache {
            inner: Mutex::new(Inner::default()),
            cond: Condvar::new(),
            counters: Counters::default(),
            enabled: config.enabled,
            max_bytes: config.max_bytes,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves what it can of `keys` (where `resolved` is still empty): present chunks are
    /// taken, missing ones not being decoded are claimed, the rest are counted as waiting.
    pub fn acquire(&self, keys: &[ChunkKey], resolved: &mut [Option<Arc<StoredTable>>]) -> Acquired {
        let mut a = Acquired::default();
        let mut g = self.lock();
        g.tick += 1;
        let tick = g.tick;
        for (i, k) in keys.iter().enumerate() {
            if resolved[i].is_some() {
                continue;
            }
            if let Some(e) = g.entries.get_mut(k) {
                e.last_used = tick;
                resolved[i] = Some(e.table.clone());
                a.give.push(i);
            } else if g.inflight.contains(k) {
                a.waiting += 1;
            } else {
                g.inflight.insert(k.clone());
                a.claims.push(i);
            }
        }
        self.counters.hits.fetch_add(a.give.len() as u64, Ordering::Relaxed);
        a
    }

    /// Gives up a claim without a chunk (the decoding scan failed): a waiting scan claims it.
    pub fn unclaim(&self, key: &ChunkKey) {
        self.lock().inflight.remove(key);
        self.cond.notify_all();
    }

    /// Adds a decoded chunk (ending its claim) and returns the shared handle.
    pub fn insert(&self, key: ChunkKey, table: StoredTable) -> Arc<StoredTable> {
        let table = Arc::new(table);
        self.counters.decoded.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_decoded.fetch_add(table.alloc_bytes, Ordering::Relaxed);
        let over = {
            let mut g = self.lock();
            g.inflight.remove(&key);
            g.tick += 1;
            let e = Entry { table: table.clone(), last_used: g.tick, created: Instant::now() };
            g.bytes += table.alloc_bytes;
            if let Some(old) = g.entries.insert(key, e) {
                g.bytes -= old.table.alloc_bytes;
            }
            if self.max_bytes > 0 { g.bytes.saturating_sub(self.max_bytes) } else { 0 }
        };
        self.cond.notify_all();
        self.evict(over);
        table
    }

    /// Waits up to `timeout` for a chunk to be added or a claim to end.
    pub fn wait(&self, timeout: Duration) {
        let g = self.lock();
        let _ = self.cond.wait_timeout(g, timeout);
    }

    /// Evicts unpinned chunks, least recently used first, until `need` bytes are gone or none
    /// is left; returns the bytes evicted.
    pub fn evict(&self, need: u64) -> u64 {
        if need == 0 {
            return 0;
        }
        let mut gone = Vec::new();
        let mut freed = 0;
        {
            let mut g = self.lock();
            // A chunk is pinned while anyone besides the cache holds its table.
            let mut cands: Vec<(u64, ChunkKey)> =
                g.entries.iter().filter(|(_, e)| Arc::strong_count(&e.table) == 1).map(|(k, e)| (e.last_used, k.clone())).collect();
            cands.sort_by_key(|c| c.0);
            for (_, k) in cands {
                if freed >= need {
                    break;
                }
                if let Some(e) = g.entries.remove(&k) {
                    g.bytes -= e.table.alloc_bytes;
                    freed += e.table.alloc_bytes;
                    gone.push(e);
                }
            }
        }
        self.counters.evicted.fetch_add(gone.len() as u64, Ordering::Relaxed);
        self.counters.evicted_bytes.fetch_add(freed, Ordering::Relaxed);
        // Segments close here, outside the lock.
        drop(gone);
        freed
    }

    /// Drops every chunk of `file.path` whose identity is not `file`'s (the file changed).
    pub fn invalidate_other_versions(&self, file: &FileIdent) {
        let gone: Vec<Entry> = {
            let mut g = self.lock();
            let stale: Vec<ChunkKey> = g.entries.keys().filter(|k| k.file.path == file.path && k.file != *file).cloned().collect();
            let mut out = Vec::with_capacity(stale.len());
            for k in stale {
                if let Some(e) = g.entries.remove(&k) {
                    g.bytes -= e.table.alloc_bytes;
                    out.push(e);
                }
            }
            out
        };
        self.counters.invalidated.fetch_add(gone.len() as u64, Ordering::Relaxed);
    }

    /// Drops every chunk (running scans keep the ones they hold until they end); returns how
    /// many and their bytes.
    pub fn drop_all(&self) -> (usize, u64) {
        let gone: Vec<Entry> = {
            let mut g = self.lock();
            g.bytes = 0;
            g.entries.drain().map(|(_, e)| e).collect()
        };
        let bytes = gone.iter().map(|e| e.table.alloc_bytes).sum();
        self.counters.evicted.fetch_add(gone.len() as u64, Ordering::Relaxed);
        self.counters.evicted_bytes.fetch_add(bytes, Ordering::Relaxed);
        (gone.len(), bytes)
    }

    /// Bytes held of files under `path` (the file itself or a folder's files).
    pub fn bytes_under(&self, path: &Path) -> u64 {
        self.lock().entries.iter().filter(|(k, _)| k.file.path.starts_with(path)).map(|(_, e)| e.table.alloc_bytes).sum()
    }

    /// Every chunk, by file, row group and column.
    pub fn list(&self) -> Vec<ChunkInfo> {
        let g = self.lock();
        let mut v: Vec<ChunkInfo> = g
            .entries
            .iter()
            .map(|(k, e)| ChunkInfo {
                path: k.file.path.display().to_string(),
                row_group: k.row_group,
                column: k.name.clone(),
                rows: e.table.rows,
                bytes: e.table.alloc_bytes,
                segments: e.table.segments.len(),
                pinned: Arc::strong_count(&e.table) > 1,
                age_s: e.created.elapsed().as_secs_f64(),
            })
            .collect();
        v.sort_by(|a, b| (&a.path, a.row_group, &a.column).cmp(&(&b.path, b.row_group, &b.column)));
        v
    }

    /// The cache's figures.
    pub fn stats(&self) -> CacheStats {
        let (chunks, bytes, inflight) = {
            let g = self.lock();
            (g.entries.len(), g.bytes, g.inflight.len())
        };
        let c = &self.counters;
        CacheStats {
            enabled: self.enabled,
            chunks,
            bytes,
            inflight,
            hits: c.hits.load(Ordering::Relaxed),
            decoded: c.decoded.load(Ordering::Relaxed),
            bytes_decoded: c.bytes_decoded.load(Ordering::Relaxed),
            evicted: c.evicted.load(Ordering::Relaxed),
            evicted_bytes: c.evicted_bytes.load(Ordering::Relaxed),
            invalidated: c.invalidated.load(Ordering::Relaxed),
        }
    }
}

//! The scan through the agent's deserialization cache: the worker plans the column chunks its
//! projection and row-group pruning need, takes the ones the agent gives (mapped read-only),
//! decodes the ones it is told to (each into an arena of its own, so a chunk's segments hold
//! nothing else), hands those back, and assembles its output from references to all of them.
//! Only the filter, when there is one, writes new buffers.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{Schema, SchemaRef};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use quiver_shm::sipc::{ReadOptions, SipcRead, TableWriter, read_table};
use quiver_shm::transport::{RecvLimits, recv, send_table};
use quiver_shm::{Arena, ArenaOptions};

use super::scan::{BATCH_ROWS, Collected, Item, plan, project};
use super::source::Source;
use super::{Output, WorkError};
use crate::filter::Filter;
use crate::proto::{ChunkReq, FileIdent, Round, ScanUp, recv_json, send_json};

/// Runs a scan through the cache on the agent's socket.
pub fn run(sock: BorrowedFd<'_>, sources: &[Source], columns: Option<&[String]>, filter: Option<&Filter>) -> Result<Output, WorkError> {
    let proto = |e: quiver_shm::ShmError| WorkError::System(format!("agent connection: {e}"));
    let items = plan(sources, columns, filter)?;
    let mut files: Vec<FileIdent> = Vec::new();
    let mut file_idx: HashMap<PathBuf, u32> = HashMap::new();
    // Which item and which of its read columns each chunk is.
    let mut chunks: Vec<ChunkReq> = Vec::new();
    let mut place: Vec<(usize, usize)> = Vec::new();
    for (ii, item) in items.iter().enumerate() {
        let path = &item.source.path;
        let fi = match file_idx.get(path) {
            Some(&i) => i,
            None => {
                let m = item.source.metadata().map_err(|e| WorkError::User(format!("{}: {e}", path.display())))?;
                files.push(FileIdent::of(path, &m));
                file_idx.insert(path.clone(), files.len() as u32 - 1);
                files.len() as u32 - 1
            }
        };
        let rows = item.meta.metadata().row_group(item.row_group).num_rows().max(0) as u64;
        for (ci, &col) in item.read.iter().enumerate() {
            let name = item.meta.schema().field(col).name().clone();
            chunks.push(ChunkReq { file: fi, row_group: item.row_group as u32, column: col as u32, name, rows });
            place.push((ii, ci));
        }
    }
    send_json(sock, &ScanUp::Plan { files: files.clone(), chunks: chunks.clone() }).map_err(proto)?;

    let mut cols: Vec<Option<Vec<ArrayRef>>> = vec![None; chunks.len()];
    // Mappings of given chunks and arenas of decoded ones live until the process exits.
    let mut given: Vec<SipcRead> = Vec::new();
    let mut arenas: Vec<Arena> = Vec::new();
    loop {
        let round: Round = recv_json(sock).map_err(proto)?;
        let check = |i: u32| (i as usize) < chunks.len();
        if !round.give.iter().chain(&round.decode).all(|&i| check(i)) {
            return Err(WorkError::System("the agent named a chunk out of range".into()));
        }
        for &g in &round.give {
            let g = g as usize;
            let (desc, fds) = recv(sock, &RecvLimits::default()).map_err(proto)?;
            // A chunk another worker decoded: validate it fully, like any input.
            let t = read_table(&desc, fds, &ReadOptions::default()).map_err(|e| WorkError::System(format!("cached chunk: {e}")))?;
            let item = &items[place[g].0];
            cols[g] = Some(fit(&t.schema, &t.batches, item, chunks[g].column as usize, chunks[g].rows)?);
            given.push(t);
        }
        let todo: Vec<usize> = round.decode.iter().map(|&i| i as usize).collect();
        let decoded = if todo.is_empty() { Vec::new() } else { decode_all(&todo, &chunks, &place, &items, &files)? };
        if !todo.is_empty() {
            send_json(sock, &ScanUp::Decoded { count: decoded.len() as u32 }).map_err(proto)?;
        }
        for (i, (arena, batches)) in todo.iter().zip(decoded) {
            let schema = batches.first().map(|b| b.schema()).unwrap_or_else(|| {
                let item = &items[place[*i].0];
                Arc::new(Schema::new(vec![item.meta.schema().field(chunks[*i].column as usize).clone()]))
            });
            let mut w = TableWriter::new(schema);
            for b in &batches {
                w.write(b).map_err(WorkError::system)?;
            }
            let t = w.finish().map_err(WorkError::system)?;
            send_table(sock, &t).map_err(proto)?;
            cols[*i] = Some(batches.iter().map(|b| b.column(0).clone()).collect());
            arenas.push(arena);
        }
        if round.last {
            break;
        }
    }
    assemble(&items, &place, cols, filter)
}

/// Checks that a given chunk is the column the scan expects, with the row group's rows.
fn fit(schema: &SchemaRef, batches: &[RecordBatch], item: &Item, col: usize, rows: u64) -> Result<Vec<ArrayRef>, WorkError> {
    let want = item.meta.schema().field(col);
    let ok = schema.fields().len() == 1 && schema.field(0).name() == want.name() && schema.field(0).data_type() == want.data_type();
    let got: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
    if !ok || got != rows {
        return Err(WorkError::System(format!("the cache gave a chunk that is not {} with {rows} rows", want.name())));
    }
    Ok(batches.iter().map(|b| b.column(0).clone()).collect())
}

/// Decodes the chunks `todo` in parallel, one thread per core; each chunk gets its own arena.
fn decode_all(
    todo: &[usize],
    chunks: &[ChunkReq],
    place: &[(usize, usize)],
    items: &[Item],
    files: &[FileIdent],
) -> Result<Vec<(Arena, Vec<RecordBatch>)>, WorkError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(todo.len()).max(1);
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Result<(Arena, Vec<RecordBatch>), WorkError>>>> = todo.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&i) = todo.get(k) else { break };
                    let item = &items[place[i].0];
                    let r = decode_chunk(item, chunks[i].column as usize, &files[chunks[i].file as usize]);
                    let failed = r.is_err();
                    *results[k].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                    if failed {
                        next.store(todo.len(), Ordering::Relaxed);
                    }
                }
            });
        }
    });
    results
        .into_iter()
        .map(|r| r.into_inner().unwrap_or_else(|e| e.into_inner()).unwrap_or_else(|| Err(WorkError::System("a chunk was not decoded".into()))))
        .collect()
}

/// Decodes one column of one row group into a fresh arena sized for it.
fn decode_chunk(item: &Item, col: usize, ident: &FileIdent) -> Result<(Arena, Vec<RecordBatch>), WorkError> {
    let path = &item.source.path;
    let user = |e: &dyn std::fmt::Display| WorkError::User(format!("{}: {e}", path.display()));
    let same = || item.source.metadata().is_ok_and(|m| FileIdent::of(path, &m) == *ident);
    if !same() {
        return Err(WorkError::User(format!("{} changed during the scan (run it again)", path.display())));
    }
    let pq = item.meta.metadata();
    let schema = item.meta.parquet_schema();
    let rg = pq.row_group(item.row_group);
    let est: i64 = (0..rg.num_columns()).filter(|&l| schema.get_column_root_idx(l) == col).map(|l| rg.column(l).uncompressed_size()).sum();
    let first = (est.max(0) as u64 * 5 / 4 + (64 << 10)).next_power_of_two().clamp(1 << 20, 256 << 20);
    let arena = Arena::new(ArenaOptions { name: "qcache".into(), first_chunk: first, ..ArenaOptions::default() });
    let builder = ParquetRecordBatchReaderBuilder::new_with_metadata(item.source.clone(), item.meta.clone());
    let mask = ProjectionMask::roots(builder.parquet_schema(), [col]);
    let batches = arena.scope(|| -> Result<Vec<RecordBatch>, WorkError> {
        let reader = builder.with_projection(mask).with_row_groups(vec![item.row_group]).with_batch_size(BATCH_ROWS).build().map_err(|e| user(&e))?;
        reader.map(|b| b.map_err(|e| user(&e))).collect()
    })?;
    // A file rewritten in place while it was read would give chunks of neither version.
    if !same() {
        return Err(WorkError::User(format!("{} changed during the scan (run it again)", path.display())));
    }
    Ok((arena, batches.into_iter().filter(|b| b.num_rows() > 0).collect()))
}

/// Builds each row group's batches from its columns' chunks (slices where their batch
/// boundaries differ, never copies), then filters and projects.
fn assemble(items: &[Item], place: &[(usize, usize)], cols: Vec<Option<Vec<ArrayRef>>>, filter: Option<&Filter>) -> Result<Output, WorkError> {
    let mut per_item: Vec<Vec<Vec<ArrayRef>>> = items.iter().map(|it| vec![Vec::new(); it.read.len()]).collect();
    for ((ii, ci), c) in place.iter().zip(cols) {
        per_item[*ii][*ci] = c.ok_or_else(|| WorkError::System("a chunk was neither given nor decoded".into()))?;
    }
    // Filtered columns are new buffers: build them in an arena so they leave by reference.
    let out_arena = Arena::named("scan");
    let mut out = Collected::default();
    for (item, columns) in items.iter().zip(per_item) {
        let schema = Arc::new(item.meta.schema().project(&item.read).map_err(WorkError::system)?);
        for b in align(&schema, columns)? {
            let b = match filter {
                Some(f) => out_arena.scope(|| crate::filter::apply(f, &b)).map_err(WorkError::User)?,
                None => b,
            };
            out.push(&item.source.path, project(&b, &item.wanted)?)?;
        }
    }
    Ok(out.finish())
}

/// Zips columns whose arrays may be cut at different rows into batches, slicing at every cut.
fn align(schema: &SchemaRef, columns: Vec<Vec<ArrayRef>>) -> Result<Vec<RecordBatch>, WorkError> {
    let total = |c: &Vec<ArrayRef>| c.iter().map(|a| a.len()).sum::<usize>();
    let rows = columns.first().map(total).unwrap_or(0);
    if columns.iter().any(|c| total(c) != rows) {
        return Err(WorkError::System("a row group's column chunks have different row counts".into()));
    }
    let mut cuts: Vec<usize> = columns
        .iter()
        .flat_map(|c| c.iter().scan(0, |acc, a| {
            *acc += a.len();
            Some(*acc)
        }))
        .collect();
    cuts.push(0);
    cuts.sort_unstable();
    cuts.dedup();
    let mut out = Vec::with_capacity(cuts.len());
    for w in cuts.windows(2) {
        let (start, end) = (w[0], w[1]);
        let arrays: Vec<ArrayRef> = columns.iter().map(|c| slice_rows(c, start, end)).collect();
        out.push(RecordBatch::try_new(schema.clone(), arrays).map_err(WorkError::system)?);
    }
    Ok(out)
}

/// Rows `start..end` of a column given as consecutive arrays, which lie inside one of them.
fn slice_rows(arrays: &[ArrayRef], start: usize, end: usize) -> ArrayRef {
    let mut at = 0;
    for a in arrays {
        if start >= at && end <= at + a.len() {
            return a.slice(start - at, end - start);
        }
        at += a.len();
    }
    // Unreachable: every cut of every column is a cut here; an empty slice keeps it safe.
    arrays.first().map(|a| a.slice(0, 0)).unwrap_or_else(|| Arc::new(arrow_array::NullArray::new(0)))
}

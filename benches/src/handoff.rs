//! `handoff`: how fast a table gets from a producer process into a consumer process, and what
//! it costs the consumer to read it, four ways side by side in one run:
//!
//! - `sipc`: SIPC over the arena (quiver's way), with variants that prefault the mapping,
//!   validate the table as an untrusted reader would, or force the writer to copy;
//! - `ipc-stream`: an Arrow IPC stream over a Unix socket;
//! - `ipc-file-shm`: an Arrow IPC file in /dev/shm, read with mmap (zero-copy decode);
//! - `parquet`: a Parquet file (snappy) on local disk.
//!
//! Times run on CLOCK_MONOTONIC from the moment the producer starts handing the table over
//! (serialising, writing or sealing it) until the child holds its first and all batches; then
//! the child scans every column once. The producer builds the table in an arena first, outside
//! the timings, and scans it itself for the in-process baseline.

use std::fs::File;
use std::io::BufWriter;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::ptr::NonNull;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use arrow_array::RecordBatch;
use arrow_buffer::Buffer;
use arrow_ipc::reader::{FileDecoder, StreamReader, read_footer_length};
use arrow_ipc::writer::{FileWriter, StreamWriter};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use quiver_shm::sipc::{ReadOptions, TableWriter, read_table, read_table_trusted};
use quiver_shm::transport::{RecvLimits, recv, send, send_table, socketpair};
use quiver_shm::{Arena, ArenaOptions, MapOptions};
use serde::{Deserialize, Serialize};

use crate::proc::{ms_since, now_ns, peak_rss, reset_peak_rss};
use crate::{scan, table};

/// Ways to hand a table over.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// SIPC, trusted reader, lazy faults.
    Sipc,
    /// SIPC, trusted reader, mapping prefaulted with MADV_POPULATE_READ.
    SipcPrefault,
    /// SIPC, trusted reader, mapping faulted in by a background thread while the reader works.
    SipcBgfault,
    /// SIPC over an arena of 2 MiB pages (shmem THP), trusted reader, lazy faults.
    SipcHuge,
    /// SIPC, untrusted reader: full Arrow validation.
    SipcValidated,
    /// SIPC with the writer forced to copy every buffer.
    SipcCopy,
    /// Arrow IPC stream over a Unix socket.
    IpcStream,
    /// Arrow IPC file in /dev/shm, mmapped by the reader.
    IpcFileShm,
    /// Parquet file (snappy) on local disk.
    Parquet,
}

impl Method {
    fn is_sipc(self) -> bool {
        matches!(
            self,
            Method::Sipc | Method::SipcPrefault | Method::SipcBgfault | Method::SipcHuge | Method::SipcValidated | Method::SipcCopy
        )
    }

    fn name(self) -> &'static str {
        match self {
            Method::Sipc => "sipc",
            Method::SipcPrefault => "sipc-prefault",
            Method::SipcBgfault => "sipc-bgfault",
            Method::SipcHuge => "sipc-huge",
            Method::SipcValidated => "sipc-validated",
            Method::SipcCopy => "sipc-copy",
            Method::IpcStream => "ipc-stream",
            Method::IpcFileShm => "ipc-file-shm",
            Method::Parquet => "parquet",
        }
    }
}

/// Options of `handoff`.
#[derive(clap::Args)]
pub struct Args {
    /// Table sizes in rows, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000_000u64, 10_000_000])]
    rows: Vec<u64>,
    /// Rows per record batch.
    #[arg(long, default_value_t = 1_000_000)]
    batch_rows: usize,
    /// Methods to run (default: all).
    #[arg(long, value_delimiter = ',')]
    methods: Option<Vec<Method>>,
    /// Folder for the Parquet file (local disk).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// One JSON object per measurement instead of a table.
    #[arg(long)]
    json: bool,
}

/// Options of the child process.
#[derive(clap::Args)]
pub struct ChildArgs {
    #[arg(long)]
    method: Method,
}

/// One measurement.
#[derive(Serialize, Debug)]
struct Measurement {
    method: &'static str,
    rows: u64,
    bytes: u64,
    first_batch_ms: f64,
    all_batches_ms: f64,
    full_scan_ms: f64,
    bytes_copied: u64,
    peak_rss_bytes: u64,
    producer_peak_rss_bytes: u64,
    child_peak_rss_bytes: u64,
    /// Shared memory the child mapped with 2 MiB pages (proves the huge-page variant used them).
    child_huge_mapped_bytes: u64,
    produce_ms: f64,
    seal_ms: f64,
    checksum_ok: bool,
}

/// What the child reports.
#[derive(Serialize, Deserialize, Debug)]
struct ChildReport {
    first_batch_ms: f64,
    all_batches_ms: f64,
    full_scan_ms: f64,
    checksum: u64,
    peak_rss_bytes: u64,
    huge_mapped_bytes: u64,
}

/// Rows per batch the Parquet reader produces (the producer's default batch size).
const BATCH_ROWS_HINT: usize = 1_000_000;

const ALL: [Method; 9] = [
    Method::Sipc,
    Method::SipcPrefault,
    Method::SipcBgfault,
    Method::SipcHuge,
    Method::SipcValidated,
    Method::SipcCopy,
    Method::IpcStream,
    Method::IpcFileShm,
    Method::Parquet,
];

pub fn run(args: Args) -> Result<()> {
    let methods = args.methods.clone().unwrap_or_else(|| ALL.to_vec());
    let dir = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    if !args.json {
        println!("machine: {}", crate::proc::machine());
        println!();
        println!("| method | rows | GB | seal ms | first batch ms | all batches ms | full scan ms | scan / in-process | GB copied | peak RSS GB (producer + child) | child huge-page GB | same data |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    }
    for &rows in &args.rows {
        let plain: Vec<Method> = methods.iter().copied().filter(|&m| m != Method::SipcHuge).collect();
        run_size(rows, &args, &plain, MapOptions::default(), &dir)?;
        if methods.contains(&Method::SipcHuge) {
            match ShmemThp::enable() {
                Ok(thp) => {
                    let huge = MapOptions { huge_align: true, hugepage: true, ..Default::default() };
                    let r = run_size(rows, &args, &[Method::SipcHuge], huge, &dir);
                    drop(thp);
                    r?;
                }
                Err(e) => eprintln!("sipc-huge skipped: shmem huge pages unavailable ({e})"),
            }
        }
    }
    Ok(())
}

/// Builds the table in an arena mapped with `map`, measures the in-process scan, then `methods`.
fn run_size(rows: u64, args: &Args, methods: &[Method], map: MapOptions, dir: &std::path::Path) -> Result<()> {
    let arena = Arena::new(ArenaOptions { name: "bench-table".into(), map, first_chunk: 2 << 20, ..Default::default() });
    let batches = table::build(&arena, rows, args.batch_rows)?;
    let bytes = table::bytes(&batches);
    // In-process baseline: scan the producer's own table (already faulted in by building it).
    let t = now_ns();
    let want = scan::checksum(&batches);
    let base_ms = ms_since(t);
    let baseline = Measurement {
        method: if map.hugepage { "in-process-huge" } else { "in-process" },
        rows,
        bytes,
        first_batch_ms: 0.0,
        all_batches_ms: 0.0,
        full_scan_ms: base_ms,
        bytes_copied: 0,
        peak_rss_bytes: peak_rss(),
        producer_peak_rss_bytes: peak_rss(),
        child_peak_rss_bytes: 0,
        child_huge_mapped_bytes: 0,
        produce_ms: 0.0,
        seal_ms: 0.0,
        checksum_ok: true,
    };
    report(&baseline, base_ms, args.json);
    for &m in methods {
        let r = measure(m, &batches, rows, bytes, want, dir).with_context(|| format!("{} at {rows} rows", m.name()))?;
        report(&r, base_ms, args.json);
    }
    Ok(())
}

/// Turns shared-memory transparent huge pages on (`within_size`, so memfds sized up front get
/// 2 MiB pages) for as long as it lives, then restores the machine's setting.
struct ShmemThp {
    old: String,
}

const SHMEM_THP: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

impl ShmemThp {
    fn enable() -> Result<ShmemThp> {
        let cur = std::fs::read_to_string(SHMEM_THP)?;
        let old = cur
            .split_whitespace()
            .find(|w| w.starts_with('['))
            .map(|w| w.trim_matches(['[', ']']).to_string())
            .ok_or_else(|| anyhow!("cannot parse {SHMEM_THP}: {cur}"))?;
        if old != "within_size" && old != "always" {
            std::fs::write(SHMEM_THP, "within_size").context("setting shmem_enabled (needs root)")?;
            eprintln!("sipc-huge: {SHMEM_THP} set to within_size for this run (was {old}); restored after");
        }
        Ok(ShmemThp { old })
    }
}

impl Drop for ShmemThp {
    fn drop(&mut self) {
        if self.old != "within_size" && self.old != "always" {
            let _ = std::fs::write(SHMEM_THP, &self.old);
        }
    }
}

fn report(m: &Measurement, base_ms: f64, json: bool) {
    if json {
        println!("{}", serde_json::to_string(m).expect("serializable"));
        return;
    }
    let gb = |b: u64| b as f64 / 1e9;
    println!(
        "| {} | {} | {:.2} | {:.1} | {:.3} | {:.3} | {:.1} | {:.2} | {:.2} | {:.2} ({:.2} + {:.2}) | {:.2} | {} |",
        m.method,
        m.rows,
        gb(m.bytes),
        m.seal_ms,
        m.first_batch_ms,
        m.all_batches_ms,
        m.full_scan_ms,
        m.full_scan_ms / base_ms,
        gb(m.bytes_copied),
        gb(m.peak_rss_bytes),
        gb(m.producer_peak_rss_bytes),
        gb(m.child_peak_rss_bytes),
        gb(m.child_huge_mapped_bytes),
        if m.checksum_ok { "yes" } else { "NO" }
    );
}

fn measure(m: Method, batches: &[RecordBatch], rows: u64, bytes: u64, want: u64, dir: &std::path::Path) -> Result<Measurement> {
    let (ctl, ctl_child) = socketpair()?;
    let (data, data_child) = UnixStream::pair()?;
    let (c3, c4) = (ctl_child.as_raw_fd(), data_child.as_raw_fd());
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["handoff-child", "--method"]).arg(format!("{:?}", m).to_lowercase_kebab());
    // SAFETY: dup2 is async-signal-safe; between fork and exec it gives the child its control
    // socket as fd 3 and data socket as fd 4.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(c3, 3) < 0 || libc::dup2(c4, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let mut child = cmd.spawn().context("spawning the child")?;
    drop((ctl_child, data_child));
    let (ready, _) = recv(ctl.as_fd(), &RecvLimits::default())?;
    if ready != b"ready" {
        bail!("child said {:?}", String::from_utf8_lossy(&ready));
    }
    reset_peak_rss();
    let stamp = |t0: u64, path: &str| format!("go {t0} {path}");
    // SIPC's producer side: describe the table and seal its segments (what a producer does as it
    // finishes; in quiver the agent seals after the producer exits), timed on its own.
    let mut sipc = None;
    let mut seal_ms = 0.0;
    if m.is_sipc() {
        let t = now_ns();
        let mut w = if m == Method::SipcCopy {
            TableWriter::copying(batches[0].schema())
        } else {
            TableWriter::new(batches[0].schema())
        };
        for b in batches {
            w.write(b)?;
        }
        sipc = Some(w.finish()?);
        seal_ms = ms_since(t);
    }
    let t0 = now_ns();
    let copied: u64;
    let mut cleanup: Option<PathBuf> = None;
    match m {
        Method::IpcStream => {
            send(ctl.as_fd(), stamp(t0, "-").as_bytes(), &[])?;
            let mut w = StreamWriter::try_new(BufWriter::with_capacity(1 << 20, &data), &batches[0].schema())?;
            for b in batches {
                w.write(b)?;
            }
            w.finish()?;
            copied = bytes;
        }
        Method::IpcFileShm => {
            let path = PathBuf::from(format!("/dev/shm/quiver-bench-{}.arrow", std::process::id()));
            let f = File::create(&path)?;
            let mut w = FileWriter::try_new(BufWriter::with_capacity(1 << 20, f), &batches[0].schema())?;
            for b in batches {
                w.write(b)?;
            }
            w.finish()?;
            drop(w);
            send(ctl.as_fd(), stamp(t0, path.to_str().expect("utf-8")).as_bytes(), &[])?;
            cleanup = Some(path);
            copied = bytes;
        }
        Method::Parquet => {
            let path = dir.join(format!("quiver-bench-{}.parquet", std::process::id()));
            let f = File::create(&path)?;
            let props = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
            let mut w = ArrowWriter::try_new(f, batches[0].schema(), Some(props))?;
            for b in batches {
                w.write(b)?;
            }
            w.close()?;
            send(ctl.as_fd(), stamp(t0, path.to_str().expect("utf-8")).as_bytes(), &[])?;
            cleanup = Some(path);
            copied = bytes;
        }
        // Every SIPC variant.
        _ => {
            let t = sipc.take().expect("written above");
            copied = t.stats.bytes_copied;
            send(ctl.as_fd(), stamp(t0, "-").as_bytes(), &[])?;
            send_table(ctl.as_fd(), &t)?;
        }
    }
    let produce_ms = ms_since(t0);
    let producer_peak = peak_rss();
    drop(data);
    let (reply, _) = recv(ctl.as_fd(), &RecvLimits::default())?;
    let status = child.wait()?;
    if let Some(p) = cleanup {
        let _ = std::fs::remove_file(p);
    }
    let reply = String::from_utf8_lossy(&reply).into_owned();
    if !status.success() {
        bail!("child failed ({status}): {reply}");
    }
    let r: ChildReport = serde_json::from_str(&reply).map_err(|e| anyhow!("child reply {reply:?}: {e}"))?;
    Ok(Measurement {
        method: m.name(),
        rows,
        bytes,
        first_batch_ms: r.first_batch_ms,
        all_batches_ms: r.all_batches_ms,
        full_scan_ms: r.full_scan_ms,
        bytes_copied: copied,
        peak_rss_bytes: producer_peak + r.peak_rss_bytes,
        producer_peak_rss_bytes: producer_peak,
        child_peak_rss_bytes: r.peak_rss_bytes,
        child_huge_mapped_bytes: r.huge_mapped_bytes,
        produce_ms,
        seal_ms,
        checksum_ok: r.checksum == want,
    })
}

trait Kebab {
    fn to_lowercase_kebab(&self) -> String;
}

impl Kebab for String {
    fn to_lowercase_kebab(&self) -> String {
        let mut out = String::new();
        for (i, c) in self.chars().enumerate() {
            if c.is_uppercase() && i > 0 {
                out.push('-');
            }
            out.extend(c.to_lowercase());
        }
        out
    }
}

/// The child: says ready, waits for the go, takes the table the chosen way, scans it, reports.
pub fn child(args: ChildArgs) -> Result<()> {
    // SAFETY: the parent gave us fds 3 and 4 and nothing else in this process owns them.
    let ctl = unsafe { OwnedFd::from_raw_fd(3) };
    // SAFETY: as above.
    let data = UnixStream::from(unsafe { OwnedFd::from_raw_fd(4) });
    send(ctl.as_fd(), b"ready", &[])?;
    let (go, _) = recv(ctl.as_fd(), &RecvLimits::default())?;
    let go = String::from_utf8(go)?;
    let mut parts = go.split(' ');
    let (Some("go"), Some(t0), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("bad go message {go:?}");
    };
    let t0: u64 = t0.parse()?;
    let m = args.method;
    let mut first = 0.0;
    let mut batches: Vec<RecordBatch> = Vec::new();
    // Keeps the IPC file mapping alive while its batches are in use.
    let mut _keep: Option<Arc<memmap2::Mmap>> = None;
    match m {
        Method::IpcStream => {
            let r = StreamReader::try_new(std::io::BufReader::with_capacity(1 << 20, &data), None)?;
            for b in r {
                batches.push(b?);
                if batches.len() == 1 {
                    first = ms_since(t0);
                }
            }
        }
        Method::IpcFileShm => {
            let f = File::open(path)?;
            // SAFETY: the producer finished writing the file before sending its name, and
            // nobody changes it while we read.
            let map = Arc::new(unsafe { memmap2::Mmap::map(&f)? });
            // SAFETY: the buffer points into `map`, which it keeps alive as its owner.
            let buf = unsafe { Buffer::from_custom_allocation(NonNull::new(map.as_ptr() as *mut u8).expect("mapped"), map.len(), map.clone()) };
            _keep = Some(map);
            let tail: [u8; 10] = buf[buf.len() - 10..].try_into()?;
            let footer_len = read_footer_length(tail)?;
            let footer = arrow_ipc::root_as_footer(&buf[buf.len() - 10 - footer_len..buf.len() - 10]).map_err(|e| anyhow!("{e}"))?;
            let schema = arrow_ipc::convert::try_fb_to_schema(footer.schema().ok_or_else(|| anyhow!("no schema"))?)?;
            let mut dec = FileDecoder::new(Arc::new(schema), footer.version());
            for block in footer.dictionaries().iter().flatten() {
                let len = block.bodyLength() as usize + block.metaDataLength() as usize;
                dec.read_dictionary(block, &buf.slice_with_length(block.offset() as usize, len))?;
            }
            for block in footer.recordBatches().iter().flatten() {
                let len = block.bodyLength() as usize + block.metaDataLength() as usize;
                if let Some(b) = dec.read_record_batch(block, &buf.slice_with_length(block.offset() as usize, len))? {
                    batches.push(b);
                    if batches.len() == 1 {
                        first = ms_since(t0);
                    }
                }
            }
        }
        Method::Parquet => {
            let r = ParquetRecordBatchReaderBuilder::try_new(File::open(path)?)?.with_batch_size(BATCH_ROWS_HINT).build()?;
            for b in r {
                batches.push(b?);
                if batches.len() == 1 {
                    first = ms_since(t0);
                }
            }
        }
        // Every SIPC variant.
        _ => {
            let (desc, fds) = recv(ctl.as_fd(), &RecvLimits::default())?;
            let huge = m == Method::SipcHuge;
            let opts = ReadOptions {
                map: MapOptions { prefault: m == Method::SipcPrefault, huge_align: huge, hugepage: huge, ..Default::default() },
                background_prefault: m == Method::SipcBgfault,
                ..Default::default()
            };
            let t = if m == Method::SipcValidated {
                read_table(&desc, fds, &opts)?
            } else {
                // SAFETY: the producer is this benchmark's own parent process.
                unsafe { read_table_trusted(&desc, fds, &opts)? }
            };
            first = ms_since(t0);
            batches = t.batches;
        }
    }
    let all = ms_since(t0);
    let t = now_ns();
    let checksum = scan::checksum(&batches);
    let full_scan_ms = ms_since(t);
    let report = ChildReport {
        first_batch_ms: first,
        all_batches_ms: all,
        full_scan_ms,
        checksum,
        peak_rss_bytes: peak_rss(),
        huge_mapped_bytes: crate::proc::shmem_pmd_mapped(),
    };
    send(ctl.as_fd(), serde_json::to_string(&report)?.as_bytes(), &[])?;
    Ok(())
}

//! `quiver query "SQL"`: DuckDB in this process over the warehouse's tables (by name) and the
//! tables the agent keeps (as `"RUN.NODE"`, fetched without a copy from its SIPC endpoint).

use std::io::Write;
use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{Context, Result, bail};
use arrow_array::RecordBatch;

use crate::duck::Db;

/// Output formats.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// An aligned table.
    Table,
    /// CSV with a header.
    Csv,
    /// One JSON object per row.
    Json,
    /// Parquet on standard output.
    Parquet,
}

/// Runs the query and writes the result to standard output.
pub fn run(sql: &str, warehouse: &Path, socket: &Path, format: Format) -> Result<()> {
    let db = Db::open()?;
    let mut views = Vec::new();
    if let Ok(entries) = std::fs::read_dir(warehouse) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !crate::plan::valid_name(&name) {
                continue;
            }
            views.push(format!(
                "CREATE VIEW \"{name}\" AS SELECT * FROM read_parquet('{}/*.parquet')",
                e.path().display().to_string().replace('\'', "''")
            ));
        }
    }
    // Tables the agent keeps, if one is listening.
    let sipc = crate::sipc_socket::path_for(socket);
    if let Ok(conn) = connect_seqpacket(&sipc) {
        for name in agent_tables(socket) {
            quiver_shm::transport::send(conn.as_fd(), serde_json::json!({ "table": name }).to_string().as_bytes(), &[])?;
            let (reply, _) = quiver_shm::transport::recv(conn.as_fd(), &Default::default())?;
            let reply: serde_json::Value = serde_json::from_slice(&reply)?;
            if reply.get("rows").is_none() {
                continue;
            }
            let (desc, fds) = quiver_shm::transport::recv(conn.as_fd(), &Default::default())?;
            let t = quiver_shm::sipc::read_table(&desc, fds, &Default::default())
                .with_context(|| format!("reading table {name} from the agent"))?;
            db.register(&name, t.schema.clone(), t.batches.clone())?;
        }
    }
    let (schema, batches) = {
        let conn = db.connection()?;
        for v in &views {
            conn.execute_batch(v)?;
        }
        let mut stmt = conn.prepare(sql).context("preparing the query")?;
        let arrow = stmt.stream_arrow([]).context("running the query")?;
        let schema = arrow.get_schema();
        (schema, arrow.collect::<Result<Vec<RecordBatch>, _>>()?)
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match format {
        Format::Table => writeln!(out, "{}", arrow_cast::pretty::pretty_format_batches(&batches)?)?,
        Format::Csv => {
            let mut w = arrow_csv::WriterBuilder::new().with_header(true).build(&mut out);
            for b in &batches {
                w.write(b)?;
            }
        }
        Format::Json => {
            let mut w = arrow_json::LineDelimitedWriter::new(&mut out);
            for b in &batches {
                w.write(b)?;
            }
            w.finish()?;
        }
        Format::Parquet => {
            let mut buf = Vec::new();
            let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, schema, None)?;
            for b in &batches {
                w.write(b)?;
            }
            w.close()?;
            out.write_all(&buf)?;
        }
    }
    Ok(())
}

fn connect_seqpacket(path: &Path) -> Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
    if !path.exists() {
        bail!("no agent");
    }
    let fd = socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?;
    socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &UnixAddr::new(path)?)?;
    Ok(fd)
}

fn agent_tables(socket: &Path) -> Vec<String> {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(_) => return Vec::new(),
    };
    rt.block_on(crate::client::call(socket, hyper::Method::GET, "/v1/tables", None))
        .ok()
        .and_then(|v| v["tables"].as_array().map(|ts| ts.iter().filter_map(|t| t["name"].as_str().map(str::to_owned)).collect()))
        .unwrap_or_default()
}

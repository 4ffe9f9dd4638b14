//! The zero-copy table endpoint: a `SOCK_SEQPACKET` socket beside the API socket (`NAME.sipc`)
//! where a local client asks for a table by name and gets its SIPC descriptor and sealed
//! segments (`SCM_RIGHTS`), to map read-only with `quiver_shm::sipc::read_table`.
//!
//! ```text
//! client -> agent   {"table": "r000001.by_country"}                 (JSON)
//! agent  -> client  {"rows": 200}  then the SIPC table               (or {"error": "..."})
//! ```

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use serde::{Deserialize, Serialize};

use crate::proto::{recv_json, send_json};
use crate::state::Agent;

/// A request for a table.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableRequest {
    /// Its name, as `GET /v1/tables` lists it.
    pub table: String,
}

/// The answer before the table.
#[derive(Debug, Serialize, Deserialize)]
pub enum TableReply {
    /// The table follows.
    #[serde(rename = "rows")]
    Rows(u64),
    /// No such table, or a bad request.
    #[serde(rename = "error")]
    Error(String),
}

/// The endpoint's path for an API socket path.
pub fn path_for(api: &Path) -> PathBuf {
    let mut p = api.as_os_str().to_owned();
    p.push(".sipc");
    PathBuf::from(p)
}

/// Binds the endpoint and serves it on a thread until the agent stops.
pub fn start(agent: Arc<Agent>, path: &Path, mode: u32) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let fd = socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?;
    let addr = UnixAddr::new(path)?;
    socket::bind(fd.as_raw_fd(), &addr)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    socket::listen(&fd, Backlog::new(64).unwrap_or(Backlog::MAXCONN))?;
    std::thread::Builder::new().name("sipc-endpoint".into()).spawn(move || accept_loop(agent, fd))?;
    Ok(())
}

fn accept_loop(agent: Arc<Agent>, listener: OwnedFd) {
    loop {
        let conn = match socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            // SAFETY: accept4 returned a fresh fd that nothing else owns.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!("sipc endpoint: accept: {e}");
                return;
            }
        };
        if *agent.stopping.borrow() {
            return;
        }
        let agent = agent.clone();
        let _ = std::thread::Builder::new().name("sipc-conn".into()).spawn(move || serve_conn(&agent, conn));
    }
}

fn serve_conn(agent: &Agent, conn: OwnedFd) {
    let peer = socket::getsockopt(&conn, socket::sockopt::PeerCredentials).ok();
    // One connection may ask for several tables, one after the other.
    while let Ok(req) = recv_json::<TableRequest>(conn.as_fd()) {
        let t = agent.tables.lock().unwrap_or_else(|e| e.into_inner()).get(&req.table).cloned();
        tracing::info!(table = %req.table, found = t.is_some(), peer_pid = ?peer.map(|c| c.pid()), peer_uid = ?peer.map(|c| c.uid()), "sipc table request");
        let sent = match t {
            Some(t) => send_json(conn.as_fd(), &TableReply::Rows(t.rows)).and_then(|_| {
                let fds: Vec<_> = t.segments.iter().map(|s| s.as_fd()).collect();
                quiver_shm::transport::send(conn.as_fd(), &t.descriptor, &fds)
            }),
            None => send_json(conn.as_fd(), &TableReply::Error(format!("no table {:?}", req.table))),
        };
        if sent.is_err() {
            return;
        }
    }
}

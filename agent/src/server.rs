//! `quiver agent`: binds the API socket, serves until SIGTERM or SIGINT, then stops taking
//! work, kills and reaps every function process, releases every table and exits.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::serve::IncomingStream;
use tokio::net::UnixListener;

use crate::config::Config;
use crate::state::Agent;

/// Who is on the other end of an API connection (`SO_PEERCRED`).
#[derive(Clone, Debug)]
pub struct Peer {
    pid: Option<i32>,
    uid: u32,
    gid: u32,
}

impl Connected<IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        match stream.io().peer_cred() {
            Ok(c) => Peer { pid: c.pid(), uid: c.uid(), gid: c.gid() },
            Err(_) => Peer { pid: None, uid: u32::MAX, gid: u32::MAX },
        }
    }
}

async fn log_request(ConnectInfo(peer): ConnectInfo<Peer>, req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let resp = next.run(req).await;
    tracing::info!(%method, %path, status = resp.status().as_u16(), peer_pid = ?peer.pid, peer_uid = peer.uid, peer_gid = peer.gid, "request");
    resp
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another agent holds the socket.
    #[error("another agent is listening on {0}")]
    InUse(String),
    /// Binding failed.
    #[error("binding {path}: {source}")]
    Bind {
        /// The socket path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Installing the SIGTERM handler failed.
    #[error("installing the SIGTERM handler: {0}")]
    Signal(#[source] std::io::Error),
    /// Recovering the warehouse failed.
    #[error(transparent)]
    Warehouse(#[from] crate::warehouse::WarehouseError),
}

/// Binds the socket: refuses when an agent answers there, removes a stale one otherwise.
pub fn bind(path: &Path, mode: u32) -> Result<UnixListener, ServeError> {
    let bind_err = |source| ServeError::Bind { path: path.display().to_string(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServeError::InUse(path.display().to_string()));
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    let l = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(bind_err)?;
    Ok(l)
}

/// Serves the API on `listener` until `shutdown` resolves; then cleans up.
pub async fn serve(agent: Arc<Agent>, listener: UnixListener, shutdown: impl std::future::Future<Output = ()> + Send + 'static) {
    let app = crate::api::router(agent.clone()).layer(middleware::from_fn(log_request));
    let stop = agent.stopping.clone();
    let graceful = async move {
        shutdown.await;
        let _ = stop.send(true);
    };
    let server = axum::serve(listener, app.into_make_service_with_connect_info::<Peer>()).with_graceful_shutdown(graceful);
    if let Err(e) = server.await {
        tracing::error!("API server: {e}");
    }
    stop_everything(&agent).await;
}

/// Cancels every run, kills every worker, waits for the runs to finish, drops every table.
pub async fn stop_everything(agent: &Agent) {
    let _ = agent.stopping.send(true);
    agent.pool.drain();
    agent.python.shutdown();
    for r in agent.runs() {
        let _ = r.cancel.send(true);
    }
    let killed = crate::children::kill_all();
    for _ in 0..200 {
        if agent.runs().iter().all(|r| r.finished()) && crate::children::count() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    agent.tables.lock().unwrap_or_else(|e| e.into_inner()).clear();
    tracing::info!(killed, "agent stopped");
}

/// The daemon's main: config, socket, readiness, watchdog, signals.
pub async fn run_daemon(config: Config) -> Result<(), ServeError> {
    crate::warehouse::recover(&config.warehouse)?;
    let listener = bind(&config.socket, config.socket_mode)?;
    let socket = config.socket.clone();
    crate::memory::init_agent_process(&config.memory);
    let agent = Agent::new(config);
    agent.pool.fill();
    let sipc = crate::sipc_socket::path_for(&socket);
    crate::sipc_socket::start(agent.clone(), &sipc, agent.config.socket_mode)
        .map_err(|source| ServeError::Bind { path: sipc.display().to_string(), source })?;
    tracing::info!(socket = %socket.display(), warehouse = %agent.config.warehouse.display(), slots = agent.config.max_parallel, "quiver agent listening");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    if let Some(period) = sd_notify::watchdog_enabled() {
        let every = period / 2;
        tokio::spawn(async move {
            loop {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                tokio::time::sleep(every).await;
            }
        });
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(ServeError::Signal)?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("stopping: no new work, killing function processes");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    };
    serve(agent, listener, shutdown).await;
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&sipc);
    Ok(())
}

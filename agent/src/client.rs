//! The CLI's client for the agent's API: HTTP/1.1 over the Unix socket (hyper).

use std::path::Path;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No agent listens on the socket.
    #[error("cannot reach the agent at {path}: {source}")]
    Connect {
        /// The socket.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("talking to the agent: {0}")]
    Http(#[from] hyper::Error),
    /// The agent refused the request.
    #[error("{status}: {message}")]
    Refused {
        /// HTTP status.
        status: StatusCode,
        /// The agent's message.
        message: String,
    },
    /// The answer was not JSON.
    #[error("the agent's answer is not JSON: {0}")]
    Json(#[from] serde_json::Error),
}

async fn send(sock: &Path, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
    let stream = UnixStream::connect(sock).await.map_err(|source| ClientError::Connect { path: sock.display().to_string(), source })?;
    let (mut tx, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    // The path carries user input (a run id): a malformed one is the caller's error.
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "quiver")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| ClientError::Refused { status: StatusCode::BAD_REQUEST, message: format!("{path:?}: {e}") })?;
    Ok(tx.send_request(req).await?)
}

/// A GET whose answer is text (a node's log).
pub async fn text(sock: &Path, path: &str) -> Result<String, ClientError> {
    let bytes = checked(send(sock, Method::GET, path, None).await?).await?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// A request whose answer is one JSON document.
pub async fn call(sock: &Path, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<serde_json::Value, ClientError> {
    let bytes = checked(send(sock, method, path, body).await?).await?;
    if bytes.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    Ok(serde_json::from_slice(&bytes)?)
}

/// The body of a successful answer, or the agent's error message.
async fn checked(resp: hyper::Response<hyper::body::Incoming>) -> Result<Bytes, ClientError> {
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        return Err(ClientError::Refused { status, message });
    }
    Ok(bytes)
}

/// Follows a run's event stream, calling `f` for each event until the stream ends.
pub async fn follow(sock: &Path, run: &str, mut f: impl FnMut(serde_json::Value)) -> Result<(), ClientError> {
    let resp = send(sock, Method::GET, &format!("/v1/runs/{run}/events"), None).await?;
    if !resp.status().is_success() {
        return Err(ClientError::Refused { status: resp.status(), message: "cannot follow the run".into() });
    }
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            buf.extend_from_slice(&data);
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                if let Ok(v) = serde_json::from_slice(&line) {
                    f(v);
                }
            }
        }
    }
    Ok(())
}

//! The planner API: HTTP/1.1 with JSON on a Unix socket (`curl --unix-socket`).
//!
//! ```text
//! GET    /healthz                  liveness
//! GET    /metrics                  Prometheus text
//! POST   /v1/runs[?dry_run=true]   submit a plan (or only validate and order it)
//! GET    /v1/runs                  runs, newest last
//! GET    /v1/runs/{id}             one run with per-node state
//! POST   /v1/runs/{id}/cancel      cancel a run
//! GET    /v1/runs/{id}/events      the run's events as NDJSON, live until it ends
//! GET    /v1/tables                tables the agent holds
//! GET    /v1/tables/{name}         one table
//! DELETE /v1/tables/{name}         drop a table
//! GET    /v1/cache                 cached column chunks
//! GET    /v1/cache/stats           the cache's and the memory manager's figures
//! DELETE /v1/cache                 drop every cached chunk
//! ```
//!
//! Every error is a JSON object `{"error": "..."}` with a 4xx (the caller's mistake) or 5xx.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::plan::Plan;
use crate::state::{Agent, Metrics, RunStatus};

/// An error answer.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn bad(agent: &Agent, status: StatusCode, msg: impl Into<String>) -> ApiError {
    Metrics::add(&agent.metrics.bad_requests, 1);
    ApiError(status, msg.into())
}

/// The routes, over the agent's state.
pub fn router(agent: Arc<Agent>) -> Router {
    let limit = agent.config.max_body;
    Router::new()
        .route("/healthz", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/metrics", get(metrics))
        .route("/v1/runs", post(submit).get(list_runs))
        .route("/v1/runs/{id}", get(run_status))
        .route("/v1/runs/{id}/cancel", post(cancel))
        .route("/v1/runs/{id}/events", get(events))
        .route("/v1/runs/{id}/logs/{node}", get(node_log))
        .route("/v1/tables", get(list_tables))
        .route("/v1/tables/{name}", get(describe_table).delete(drop_table))
        .route("/v1/cache", get(crate::cache::api::list).delete(crate::cache::api::drop_all))
        .route("/v1/cache/stats", get(crate::cache::api::stats))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint; see docs/api.md".into()) })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(agent)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitQuery {
    #[serde(default)]
    dry_run: bool,
}

async fn submit(
    State(agent): State<Arc<Agent>>,
    q: Result<Query<SubmitQuery>, axum::extract::rejection::QueryRejection>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| bad(&agent, StatusCode::BAD_REQUEST, format!("bad query string: {e}")))?;
    let body = body.map_err(|e| bad(&agent, e.status(), format!("bad body: {}", e.body_text())))?;
    if *agent.stopping.borrow() {
        return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping".into()));
    }
    let plan = Plan::from_json(&body).map_err(|e| bad(&agent, StatusCode::BAD_REQUEST, e.to_string()))?;
    let valid = plan.validate().map_err(|e| bad(&agent, StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    if q.dry_run {
        let order: Vec<_> = valid
            .nodes
            .iter()
            .map(|n| json!({ "name": n.name, "parents": n.parents.iter().map(|&p| &valid.nodes[p].name).collect::<Vec<_>>() }))
            .collect();
        return Ok(Json(json!({ "valid": true, "order": order })).into_response());
    }
    let run = agent.add_run(valid);
    tracing::info!(run = %run.id, nodes = run.plan.nodes.len(), "run submitted");
    agent.python.prestart(&run.plan);
    agent.python.prefork(&run.id, &run.plan);
    tokio::spawn(crate::executor::execute(agent.clone(), run.clone()));
    Ok((StatusCode::CREATED, Json(json!({ "id": run.id, "status": RunStatus::Running }))).into_response())
}

async fn list_runs(State(agent): State<Arc<Agent>>) -> Response {
    let runs: Vec<_> = agent
        .runs()
        .iter()
        .map(|r| {
            let s = r.snapshot();
            json!({ "id": s.id, "name": s.name, "status": s.status, "wall_ms": s.wall_ms, "error": s.error })
        })
        .collect();
    Json(json!({ "runs": runs })).into_response()
}

fn find_run(agent: &Agent, id: &str) -> Result<Arc<crate::state::Run>, ApiError> {
    agent.run(id).ok_or_else(|| bad(agent, StatusCode::NOT_FOUND, format!("no run {id:?}")))
}

async fn run_status(State(agent): State<Arc<Agent>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(find_run(&agent, &id)?.snapshot()).into_response())
}

/// A node's stdout and stderr (Python functions), as text.
async fn node_log(State(agent): State<Arc<Agent>>, Path((id, node)): Path<(String, String)>) -> Result<Response, ApiError> {
    let run = find_run(&agent, &id)?;
    if !run.plan.nodes.iter().any(|n| n.name == node) {
        return Err(bad(&agent, StatusCode::NOT_FOUND, format!("run {id} has no node {node:?}")));
    }
    // The node name was checked against the plan, whose names are validated identifiers: the
    // path cannot leave the logs folder.
    let text = std::fs::read_to_string(agent.python.log_path(&run.id, &node)).unwrap_or_default();
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

async fn cancel(State(agent): State<Arc<Agent>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let run = find_run(&agent, &id)?;
    if run.finished() {
        return Err(bad(&agent, StatusCode::CONFLICT, format!("run {id} has already finished")));
    }
    let _ = run.cancel.send(true);
    run.update(|s| s.error.get_or_insert_with(|| "cancelled by request".into()).clone());
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": id, "cancelling": true }))).into_response())
}

async fn events(State(agent): State<Arc<Agent>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let run = find_run(&agent, &id)?;
    let (past, rx) = run.subscribe();
    let done = |e: &crate::state::Event| e.event.starts_with("run_");
    let finished = past.iter().any(done);
    let head = futures_util::stream::iter(past.into_iter().map(|e| Ok::<_, std::convert::Infallible>(line(&e))));
    let tail = futures_util::stream::unfold((rx, finished), move |(mut rx, stop)| async move {
        if stop {
            return None;
        }
        loop {
            match rx.recv().await {
                Ok(e) => {
                    let end = done(&e);
                    return Some((Ok(line(&e)), (rx, end)));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    use futures_util::StreamExt;
    let body = Body::from_stream(head.chain(tail));
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

fn line(e: &crate::state::Event) -> Bytes {
    let mut v = serde_json::to_vec(e).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

async fn list_tables(State(agent): State<Arc<Agent>>) -> Response {
    let tables: Vec<_> = agent.tables.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(n, t)| t.info(n)).collect();
    Json(json!({ "tables": tables })).into_response()
}

async fn describe_table(State(agent): State<Arc<Agent>>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let t = agent.tables.lock().unwrap_or_else(|e| e.into_inner()).get(&name).cloned();
    let t = t.ok_or_else(|| bad(&agent, StatusCode::NOT_FOUND, format!("no table {name:?}")))?;
    Ok(Json(t.info(&name)).into_response())
}

async fn drop_table(State(agent): State<Arc<Agent>>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let t = agent.tables.lock().unwrap_or_else(|e| e.into_inner()).remove(&name);
    t.ok_or_else(|| bad(&agent, StatusCode::NOT_FOUND, format!("no table {name:?}")))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn metrics(State(agent): State<Arc<Agent>>) -> Response {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let m = &agent.metrics;
    let mut s = String::new();
    let mut counter = |name: &str, help: &str, v: u64| {
        let _ = writeln!(s, "# HELP quiver_{name} {help}\n# TYPE quiver_{name} counter\nquiver_{name} {v}");
    };
    counter("runs_submitted_total", "Runs submitted.", m.runs_submitted.load(Relaxed));
    counter("runs_succeeded_total", "Runs that succeeded.", m.runs_succeeded.load(Relaxed));
    counter("runs_failed_total", "Runs that failed.", m.runs_failed.load(Relaxed));
    counter("runs_cancelled_total", "Runs cancelled.", m.runs_cancelled.load(Relaxed));
    counter("workers_started_total", "Function processes started.", m.workers_started.load(Relaxed));
    counter("nodes_failed_total", "Nodes that failed.", m.nodes_failed.load(Relaxed));
    counter("bytes_referenced_total", "Table bytes handed between nodes by reference.", m.bytes_referenced.load(Relaxed));
    counter("bytes_copied_total", "Table bytes copied between nodes.", m.bytes_copied.load(Relaxed));
    counter("bad_requests_total", "Requests refused as malformed.", m.bad_requests.load(Relaxed));
    counter("page_faults_total", "Page faults of function processes (kernel-measured).", m.page_faults.load(Relaxed));
    counter("memcpy_bytes_total", "Bytes function processes passed to memcpy/memmove (kernel-measured, copy meter).", m.memcpy_bytes.load(Relaxed));
    counter("memcpy_calls_total", "memcpy/memmove calls of function processes (kernel-measured, copy meter).", m.memcpy_calls.load(Relaxed));
    counter("mmaps_total", "mmap calls of function processes (kernel-measured).", m.mmaps.load(Relaxed));
    counter("mmap_bytes_total", "Bytes asked for by function processes' mmap calls (kernel-measured).", m.mmap_bytes.load(Relaxed));
    let t = agent.kernel.status();
    let _ = writeln!(
        s,
        "# HELP quiver_telemetry_available Whether kernel-measured figures are collected (1), with the copy meter.\n# TYPE quiver_telemetry_available gauge\nquiver_telemetry_available{{copy_meter=\"{}\"}} {}",
        t.copy_meter,
        u8::from(t.available)
    );
    let running = agent.runs().iter().filter(|r| !r.finished()).count();
    let _ = writeln!(s, "# HELP quiver_runs_running Runs in progress.\n# TYPE quiver_runs_running gauge\nquiver_runs_running {running}");
    let _ = writeln!(
        s,
        "# HELP quiver_workers_live Function processes alive (waiting ones included).\n# TYPE quiver_workers_live gauge\nquiver_workers_live {}",
        crate::children::count()
    );
    let _ = writeln!(
        s,
        "# HELP quiver_workers_idle Worker processes started and waiting for a node.\n# TYPE quiver_workers_idle gauge\nquiver_workers_idle {}",
        agent.pool.idle()
    );
    let _ = writeln!(
        s,
        "# HELP quiver_table_bytes Bytes of the tables the agent keeps.\n# TYPE quiver_table_bytes gauge\nquiver_table_bytes {}",
        agent.table_bytes()
    );
    crate::cache::api::metrics(&agent, &mut s);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s).into_response()
}

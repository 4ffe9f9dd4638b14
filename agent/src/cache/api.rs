//! The cache's and the memory manager's endpoints and `/metrics` lines:
//!
//! ```text
//! GET    /v1/cache         cached chunks
//! GET    /v1/cache/stats   the cache's and the memory manager's figures
//! DELETE /v1/cache         drop every cached chunk
//! ```

use std::fmt::Write;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::state::Agent;

/// `GET /v1/cache`.
pub async fn list(State(agent): State<Arc<Agent>>) -> Response {
    Json(json!({ "chunks": agent.cache.list() })).into_response()
}

/// `GET /v1/cache/stats`.
pub async fn stats(State(agent): State<Arc<Agent>>) -> Response {
    Json(json!({ "cache": agent.cache.stats(), "memory": agent.memory.stats() })).into_response()
}

/// `DELETE /v1/cache`.
pub async fn drop_all(State(agent): State<Arc<Agent>>) -> Response {
    let (chunks, bytes) = agent.cache.drop_all();
    Json(json!({ "dropped_chunks": chunks, "dropped_bytes": bytes })).into_response()
}

/// Appends the cache's and the memory manager's figures to a Prometheus text page.
pub fn metrics(agent: &Agent, s: &mut String) {
    let c = agent.cache.stats();
    let m = agent.memory.stats();
    let mut line = |name: &str, kind: &str, help: &str, v: u64| {
        let _ = writeln!(s, "# HELP quiver_{name} {help}\n# TYPE quiver_{name} {kind}\nquiver_{name} {v}");
    };
    line("cache_chunks", "gauge", "Decoded column chunks cached.", c.chunks as u64);
    line("cache_bytes", "gauge", "Bytes of the cached chunks' segments.", c.bytes);
    line("cache_hits_total", "counter", "Chunks handed to scans from the cache.", c.hits);
    line("cache_decoded_total", "counter", "Chunks decoded by scans and cached.", c.decoded);
    line("cache_bytes_decoded_total", "counter", "Bytes of the chunks decoded.", c.bytes_decoded);
    line("cache_evicted_total", "counter", "Chunks evicted or dropped.", c.evicted);
    line("cache_invalidated_total", "counter", "Chunks dropped because their file changed.", c.invalidated);
    line("memory_budget_bytes", "gauge", "The node's memory budget.", m.budget_bytes);
    line("memory_held_bytes", "gauge", "Bytes of the sealed segments the agent holds (each counted once).", m.held_bytes);
    line("memory_segments", "gauge", "Sealed segments the agent holds.", m.segments as u64);
    line("memory_reserved_bytes", "gauge", "Estimates of the running launches.", m.reserved_bytes);
    line("memory_peak_held_bytes", "gauge", "Highest held bytes seen.", m.peak_held_bytes);
    line("memory_peak_committed_bytes", "gauge", "Highest held plus reserved bytes seen.", m.peak_committed_bytes);
    line("memory_queued", "gauge", "Launches waiting for memory.", m.queued);
    line("memory_waited_total", "counter", "Launches that waited for memory.", m.waited_total);
    // PSS of each live function process: shared table pages count once across all of them.
    let _ = writeln!(s, "# HELP quiver_function_pss_bytes Proportional set size of a function process (smaps_rollup).\n# TYPE quiver_function_pss_bytes gauge");
    let mut total = 0;
    for pid in crate::children::pids() {
        let Some(pss) = crate::memory::pss(pid) else { continue };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let node = comm.trim().strip_prefix("quiver:").unwrap_or(comm.trim()).replace(['"', '\\'], "_");
        let _ = writeln!(s, "quiver_function_pss_bytes{{pid=\"{pid}\",node=\"{node}\"}} {pss}");
        total += pss;
    }
    let _ = writeln!(s, "# HELP quiver_functions_pss_bytes Summed PSS of all function processes.\n# TYPE quiver_functions_pss_bytes gauge\nquiver_functions_pss_bytes {total}");
    if let Some(p) = crate::memory::pss(std::process::id() as i32) {
        let _ = writeln!(s, "# HELP quiver_agent_pss_bytes PSS of the agent process.\n# TYPE quiver_agent_pss_bytes gauge\nquiver_agent_pss_bytes {p}");
    }
}

//! Runs a plan: each node as soon as its parents are done, independent nodes in parallel up to
//! the agent's slots, each in its own worker process. A failure fails the run and cancels its
//! other nodes; other runs go on. Intermediate tables are released as soon as their last
//! consumer is done; materializations are published only when every node succeeded.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use crate::launch::{NodeError, NodeOutput, Timing, run_worker};
use crate::plan::Task;
use crate::proto::Request;
use crate::state::{Agent, ErrorKind, Metrics, NodeStatus, Run, RunStatus};
use crate::tables::TableRef;
use crate::telemetry::PendingFigures;
use crate::warehouse::{self, Staged};

/// Runs `run` to completion.
pub async fn execute(agent: Arc<Agent>, run: Arc<Run>) {
    let nodes = &run.plan.nodes;
    let n = nodes.len();
    let mut outputs: Vec<Option<TableRef>> = vec![None; n];
    let mut consumers: Vec<usize> = nodes.iter().map(|x| x.children.len()).collect();
    let mut status = vec![NodeStatus::Pending; n];
    let mut staged: Vec<Staged> = Vec::new();
    let mut set: JoinSet<(usize, f64, Result<(NodeOutput, Timing), NodeError>)> = JoinSet::new();
    // When each node's output reached the agent (monotonic_ns), for its children's overhead.
    let mut done_ns: Vec<u64> = vec![0; n];
    let mut failed = false;
    // Kernel figures of succeeded nodes, read once their processes have exited.
    let mut figures: Vec<(usize, PendingFigures)> = Vec::new();
    let mut stopping = agent.stopping.subscribe();
    loop {
        if !failed {
            for i in 0..n {
                let ready = status[i] == NodeStatus::Pending
                    && nodes[i].parents.iter().all(|&p| status[p] == NodeStatus::Succeeded);
                if ready {
                    status[i] = NodeStatus::Running;
                    let inputs: Vec<TableRef> = nodes[i].parents.iter().filter_map(|&p| outputs[p].clone()).collect();
                    set.spawn(start(agent.clone(), run.clone(), i, inputs));
                }
            }
        }
        let joined = tokio::select! {
            j = set.join_next() => j,
            _ = stopping.wait_for(|s| *s), if !failed => {
                failed = true;
                let _ = run.cancel.send(true);
                run.update(|s| s.error.get_or_insert_with(|| "the agent is stopping".into()).clone());
                continue;
            }
        };
        let Some(joined) = joined else { break };
        let (i, wall_ms, result) = match joined {
            Ok(r) => r,
            Err(e) => {
                // A panicking node task is a bug; fail the run rather than the agent.
                failed = true;
                let _ = run.cancel.send(true);
                run.update(|s| s.error.get_or_insert_with(|| format!("internal error: {e}")).clone());
                continue;
            }
        };
        let name = nodes[i].name.clone();
        match result {
            Ok((out, timing)) => {
                status[i] = NodeStatus::Succeeded;
                done_ns[i] = timing.done_ns;
                // The node could start when its last parent's output was in hand (or the run was
                // submitted); it waited for a slot, then the agent launched it.
                let ready_ns = nodes[i].parents.iter().map(|&p| done_ns[p]).max().unwrap_or(run.t0_ns);
                let launch_ns = ready_ns.max(timing.slot_ns);
                let queued_ms = launch_ns.saturating_sub(ready_ns) as f64 / 1e6;
                let overhead_ms = timing.started_ns.saturating_sub(launch_ns) as f64 / 1e6;
                let (rows, referenced, copied, moved) = match out {
                    NodeOutput::Table(t, b) => {
                        let rows = t.rows;
                        outputs[i] = Some(Arc::new(t));
                        (rows, b.referenced, b.copied, b.moved)
                    }
                    NodeOutput::Staged(rows, files) => {
                        if let Task::Materialize { table, mode } = &nodes[i].task {
                            staged.push(Staged { table: table.clone(), mode: *mode, files });
                        }
                        (rows, 0, 0, 0)
                    }
                };
                Metrics::add(&agent.metrics.bytes_referenced, referenced);
                Metrics::add(&agent.metrics.bytes_copied, copied);
                run.update(|s| {
                    let ns = &mut s.nodes[i];
                    ns.state = NodeStatus::Succeeded;
                    ns.wall_ms = Some(wall_ms);
                    ns.rows = rows;
                    ns.bytes_referenced = referenced;
                    ns.bytes_copied = copied;
                    ns.bytes_moved = moved;
                    ns.overhead_ms = Some(overhead_ms);
                    ns.queued_ms = Some(queued_ms);
                    ns.start = timing.start;
                    ns.memory_peak_bytes = timing.memory_peak;
                    ns.cache = timing.cache;
                });
                if let Some(f) = timing.kernel {
                    figures.push((i, f));
                }
                run.emit("node_succeeded", Some(&name), Some(format!("{rows} rows")), None);
                // Release parents whose last consumer this was, unless pinned.
                for &p in &nodes[i].parents {
                    consumers[p] -= 1;
                    if consumers[p] == 0 && !nodes[p].pin {
                        outputs[p] = None;
                    }
                }
            }
            Err(e) => {
                let (st, event, kind) = match &e {
                    NodeError::User(_) => (NodeStatus::Failed, "node_failed", Some(ErrorKind::User)),
                    NodeError::System(_) => (NodeStatus::Failed, "node_failed", Some(ErrorKind::System)),
                    NodeError::Timeout(_) => (NodeStatus::TimedOut, "node_timed_out", Some(ErrorKind::User)),
                    NodeError::Cancelled => (NodeStatus::Cancelled, "node_cancelled", None),
                };
                status[i] = st;
                let msg = e.to_string();
                run.update(|s| {
                    let ns = &mut s.nodes[i];
                    ns.state = st;
                    ns.wall_ms = Some(wall_ms);
                    if e != NodeError::Cancelled {
                        ns.error = Some(msg.clone());
                        ns.error_kind = kind;
                        s.error.get_or_insert_with(|| format!("{name}: {msg}"));
                    }
                });
                run.emit(event, Some(&name), (e != NodeError::Cancelled).then(|| msg.clone()), kind);
                if e != NodeError::Cancelled {
                    Metrics::add(&agent.metrics.nodes_failed, 1);
                }
                if !failed {
                    failed = true;
                    let _ = run.cancel.send(true);
                }
            }
        }
    }
    // The run ends once its figures are in: a worker's exit after its answer takes
    // milliseconds; one that hangs costs its figures, not the run.
    for (i, f) in figures {
        if let Ok(Ok(Some(k))) = tokio::time::timeout(Duration::from_secs(10), f).await {
            let m = &agent.metrics;
            Metrics::add(&m.page_faults, k.page_faults);
            Metrics::add(&m.memcpy_bytes, k.memcpy_bytes.unwrap_or(0));
            Metrics::add(&m.memcpy_calls, k.memcpy_calls.unwrap_or(0));
            Metrics::add(&m.mmaps, k.mmaps);
            Metrics::add(&m.mmap_bytes, k.mmap_bytes);
            run.update(|s| s.nodes[i].kernel = Some(k));
        }
    }
    finish(&agent, &run, &status, &mut outputs, staged, failed);
}

fn finish(agent: &Agent, run: &Run, status: &[NodeStatus], outputs: &mut [Option<TableRef>], staged: Vec<Staged>, failed: bool) {
    let nodes = &run.plan.nodes;
    agent.python.discard(&run.id);
    // Nodes that never ran: skipped when a parent failed, cancelled otherwise.
    for i in 0..nodes.len() {
        if status[i] == NodeStatus::Pending {
            let parent_failed = nodes[i].parents.iter().any(|&p| status[p] != NodeStatus::Succeeded);
            let (st, ev) = if parent_failed { (NodeStatus::Skipped, "node_skipped") } else { (NodeStatus::Cancelled, "node_cancelled") };
            run.update(|s| s.nodes[i].state = st);
            run.emit(ev, Some(&nodes[i].name), None, None);
        }
    }
    let mut failed = failed;
    if !failed && let Err(e) = warehouse::publish(&agent.config.warehouse, &run.id, &staged) {
        failed = true;
        run.update(|s| s.error = Some(e.to_string()));
    }
    if failed {
        warehouse::discard(&agent.config.warehouse, &run.id);
    }
    // Pinned tables stay, under RUN.NODE; everything else is released here.
    let mut kept = Vec::new();
    if !failed {
        let mut tables = agent.tables.lock().unwrap_or_else(|e| e.into_inner());
        for (i, n) in nodes.iter().enumerate() {
            if n.pin
                && let Some(t) = outputs[i].take()
            {
                let name = format!("{}.{}", run.id, n.name);
                tables.insert(name.clone(), t);
                kept.push(name);
            }
        }
    }
    outputs.iter_mut().for_each(|o| *o = None);
    let cancelled = run.cancel.borrow().to_owned() && status.iter().all(|s| *s != NodeStatus::Failed && *s != NodeStatus::TimedOut);
    let final_status = if !failed {
        RunStatus::Succeeded
    } else if cancelled {
        RunStatus::Cancelled
    } else {
        RunStatus::Failed
    };
    let wall = run.ms();
    let error = run.update(|s| {
        s.status = final_status;
        s.wall_ms = Some(wall);
        s.tables = kept;
        s.error.clone()
    });
    match final_status {
        RunStatus::Succeeded => {
            Metrics::add(&agent.metrics.runs_succeeded, 1);
            run.emit("run_succeeded", None, None, None);
        }
        RunStatus::Cancelled => {
            Metrics::add(&agent.metrics.runs_cancelled, 1);
            run.emit("run_cancelled", None, error, None);
        }
        _ => {
            Metrics::add(&agent.metrics.runs_failed, 1);
            run.emit("run_failed", None, error, None);
        }
    }
    tracing::info!(run = %run.id, status = ?final_status, wall_ms = wall, "run finished");
}

/// Waits for a slot, then runs node `i` in a worker.
async fn start(agent: Arc<Agent>, run: Arc<Run>, i: usize, inputs: Vec<TableRef>) -> (usize, f64, Result<(NodeOutput, Timing), NodeError>) {
    let node = &run.plan.nodes[i];
    let mut cancel = run.cancel.subscribe();
    // Memory first, so a launch waiting for memory holds no slot: nodes that consume held
    // tables go before new scans, and must be able to get a slot (see memory.rs).
    let estimate = agent.memory.estimate(&node.task, &node.resources, &inputs, &agent.cache, &agent.config);
    let consumer = !node.parents.is_empty();
    let _grant = match agent.memory.admit(estimate, consumer, &agent.cache, &mut cancel).await {
        Ok(g) => g,
        Err(_) => return (i, 0.0, Err(NodeError::Cancelled)),
    };
    // Busy slots go to higher-priority runs first.
    let _slot = tokio::select! {
        s = agent.slots.acquire(run.plan.priority) => s,
        _ = cancel.wait_for(|c| *c) => return (i, 0.0, Err(NodeError::Cancelled)),
    };
    let slot_ns = crate::proto::monotonic_ns();
    let started = run.ms();
    run.update(|s| {
        s.nodes[i].state = NodeStatus::Running;
        s.nodes[i].started_ms = Some(started);
    });
    run.emit("node_started", Some(&node.name), None, None);
    Metrics::add(&agent.metrics.workers_started, 1);
    let staging = matches!(node.task, Task::Materialize { .. })
        .then(|| warehouse::staging(&agent.config.warehouse, &run.id, &node.name));
    // The worker cannot create it: it sees none of the host's folders.
    if let Some(dir) = &staging
        && let Err(e) = std::fs::create_dir_all(dir)
    {
        return (i, run.ms() - started, Err(NodeError::System(format!("creating the staging folder {}: {e}", dir.display()))));
    }
    let req = Request {
        run: run.id.clone(),
        node: node.name.clone(),
        task: node.task.clone(),
        inputs: node.parents.iter().map(|&p| run.plan.nodes[p].name.clone()).collect(),
        staging,
        edges: run.plan.edges,
        cache: agent.config.cache.enabled && matches!(node.task, Task::Scan { .. }),
    };
    let timeout = Duration::from_secs_f64(node.resources.timeout_s.unwrap_or(agent.config.default_timeout_s));
    let r = match &node.task {
        Task::Python(_) => agent.python.run(&run.id, node, req, inputs, timeout, run.cancel.subscribe()).await,
        _ => {
            let cache = req.cache.then(|| (agent.cache.clone(), agent.memory.clone()));
            run_worker(&agent.pool, req, inputs, cache, timeout, run.cancel.subscribe()).await
        }
    };
    (i, run.ms() - started, r.map(|(out, t)| (out, Timing { slot_ns, ..t })))
}

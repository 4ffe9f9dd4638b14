//! Plans: the DAG a planner submits, as JSON, and its validation into something the executor
//! can run. Every rule here answers a malformed plan with a message that says what is wrong.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::filter::{Filter, parse_filter};

/// Most nodes one plan may have.
pub const MAX_NODES: usize = 1000;

/// A plan as submitted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// A label for the run (shown in status and logs).
    #[serde(default)]
    pub name: Option<String>,
    /// Higher runs first when the node is busy.
    #[serde(default)]
    pub priority: i32,
    /// How tables travel between nodes.
    #[serde(default)]
    pub edges: Edges,
    /// The functions, in any order; the DAG follows from `parents`.
    pub nodes: Vec<NodeSpec>,
}

/// What a node does.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    /// Read Parquet into the arena.
    Scan,
    /// Run DuckDB SQL over the parents' tables.
    Sql,
    /// Write the parent's table into the warehouse.
    Materialize,
    /// Call a Python function (see [`PythonTask`]).
    Python,
}

/// How tables travel between nodes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Edges {
    /// By reference, in the arena's sealed segments: zero copy.
    #[default]
    Arena,
    /// Copied through an Arrow IPC stream: each output is encoded as a stream and decoded into
    /// fresh memory before it is handed on (the copying baseline of the pipeline benchmark).
    Ipc,
}

/// How a materialization treats the existing table.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum MaterializeMode {
    /// Replace the table's contents.
    #[default]
    Replace,
    /// Add files to the table.
    Append,
}

/// Limits of one function invocation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Memory limit in bytes.
    #[serde(default)]
    pub memory: Option<u64>,
    /// CPU share (1.0 = one core).
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Wall-clock limit in seconds.
    #[serde(default)]
    pub timeout_s: Option<f64>,
}

/// One node as submitted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Unique name; SQL refers to parents by it.
    pub name: String,
    /// What the node does.
    pub kind: NodeKind,
    /// Names of the nodes whose tables this one reads.
    #[serde(default)]
    pub parents: Vec<String>,
    /// scan: a Parquet file or a folder of them.
    #[serde(default)]
    pub path: Option<String>,
    /// scan: the columns to read (all when absent).
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// scan: a filter (`col op literal`, `col IN (...)`, joined by AND).
    #[serde(default)]
    pub filter: Option<String>,
    /// sql: the query.
    #[serde(default)]
    pub sql: Option<String>,
    /// materialize: the warehouse table to write.
    #[serde(default)]
    pub table: Option<String>,
    /// materialize: replace (default) or append.
    #[serde(default)]
    pub mode: Option<MaterializeMode>,
    /// python: the function to call.
    #[serde(default)]
    pub python: Option<PythonSpec>,
    /// Limits of the function process.
    #[serde(default)]
    pub resources: Resources,
    /// Keep the node's table after the run (intermediates are released otherwise).
    #[serde(default)]
    pub pin: bool,
}

/// The task of a validated node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Task {
    /// Read Parquet.
    Scan {
        /// File or folder.
        path: String,
        /// Projection.
        columns: Option<Vec<String>>,
        /// Filter, parsed.
        filter: Option<Filter>,
    },
    /// Run SQL.
    Sql {
        /// The query.
        sql: String,
    },
    /// Write to the warehouse.
    Materialize {
        /// Warehouse table name.
        table: String,
        /// Replace or append.
        mode: MaterializeMode,
    },
    /// Call a Python function in its environment (a zygote's child, or a cold start).
    Python(PythonTask),
}

/// A Python model as the function process receives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PythonTask {
    /// The `.py` file that defines the function (absolute path).
    pub module: String,
    /// The function's name in that file.
    pub function: String,
    /// The environment it runs in.
    pub env: EnvSpec,
    /// The function's table arguments, one per parent.
    pub params: Vec<PythonParam>,
    /// An expectation: returns a bool and produces no table; `False` fails the run.
    #[serde(default)]
    pub expectation: bool,
    /// The only way to lift the network denial.
    #[serde(default)]
    pub internet_access: bool,
}

/// A Python node as submitted (`"python": {...}` in a plan).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PythonSpec {
    /// The `.py` file that defines the function (absolute path).
    pub module: String,
    /// The function's name.
    pub function: String,
    /// Its environment.
    pub env: EnvSpec,
    /// One per parent: which argument receives it, with projection and filter.
    #[serde(default)]
    pub params: Vec<ParamSpec>,
    /// An expectation (returns a bool, no table).
    #[serde(default)]
    pub expectation: bool,
    /// May reach the network.
    #[serde(default)]
    pub internet_access: bool,
}

/// A Python argument as submitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    /// The parameter name.
    pub arg: String,
    /// The parent it receives.
    pub parent: String,
    /// Columns to keep.
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// A filter in the scan filter language.
    #[serde(default)]
    pub filter: Option<String>,
}

pub use quiver_envs::EnvSpec;

/// One argument of a Python function: `arg=quiver.Model(parent, columns=..., filter=...)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PythonParam {
    /// The function's parameter name.
    pub arg: String,
    /// The parent node whose table it receives.
    pub parent: String,
    /// Columns to keep (all when absent).
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// Rows to keep, parsed (the scan filter language).
    #[serde(default)]
    pub filter: Option<Filter>,
}

/// A node that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Unique name.
    pub name: String,
    /// Indexes of the parents in [`ValidPlan::nodes`].
    pub parents: Vec<usize>,
    /// Indexes of the children.
    pub children: Vec<usize>,
    /// What to run.
    pub task: Task,
    /// Limits.
    pub resources: Resources,
    /// Keep the table after the run.
    pub pin: bool,
}

/// A plan that passed validation, nodes in topological order.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidPlan {
    /// Label.
    pub name: Option<String>,
    /// Priority.
    pub priority: i32,
    /// How tables travel between nodes.
    pub edges: Edges,
    /// Nodes, parents before children.
    pub nodes: Vec<Node>,
}

/// Why a plan was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    /// The JSON does not parse or does not match the schema.
    #[error("invalid plan JSON: {0}")]
    Json(String),
    /// No nodes.
    #[error("the plan has no nodes")]
    Empty,
    /// Too many nodes.
    #[error("the plan has {0} nodes; at most {MAX_NODES} are allowed")]
    TooLarge(usize),
    /// A bad node name.
    #[error("node name {0:?} is invalid: use 1 to 64 letters, digits or underscores, not starting with a digit")]
    BadName(String),
    /// Two nodes with one name.
    #[error("two nodes are named {0:?}")]
    Duplicate(String),
    /// A parent that is not in the plan.
    #[error("node {node:?} names parent {parent:?}, which is not in the plan")]
    MissingParent {
        /// The node.
        node: String,
        /// The unknown parent.
        parent: String,
    },
    /// A cycle.
    #[error("the plan has a cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
    /// A node whose fields do not fit its kind.
    #[error("node {node:?}: {message}")]
    Node {
        /// The node.
        node: String,
        /// What is wrong.
        message: String,
    },
}

fn node_err(node: &str, message: impl Into<String>) -> PlanError {
    PlanError::Node { node: node.to_owned(), message: message.into() }
}

/// Whether `s` is a valid node or table name.
pub fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && s.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Plan {
    /// Parses a plan from JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Plan, PlanError> {
        serde_json::from_slice(bytes).map_err(|e| PlanError::Json(e.to_string()))
    }

    /// Checks every rule and orders the nodes.
    pub fn validate(&self) -> Result<ValidPlan, PlanError> {
        if self.nodes.is_empty() {
            return Err(PlanError::Empty);
        }
        if self.nodes.len() > MAX_NODES {
            return Err(PlanError::TooLarge(self.nodes.len()));
        }
        let mut index = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if !valid_name(&n.name) {
                return Err(PlanError::BadName(n.name.clone()));
            }
            if index.insert(n.name.as_str(), i).is_some() {
                return Err(PlanError::Duplicate(n.name.clone()));
            }
        }
        let mut tasks = Vec::with_capacity(self.nodes.len());
        let mut parents = Vec::with_capacity(self.nodes.len());
        for n in &self.nodes {
            let mut ps = Vec::new();
            let mut seen = HashSet::new();
            for p in &n.parents {
                let &pi = index.get(p.as_str()).ok_or_else(|| PlanError::MissingParent {
                    node: n.name.clone(),
                    parent: p.clone(),
                })?;
                if !seen.insert(pi) {
                    return Err(node_err(&n.name, format!("parent {p:?} is named twice")));
                }
                ps.push(pi);
            }
            tasks.push(task(n)?);
            check_resources(n)?;
            parents.push(ps);
        }
        let order = topo_order(&self.nodes, &parents)?;
        // Re-index in topological order.
        let mut new_index = vec![0; order.len()];
        for (new, &old) in order.iter().enumerate() {
            new_index[old] = new;
        }
        let mut nodes: Vec<Node> = order
            .iter()
            .map(|&old| Node {
                name: self.nodes[old].name.clone(),
                parents: parents[old].iter().map(|&p| new_index[p]).collect(),
                children: Vec::new(),
                task: tasks[old].clone(),
                resources: self.nodes[old].resources.clone(),
                pin: self.nodes[old].pin,
            })
            .collect();
        for i in 0..nodes.len() {
            for p in nodes[i].parents.clone() {
                nodes[p].children.push(i);
            }
        }
        Ok(ValidPlan { name: self.name.clone(), priority: self.priority, edges: self.edges, nodes })
    }
}

fn task(n: &NodeSpec) -> Result<Task, PlanError> {
    let not_for = |field: &str, present: bool| -> Result<(), PlanError> {
        if present {
            Err(node_err(&n.name, format!("field `{field}` is not valid for a {:?} node", n.kind).to_lowercase()))
        } else {
            Ok(())
        }
    };
    if n.kind != NodeKind::Python && n.python.is_some() {
        return Err(node_err(&n.name, "field `python` is only valid for a python node"));
    }
    match n.kind {
        NodeKind::Scan => {
            not_for("sql", n.sql.is_some())?;
            not_for("table", n.table.is_some())?;
            not_for("mode", n.mode.is_some())?;
            if !n.parents.is_empty() {
                return Err(node_err(&n.name, "a scan node has no parents"));
            }
            let path = n.path.clone().filter(|p| !p.is_empty()).ok_or_else(|| node_err(&n.name, "a scan node needs `path`"))?;
            // Relative to what? The daemon's working folder means nothing to a planner.
            if !std::path::Path::new(&path).is_absolute() {
                return Err(node_err(&n.name, format!("path {path:?} must be absolute")));
            }
            if let Some(cols) = &n.columns {
                if cols.is_empty() {
                    return Err(node_err(&n.name, "`columns` is empty; leave it out to read every column"));
                }
                let mut seen = HashSet::new();
                for c in cols {
                    if !seen.insert(c) {
                        return Err(node_err(&n.name, format!("column {c:?} is listed twice")));
                    }
                }
            }
            let filter = match &n.filter {
                Some(f) => Some(parse_filter(f).map_err(|e| node_err(&n.name, format!("filter: {e}")))?),
                None => None,
            };
            Ok(Task::Scan { path, columns: n.columns.clone(), filter })
        }
        NodeKind::Sql => {
            not_for("path", n.path.is_some())?;
            not_for("columns", n.columns.is_some())?;
            not_for("filter", n.filter.is_some())?;
            not_for("table", n.table.is_some())?;
            not_for("mode", n.mode.is_some())?;
            let sql = n.sql.clone().filter(|s| !s.trim().is_empty()).ok_or_else(|| node_err(&n.name, "a sql node needs `sql`"))?;
            if sql.len() > 1 << 20 {
                return Err(node_err(&n.name, "the query is longer than 1 MiB"));
            }
            Ok(Task::Sql { sql })
        }
        NodeKind::Python => python_task(n),
        NodeKind::Materialize => {
            not_for("path", n.path.is_some())?;
            not_for("columns", n.columns.is_some())?;
            not_for("filter", n.filter.is_some())?;
            not_for("sql", n.sql.is_some())?;
            if n.parents.len() != 1 {
                return Err(node_err(&n.name, format!("a materialize node has exactly one parent, not {}", n.parents.len())));
            }
            let table = n.table.clone().unwrap_or_else(|| n.parents[0].clone());
            if !valid_name(&table) {
                return Err(node_err(&n.name, format!("table name {table:?} is invalid")));
            }
            Ok(Task::Materialize { table, mode: n.mode.unwrap_or_default() })
        }
    }
}

fn python_task(n: &NodeSpec) -> Result<Task, PlanError> {
    for (field, present) in [("path", n.path.is_some()), ("columns", n.columns.is_some()), ("filter", n.filter.is_some()), ("sql", n.sql.is_some()), ("table", n.table.is_some()), ("mode", n.mode.is_some())] {
        if present {
            return Err(node_err(&n.name, format!("field `{field}` is not valid for a python node (put columns and filter on its params)")));
        }
    }
    let p = n.python.as_ref().ok_or_else(|| node_err(&n.name, "a python node needs `python`"))?;
    if !p.module.starts_with('/') || !p.module.ends_with(".py") || p.module.contains('\0') {
        return Err(node_err(&n.name, format!("module {:?} must be an absolute path to a .py file", p.module)));
    }
    if !is_identifier(&p.function) {
        return Err(node_err(&n.name, format!("function {:?} is not a Python identifier", p.function)));
    }
    p.env.validate().map_err(|e| node_err(&n.name, format!("env: {e}")))?;
    let mut params = Vec::new();
    let mut args = HashSet::new();
    for q in &p.params {
        if !is_identifier(&q.arg) || !args.insert(&q.arg) {
            return Err(node_err(&n.name, format!("parameter {:?} is not an identifier or is named twice", q.arg)));
        }
        if !n.parents.contains(&q.parent) {
            return Err(node_err(&n.name, format!("parameter {} reads {:?}, which is not among the node's parents", q.arg, q.parent)));
        }
        if q.columns.as_ref().is_some_and(|c| c.is_empty()) {
            return Err(node_err(&n.name, format!("parameter {}: `columns` is empty", q.arg)));
        }
        let filter = match &q.filter {
            Some(f) => Some(parse_filter(f).map_err(|e| node_err(&n.name, format!("parameter {} filter: {e}", q.arg)))?),
            None => None,
        };
        params.push(PythonParam { arg: q.arg.clone(), parent: q.parent.clone(), columns: q.columns.clone(), filter });
    }
    if let Some(unused) = n.parents.iter().find(|par| !p.params.iter().any(|q| &q.parent == *par)) {
        return Err(node_err(&n.name, format!("parent {unused:?} is passed to no parameter")));
    }
    Ok(Task::Python(PythonTask {
        module: p.module.clone(),
        function: p.function.clone(),
        env: p.env.clone(),
        params,
        expectation: p.expectation,
        internet_access: p.internet_access,
    }))
}

fn is_identifier(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_') && c.all(|x| x.is_ascii_alphanumeric() || x == '_') && s.len() <= 128
}

fn check_resources(n: &NodeSpec) -> Result<(), PlanError> {
    let r = &n.resources;
    if let Some(m) = r.memory
        && m < 1 << 20
    {
        return Err(node_err(&n.name, format!("memory limit {m} bytes is below 1 MiB")));
    }
    if let Some(c) = r.cpus
        && !(c > 0.0 && c <= 1024.0)
    {
        return Err(node_err(&n.name, format!("cpus {c} is not in (0, 1024]")));
    }
    if let Some(t) = r.timeout_s
        && !(t > 0.0 && t <= 7.0 * 86400.0)
    {
        return Err(node_err(&n.name, format!("timeout_s {t} is not in (0, one week]")));
    }
    Ok(())
}

/// Kahn's algorithm; on a cycle, names one.
fn topo_order(nodes: &[NodeSpec], parents: &[Vec<usize>]) -> Result<Vec<usize>, PlanError> {
    let n = nodes.len();
    let mut indegree: Vec<usize> = parents.iter().map(Vec::len).collect();
    let mut children = vec![Vec::new(); n];
    for (i, ps) in parents.iter().enumerate() {
        for &p in ps {
            children[p].push(i);
        }
    }
    // Stable order: among ready nodes, submission order.
    let mut ready: BTreeMap<usize, ()> = (0..n).filter(|&i| indegree[i] == 0).map(|i| (i, ())).collect();
    let mut order = Vec::with_capacity(n);
    while let Some((i, ())) = ready.pop_first() {
        order.push(i);
        for &c in &children[i] {
            indegree[c] -= 1;
            if indegree[c] == 0 {
                ready.insert(c, ());
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Walk parents from any node left until one repeats: that is a cycle.
    // Nodes left are exactly those with unprocessed parents, so each has a parent left.
    let left = |i: usize| parents[i].iter().copied().find(|&p| indegree[p] > 0);
    let Some(mut at) = (0..n).find(|&i| indegree[i] > 0) else {
        return Err(PlanError::Cycle(Vec::new()));
    };
    let mut path = Vec::new();
    let mut pos = HashMap::new();
    loop {
        if let Some(&start) = pos.get(&at) {
            let mut cycle: Vec<String> = path[start..].iter().map(|&i: &usize| nodes[i].name.clone()).collect();
            cycle.reverse();
            cycle.push(cycle[0].clone());
            return Err(PlanError::Cycle(cycle));
        }
        pos.insert(at, path.len());
        path.push(at);
        let Some(next) = left(at) else {
            return Err(PlanError::Cycle(path.iter().map(|&i| nodes[i].name.clone()).collect()));
        };
        at = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sql(name: &str, parents: &[String]) -> serde_json::Value {
        serde_json::json!({"name": name, "kind": "sql", "sql": "select 1", "parents": parents})
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        /// Any bytes: a plan or an error, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(p) = Plan::from_json(&bytes) {
                let _ = p.validate();
            }
        }

        /// Random DAGs (edges only to earlier nodes, submitted shuffled) validate, and the
        /// order puts every parent before its children.
        #[test]
        fn random_dags_validate_in_topological_order(
            n in 1usize..30,
            edges in prop::collection::vec((0usize..30, 0usize..30), 0..60),
            seed in any::<u64>(),
        ) {
            let mut parents = vec![Vec::new(); n];
            for (a, b) in edges {
                let (a, b) = (a % n, b % n);
                if a < b && !parents[b].contains(&format!("n{a}")) {
                    parents[b].push(format!("n{a}"));
                }
            }
            let mut nodes: Vec<_> = (0..n).map(|i| sql(&format!("n{i}"), &parents[i])).collect();
            // Shuffle deterministically.
            let mut s = seed;
            for i in (1..nodes.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                nodes.swap(i, (s >> 33) as usize % (i + 1));
            }
            let plan = Plan::from_json(serde_json::json!({"nodes": nodes}).to_string().as_bytes()).unwrap();
            let v = plan.validate().unwrap();
            for (i, node) in v.nodes.iter().enumerate() {
                for &p in &node.parents {
                    prop_assert!(p < i);
                    prop_assert!(v.nodes[p].children.contains(&i));
                }
            }
        }

        /// Adding a back edge to a chain makes a cycle, and the error names it.
        #[test]
        fn back_edges_are_cycles(n in 2usize..20, from in 0usize..20) {
            let from = from % n;
            let mut nodes: Vec<_> = (0..n).map(|i| {
                let ps = if i == 0 { vec![format!("n{}", n - 1)] } else { vec![format!("n{}", i - 1)] };
                sql(&format!("n{i}"), &ps)
            }).collect();
            nodes.rotate_left(from);
            let plan = Plan::from_json(serde_json::json!({"nodes": nodes}).to_string().as_bytes()).unwrap();
            match plan.validate() {
                Err(PlanError::Cycle(c)) => prop_assert_eq!(c.len(), n + 1),
                other => prop_assert!(false, "expected a cycle, got {:?}", other),
            }
        }
    }
}

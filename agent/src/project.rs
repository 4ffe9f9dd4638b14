//! Projects: a folder of SQL models (`NAME.sql`, parents named in `FROM`/`JOIN`) and a
//! `quiver.toml` naming the Parquet sources and per-model settings. The DAG follows from the
//! names, as with `bauplan run`.
//!
//! ```toml
//! [sources.trips]            # a scan node named `trips`
//! path = "data/trips"        # relative to the project
//! columns = ["pickup_location_id", "fare_amount"]   # optional projection
//! filter = "fare_amount > 0"                         # optional filter
//!
//! [models.top_pickup_locations]
//! materialize = true         # also write it to the warehouse
//! mode = "replace"           # or "append"
//! pin = false
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::json;

use crate::plan::{MaterializeMode, valid_name};

/// A source table.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// Parquet file or folder, relative to the project.
    pub path: PathBuf,
    /// Projection.
    pub columns: Option<Vec<String>>,
    /// Filter.
    pub filter: Option<String>,
}

/// Settings of one model.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    /// Write it to the warehouse.
    #[serde(default)]
    pub materialize: bool,
    /// Replace or append.
    pub mode: Option<MaterializeMode>,
    /// Keep the table in the agent after the run.
    #[serde(default)]
    pub pin: bool,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ProjectFile {
    #[serde(default)]
    sources: BTreeMap<String, Source>,
    #[serde(default)]
    models: BTreeMap<String, ModelSettings>,
}

/// Reads a project folder into a plan (JSON, as the API takes it).
pub fn plan(dir: &Path) -> anyhow::Result<serde_json::Value> {
    let dir = dir.canonicalize().map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let cfg_path = dir.join("quiver.toml");
    let cfg: ProjectFile = match std::fs::read_to_string(&cfg_path) {
        Ok(t) => toml::from_str(&t).map_err(|e| anyhow::anyhow!("{}: {e}", cfg_path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ProjectFile::default(),
        Err(e) => anyhow::bail!("{}: {e}", cfg_path.display()),
    };
    let mut models = BTreeMap::new();
    for e in std::fs::read_dir(&dir)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "sql") {
            let name = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
            anyhow::ensure!(valid_name(&name), "{}: a model name is letters, digits and underscores", p.display());
            models.insert(name, std::fs::read_to_string(&p)?);
        }
    }
    let python = python_models(&dir)?;
    anyhow::ensure!(!models.is_empty() || !python.is_empty(), "{} has no .sql or Python models", dir.display());
    for m in cfg.models.keys() {
        anyhow::ensure!(models.contains_key(m), "quiver.toml configures model {m:?}, but there is no {m}.sql");
    }
    let mut nodes = Vec::new();
    let mut used_sources = BTreeMap::new();
    // Sources a Python model reads, with the columns it asks for (None: all of them).
    let mut python_reads: BTreeMap<String, Option<Vec<String>>> = BTreeMap::new();
    for m in &python {
        anyhow::ensure!(!models.contains_key(&m.name), "model {:?} is defined both in SQL and in Python", m.name);
        let parents: Vec<String> = m.params.iter().map(|p| p.parent.clone()).collect();
        for p in &m.params {
            if let Some(s) = cfg.sources.get(&p.parent) {
                used_sources.insert(p.parent.clone(), s.clone());
                let e = python_reads.entry(p.parent.clone()).or_insert_with(|| Some(Vec::new()));
                match (&p.columns, e.as_mut()) {
                    (Some(c), Some(all)) => {
                        let new: Vec<String> = c.iter().filter(|x| !all.contains(x)).cloned().collect();
                        all.extend(new);
                    }
                    _ => *e = None,
                }
            }
        }
        let python = json!({"module": m.module, "function": m.function, "env": m.env, "params": m.params,
                            "expectation": m.expectation, "internet_access": m.internet_access});
        nodes.push(json!({"name": m.name, "kind": "python", "parents": parents, "python": python, "resources": m.resources}));
        if m.materialize {
            nodes.push(json!({"name": format!("{}__materialize", m.name), "kind": "materialize", "parents": [m.name], "table": m.name}));
        }
    }
    for (name, sql) in &models {
        let parents: Vec<String> = referenced(sql)
            .into_iter()
            .filter(|r| r != name && (models.contains_key(r) || cfg.sources.contains_key(r)))
            .collect();
        for p in &parents {
            if let Some(s) = cfg.sources.get(p) {
                used_sources.insert(p.clone(), s.clone());
            }
        }
        let settings = cfg.models.get(name).cloned().unwrap_or_default();
        nodes.push(json!({"name": name, "kind": "sql", "sql": sql, "parents": parents, "pin": settings.pin}));
        if settings.materialize {
            nodes.push(json!({"name": format!("{name}__materialize"), "kind": "materialize", "parents": [name],
                              "table": name, "mode": settings.mode.unwrap_or_default()}));
        }
    }
    for (name, s) in used_sources {
        let path = if s.path.is_absolute() { s.path.clone() } else { dir.join(&s.path) };
        let mut n = json!({"name": name, "kind": "scan", "path": path.display().to_string()});
        // Without a projection, read only the columns the models reading the source use.
        let readers: Vec<&str> = models.iter().filter(|(m, sql)| *m != &name && referenced(sql).contains(&name)).map(|(_, sql)| sql.as_str()).collect();
        let columns = s.columns.or_else(|| {
            let all = parquet_columns(&path)?;
            let mut cols = if readers.is_empty() { Vec::new() } else { used_columns(&all, &readers)? };
            match python_reads.get(&name) {
                None => {}
                Some(None) => return None,
                Some(Some(py)) => {
                    let new: Vec<String> = py.iter().filter(|c| !cols.contains(c)).cloned().collect();
                    cols.extend(new);
                }
            }
            Some(cols).filter(|c| !c.is_empty() && c.len() < all.len())
        });
        if let Some(c) = columns {
            n["columns"] = json!(c);
        }
        if let Some(f) = s.filter {
            n["filter"] = json!(f);
        }
        nodes.insert(0, n);
    }
    let name = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned);
    Ok(json!({"name": name, "nodes": nodes}))
}

/// A Python model as `python -m quiver.discover` describes it.
#[derive(Debug, Clone, Deserialize)]
struct PythonModel {
    name: String,
    module: String,
    function: String,
    env: serde_json::Value,
    params: Vec<Param>,
    #[serde(default)]
    materialize: bool,
    #[serde(default)]
    expectation: bool,
    #[serde(default)]
    internet_access: bool,
    #[serde(default)]
    resources: serde_json::Value,
}

/// One argument of a Python model.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
struct Param {
    arg: String,
    parent: String,
    #[serde(default)]
    columns: Option<Vec<String>>,
    #[serde(default)]
    filter: Option<String>,
}

/// The project's Python models, found by importing its `.py` files with the SDK's discovery
/// (`python3 -m quiver.discover`, the user's own interpreter: the decorators need nothing else).
fn python_models(dir: &Path) -> anyhow::Result<Vec<PythonModel>> {
    let has_py = std::fs::read_dir(dir)?.filter_map(Result::ok).any(|e| e.path().extension().is_some_and(|x| x == "py"));
    if !has_py {
        return Ok(Vec::new());
    }
    let out = std::process::Command::new(std::env::var_os("QUIVER_PYTHON").unwrap_or_else(|| "python3".into()))
        .args(["-m", "quiver.discover"])
        .arg(dir)
        .env("PYTHONPATH", crate::python::default_harness())
        .output()
        .map_err(|e| anyhow::anyhow!("running python3 -m quiver.discover: {e}"))?;
    anyhow::ensure!(out.status.success(), "discovering the Python models of {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr).trim());
    serde_json::from_slice(&out.stdout).map_err(|e| anyhow::anyhow!("quiver.discover printed something unexpected: {e}"))
}

/// Names that follow FROM or JOIN in `sql`, outside strings and comments.
pub fn referenced(sql: &str) -> Vec<String> {
    let words = identifiers(sql);
    let mut out = Vec::new();
    for w in words.windows(2) {
        let kw = w[0].to_ascii_uppercase();
        if (kw == "FROM" || kw == "JOIN") && !out.contains(&w[1]) {
            out.push(w[1].clone());
        }
    }
    out
}

/// The words and quoted names of `sql`, outside strings and comments (commas kept, so a word
/// after FROM is the first table only).
pub fn identifiers(sql: &str) -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    let cs: Vec<char> = sql.chars().collect();
    let mut i = 0;
    while i < cs.len() {
        let c = cs[i];
        if c == '\'' {
            i += 1;
            while i < cs.len() && !(cs[i] == '\'' && cs.get(i + 1) != Some(&'\'')) {
                i += if cs[i] == '\'' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '-' && cs.get(i + 1) == Some(&'-') {
            while i < cs.len() && cs[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && cs.get(i + 1) == Some(&'*') {
            i += 2;
            while i + 1 < cs.len() && !(cs[i] == '*' && cs[i + 1] == '/') {
                i += 1;
            }
            i += 2;
        } else if c == '"' {
            let start = i + 1;
            i += 1;
            while i < cs.len() && cs[i] != '"' {
                i += 1;
            }
            words.push(cs[start..i.min(cs.len())].iter().collect());
            i += 1;
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < cs.len() && (cs[i].is_alphanumeric() || cs[i] == '_' || cs[i] == '.') {
                i += 1;
            }
            words.push(cs[start..i].iter().collect());
        } else {
            if c == ',' || c == '*' {
                words.push(c.into());
            }
            i += 1;
        }
    }
    words
}

/// The columns of `source` that `models` (the SQL of the models reading it) can use: every word
/// of theirs that names one of its columns, or all of them when one selects `*`. Reading only
/// these is what DuckDB's own projection pushdown would do.
pub fn used_columns(schema_columns: &[String], models: &[&str]) -> Option<Vec<String>> {
    let mut used = std::collections::BTreeSet::new();
    for sql in models {
        let words = identifiers(sql);
        for (i, w) in words.iter().enumerate() {
            if w == "*" {
                let prev = i.checked_sub(1).map(|p| words[p].to_ascii_lowercase()).unwrap_or_default();
                // `SELECT *`, `DISTINCT *`, `a, *`, `t.*`: a star projection, not a product or count(*).
                if matches!(prev.as_str(), "select" | "distinct" | "all" | ",") || prev.ends_with('.') {
                    return None;
                }
            }
            let name = w.rsplit('.').next().unwrap_or(w);
            if let Some(c) = schema_columns.iter().find(|c| c.eq_ignore_ascii_case(name)) {
                used.insert(c.clone());
            }
        }
    }
    // Keep the file's column order.
    Some(schema_columns.iter().filter(|c| used.contains(*c)).cloned().collect())
}

/// Column names of the first Parquet file of `path`, if it can be read.
fn parquet_columns(path: &Path) -> Option<Vec<String>> {
    let first = crate::worker::parquet_files(path).ok()?.into_iter().next()?;
    let f = std::fs::File::open(first).ok()?;
    let b = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f).ok()?;
    Some(b.schema().fields().iter().map(|f| f.name().clone()).collect())
}

#[cfg(test)]
mod tests {
    use super::{referenced, used_columns};

    #[test]
    fn used_columns_are_the_named_ones_unless_a_star_selects_all() {
        let cols: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let got = used_columns(&cols, &["SELECT t.b, count(*), a * 2 FROM src t WHERE \"D\" > 1"]);
        assert_eq!(got, Some(vec!["a".into(), "b".into(), "d".into()]));
        assert_eq!(used_columns(&cols, &["SELECT * FROM src"]), None);
        assert_eq!(used_columns(&cols, &["SELECT x.*, 1 FROM src x"]), None);
        assert_eq!(used_columns(&cols, &["SELECT a FROM src", "SELECT DISTINCT * FROM src"]), None);
    }

    #[test]
    fn finds_parents_in_from_and_join_only() {
        let sql = "WITH x AS (SELECT * FROM a) -- FROM hidden\nSELECT 'FROM b', * FROM x JOIN \"c\" USING (k) /* JOIN d */ LEFT JOIN e ON true";
        assert_eq!(referenced(sql), vec!["a", "x", "c", "e"]);
    }
}

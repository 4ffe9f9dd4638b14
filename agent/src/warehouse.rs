//! The warehouse: one folder of Parquet files per table, published all at once when a run
//! succeeds, or not at all.
//!
//! `WAREHOUSE/TABLE` is a symlink to `WAREHOUSE/.versions/TABLE/RUN`. A run's materializations
//! are staged (written and synced) under `.staging/RUN/`; publishing builds each new version
//! folder (hard links of the old files for an append), writes and syncs a journal naming every
//! swap, swaps the symlinks with `rename`, and removes the journal. A reader resolves the
//! symlink once and sees one whole version. After a crash, `recover` redoes the swaps of any
//! complete journal and deletes staging folders without one, so a run is published whole or
//! not at all.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::plan::MaterializeMode;

/// One table a run writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Staged {
    /// Warehouse table.
    pub table: String,
    /// Replace or append.
    pub mode: MaterializeMode,
    /// Files written and synced.
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Journal {
    swaps: Vec<(String, String)>,
}

/// Why publishing failed.
#[derive(Debug, thiserror::Error)]
#[error("warehouse {step}: {source}")]
pub struct WarehouseError {
    step: String,
    #[source]
    source: std::io::Error,
}

fn io<T>(step: impl Into<String>, r: std::io::Result<T>) -> Result<T, WarehouseError> {
    r.map_err(|source| WarehouseError { step: step.into(), source })
}

fn sync_dir(p: &Path) -> Result<(), WarehouseError> {
    io(format!("syncing {}", p.display()), fs::File::open(p).and_then(|d| d.sync_all()))
}

/// Where run `run` stages the files of node `node`.
pub fn staging(root: &Path, run: &str, node: &str) -> PathBuf {
    root.join(".staging").join(run).join(node)
}

/// The folder a table currently resolves to.
pub fn current(root: &Path, table: &str) -> Option<PathBuf> {
    let link = root.join(table);
    fs::read_link(&link).ok().map(|t| root.join(t))
}

/// Publishes a run's materializations together.
pub fn publish(root: &Path, run: &str, items: &[Staged]) -> Result<(), WarehouseError> {
    if items.is_empty() {
        return Ok(());
    }
    // Run ids restart with the agent; the clock keeps version folders apart.
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let version = format!("{run}-{stamp}");
    let mut swaps = Vec::new();
    for it in items {
        let rel = PathBuf::from(".versions").join(&it.table).join(&version);
        let dir = root.join(&rel);
        io(format!("creating {}", dir.display()), fs::create_dir_all(&dir))?;
        if it.mode == MaterializeMode::Append
            && let Some(old) = current(root, &it.table)
        {
            for e in io(format!("listing {}", old.display()), fs::read_dir(&old))? {
                let e = io("listing", e)?;
                let to = dir.join(e.file_name());
                if !to.exists() {
                    io(format!("linking {}", to.display()), fs::hard_link(e.path(), &to))?;
                }
            }
        }
        for (i, f) in it.files.iter().enumerate() {
            let to = dir.join(format!("{run}-{i}.parquet"));
            io(format!("moving {} into place", f.display()), fs::rename(f, &to))?;
        }
        sync_dir(&dir)?;
        swaps.push((it.table.clone(), rel.to_string_lossy().into_owned()));
    }
    let jdir = root.join(".staging").join(run);
    io("creating the staging folder", fs::create_dir_all(&jdir))?;
    let journal = jdir.join("publish.json");
    let tmp = jdir.join("publish.json.tmp");
    let text = serde_json::to_vec(&Journal { swaps }).map_err(|e| WarehouseError { step: "journal".into(), source: e.into() })?;
    io("writing the journal", fs::write(&tmp, text).and_then(|_| fs::File::open(&tmp)?.sync_all()))?;
    io("committing the journal", fs::rename(&tmp, &journal))?;
    sync_dir(&jdir)?;
    roll_forward(root, &journal)
}

fn roll_forward(root: &Path, journal: &Path) -> Result<(), WarehouseError> {
    let text = io("reading the journal", fs::read(journal))?;
    let j: Journal = serde_json::from_slice(&text).map_err(|e| WarehouseError { step: "parsing the journal".into(), source: e.into() })?;
    for (table, rel) in &j.swaps {
        let link = root.join(table);
        if link.exists() && fs::symlink_metadata(&link).is_ok_and(|m| !m.file_type().is_symlink()) {
            return Err(WarehouseError {
                step: format!("publishing {table}"),
                source: std::io::Error::other(format!("{} is not a quiver table (not a symlink)", link.display())),
            });
        }
        let tmp = root.join(format!(".{table}.swap"));
        let _ = fs::remove_file(&tmp);
        io(format!("linking {table}"), std::os::unix::fs::symlink(rel, &tmp))?;
        io(format!("publishing {table}"), fs::rename(&tmp, &link))?;
    }
    sync_dir(root)?;
    let run_dir = journal.parent().map(Path::to_path_buf);
    io("removing the journal", fs::remove_file(journal))?;
    if let Some(d) = run_dir {
        let _ = fs::remove_dir_all(d);
    }
    for (table, _) in &j.swaps {
        prune(root, table);
    }
    Ok(())
}

/// Keeps the current and the previous version of a table (a reader may still be listing it).
fn prune(root: &Path, table: &str) {
    let vdir = root.join(".versions").join(table);
    let Some(cur) = current(root, table) else { return };
    let Ok(entries) = fs::read_dir(&vdir) else { return };
    let mut others: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| *p != cur)
        .filter_map(|p| fs::metadata(&p).and_then(|m| m.modified()).ok().map(|t| (t, p)))
        .collect();
    others.sort();
    others.pop();
    for (_, p) in others {
        let _ = fs::remove_dir_all(p);
    }
}

/// Finishes or discards what a crash interrupted: complete journals are rolled forward,
/// staging folders without one are deleted.
pub fn recover(root: &Path) -> Result<(), WarehouseError> {
    io(format!("creating {}", root.display()), fs::create_dir_all(root))?;
    let staging = root.join(".staging");
    let Ok(runs) = fs::read_dir(&staging) else { return Ok(()) };
    for r in runs.flatten() {
        let journal = r.path().join("publish.json");
        if journal.exists() {
            roll_forward(root, &journal)?;
        } else {
            let _ = fs::remove_dir_all(r.path());
        }
    }
    Ok(())
}

/// Discards a run's staged files.
pub fn discard(root: &Path, run: &str) {
    let _ = fs::remove_dir_all(root.join(".staging").join(run));
}

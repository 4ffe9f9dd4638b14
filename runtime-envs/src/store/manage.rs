//! Reading, listing and removing environments.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::error::io;
use super::{Env, Manifest, STAGING, Store, StoreError, is_key};

/// Which environments `gc` removes: those outside the `keep` most recently used that were
/// last used more than `older_than` ago (a `None` field does not protect anything).
#[derive(Clone, Copy, Debug, Default)]
pub struct GcPolicy {
    /// How many of the most recently used environments to keep regardless of age.
    pub keep: Option<usize>,
    /// Remove only environments unused for longer than this.
    pub older_than: Option<Duration>,
}

impl Store {
    /// The environment with this key.
    pub fn get(&self, key: &str) -> Result<Env, StoreError> {
        if !is_key(key) {
            return Err(StoreError::NotFound(key.to_string()));
        }
        let path = self.opts.root.join(key);
        let manifest_path = path.join("env.json");
        let text = match std::fs::read(&manifest_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StoreError::NotFound(key.to_string())),
            Err(e) => return Err(StoreError::Io { context: format!("reading {}", manifest_path.display()), source: e }),
        };
        let m: Manifest = serde_json::from_slice(&text)
            .map_err(|source| StoreError::Manifest { path: manifest_path.clone(), source })?;
        let minor: String = m.python_version.split('.').take(2).collect::<Vec<_>>().join(".");
        Ok(Env {
            key: m.key,
            python: path.join("bin/python"),
            site_packages: path.join(format!("lib/python{minor}/site-packages")),
            path,
            python_version: m.python_version,
            base_prefix: m.base_prefix,
            spec: m.spec,
            lock: m.lock,
        })
    }

    /// When the environment was last returned by `ensure` (its build time if never).
    pub fn last_used(&self, key: &str) -> Option<SystemTime> {
        let used = self.opts.root.join(".used").join(key);
        std::fs::metadata(used)
            .and_then(|m| m.modified())
            .ok()
            .or_else(|| std::fs::metadata(self.opts.root.join(key).join("env.json")).and_then(|m| m.modified()).ok())
    }

    /// Every complete environment, most recently used first.
    pub fn list(&self) -> Result<Vec<Env>, StoreError> {
        let root = &self.opts.root;
        let mut envs: Vec<(SystemTime, Env)> = Vec::new();
        for entry in std::fs::read_dir(root).map_err(io(|| format!("listing {}", root.display())))? {
            let entry = entry.map_err(io(|| format!("listing {}", root.display())))?;
            let name = entry.file_name();
            let Some(name) = name.to_str().filter(|n| is_key(n)) else { continue };
            match self.get(name) {
                Ok(env) => envs.push((self.last_used(name).unwrap_or(UNIX_EPOCH), env)),
                // Removed between read_dir and get.
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        envs.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.key.cmp(&b.1.key)));
        Ok(envs.into_iter().map(|(_, e)| e).collect())
    }

    /// Removes an environment (after any build of the same key finishes). Processes already
    /// running in it keep their open files; new lookups no longer find it.
    pub fn remove(&self, key: &str) -> Result<(), StoreError> {
        if !is_key(key) {
            return Err(StoreError::NotFound(key.to_string()));
        }
        let _guard = self.lock(&format!("env-{key}"), &mut || {})?;
        let root = &self.opts.root;
        let dir = root.join(key);
        if !dir.exists() {
            return Err(StoreError::NotFound(key.to_string()));
        }
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let trash = root.join(format!(".trash-{key}-{}-{nanos}", std::process::id()));
        std::fs::rename(&dir, &trash).map_err(io(|| format!("moving {} aside", dir.display())))?;
        let _ = std::fs::remove_file(root.join(".used").join(key));
        std::fs::remove_dir_all(&trash).map_err(io(|| format!("removing {}", trash.display())))
    }

    /// Removes the environments `policy` selects, crashed builds' leftovers and resolutions
    /// pointing at removed environments; returns the removed keys.
    pub fn gc(&self, policy: GcPolicy) -> Result<Vec<String>, StoreError> {
        let now = SystemTime::now();
        let mut removed = Vec::new();
        for (i, env) in self.list()?.into_iter().enumerate() {
            if policy.keep.is_some_and(|k| i < k) {
                continue;
            }
            if let Some(age) = policy.older_than {
                let used = self.last_used(&env.key).unwrap_or(UNIX_EPOCH);
                if now.duration_since(used).unwrap_or_default() < age {
                    continue;
                }
            }
            match self.remove(&env.key) {
                Ok(()) => removed.push(env.key),
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.remove_leftovers();
        self.prune_resolutions();
        Ok(removed)
    }

    /// Removes leftovers of crashed work: `.trash-*` folders (already unreachable) and
    /// `.staging-*` folders older than any build takes (a live build's folder is younger).
    fn remove_leftovers(&self) {
        const STALE: Duration = Duration::from_secs(3600);
        let Ok(entries) = std::fs::read_dir(&self.opts.root) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let stale = || {
                entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().unwrap_or_default() > STALE)
            };
            if name.starts_with(".trash-") || (name.starts_with(STAGING) && stale()) {
                // Another process removing the same folder makes this fail; either way it goes.
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    /// Drops cached resolutions whose environment is gone.
    fn prune_resolutions(&self) {
        let dir = self.opts.root.join(".resolved");
        let Ok(entries) = std::fs::read_dir(&dir) else { return };
        for entry in entries.flatten() {
            let key = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let key = key.trim();
            if !is_key(key) || !Path::new(&self.opts.root.join(key)).exists() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

//! Resolving a spec into a lock and building a lock into an environment.

use std::ffi::OsString;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use super::error::io;
use super::python::Interpreter;
use super::{EnvSpec, Manifest, Progress, Store, StoreError, uv, write_atomic};

impl Store {
    /// Where packages come from: only the wheel folder offline, else the index.
    fn source_args(&self) -> Vec<OsString> {
        match (&self.opts.wheels, &self.opts.index_url) {
            (Some(w), _) => vec!["--no-index".into(), "--find-links".into(), w.into()],
            (None, Some(u)) => vec!["--index-url".into(), u.into()],
            (None, None) => Vec::new(),
        }
    }

    /// Resolves requirement lines for `interp` into a lock: `name==version` per line, sorted,
    /// so equal inputs against an unchanged index give equal text.
    pub(super) fn resolve(&self, uv: &Path, interp: &Interpreter, reqs: &[String]) -> Result<String, StoreError> {
        let mut cmd = uv::command(uv, &self.opts.cache, &["pip", "compile", "-"]);
        cmd.arg("--python").arg(&interp.path).args(["--no-header", "--no-annotate", "--quiet"]);
        cmd.args(self.source_args());
        let input = reqs.join("\n") + "\n";
        let out = uv::run(cmd, Some(&input), StoreError::Resolve)?;
        let mut lines: Vec<&str> = out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('-'))
            .collect();
        lines.sort_unstable();
        Ok(lines.iter().map(|l| format!("{l}\n")).collect())
    }

    /// Creates an empty relocatable venv (entry points survive the rename into place).
    pub(super) fn create_venv(&self, uv: &Path, interp: &Interpreter, venv: &Path) -> Result<(), StoreError> {
        let mut cmd = uv::command(uv, &self.opts.cache, &["venv", "--relocatable", "--no-project", "--quiet"]);
        cmd.arg("--python").arg(&interp.path).arg(venv);
        uv::run(cmd, None, |message| StoreError::Build { step: "creating the venv", message }).map(drop)
    }

    /// Installs `lock` into the venv `staging/env`, writes its manifest and renames it to
    /// `root/KEY`. The caller holds the key's lock and drops `staging` afterwards, so on any
    /// failure nothing appears under the key.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn install(
        &self,
        uv: &Path,
        interp: &Interpreter,
        staging: &Path,
        key: &str,
        lock: &str,
        reqs: &[String],
        spec: &EnvSpec,
        progress: &dyn Fn(Progress),
    ) -> Result<(), StoreError> {
        let venv = staging.join("env");
        let lock_file = staging.join("requirements.txt");
        std::fs::write(&lock_file, lock).map_err(io(|| format!("writing {}", lock_file.display())))?;
        progress(Progress::Installing { packages: lock.lines().count() });
        let sync = |offline: bool| {
            let mut cmd = uv::command(uv, &self.opts.cache, &["pip", "sync", "--quiet"]);
            cmd.arg("--python").arg(venv.join("bin/python")).args(self.source_args()).arg(&lock_file);
            if offline {
                cmd.arg("--offline");
            }
            uv::run(cmd, None, |message| StoreError::Build { step: "installing packages", message })
        };
        // The resolution just revalidated the index page of every package in the lock, so
        // the cache's view is current: installing from it alone skips a second round of
        // requests. A wheel the cache lacks fails that attempt at once, before anything is
        // installed, and the online one fetches it.
        if self.opts.wheels.is_some() || sync(true).is_err() {
            sync(false)?;
        }

        let manifest = Manifest {
            key: key.to_string(),
            python_version: interp.version.clone(),
            interpreter: interp.path.clone(),
            base_prefix: interp.base_prefix.clone(),
            spec: spec.clone(),
            requirements: reqs.to_vec(),
            lock: lock.to_string(),
            created_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        };
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| StoreError::Io {
            context: "encoding env.json".to_string(),
            source: e.into(),
        })?;
        write_atomic(&venv.join("env.json"), &json)?;
        let dest = self.opts.root.join(key);
        std::fs::rename(&venv, &dest)
            .map_err(io(|| format!("moving {} to {}", venv.display(), dest.display())))?;
        Ok(())
    }
}

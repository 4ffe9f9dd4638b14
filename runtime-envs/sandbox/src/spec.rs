use std::path::{Component, Path, PathBuf};

use nix::sys::resource::{Resource, setrlimit};
use serde::{Deserialize, Serialize};

use crate::error::{Result, SandboxError};

/// What a confined process may see and use.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    /// An empty directory the new root is built on (inside the new mount namespace only).
    pub root: PathBuf,
    /// Host paths visible inside, read-only unless marked writable.
    pub binds: Vec<Bind>,
    /// Size of the private `/tmp` (tmpfs) in bytes.
    pub tmp_bytes: u64,
    /// The unprivileged uid to run as (never 0).
    pub uid: u32,
    /// The unprivileged gid to run as (never 0).
    pub gid: u32,
    /// Host name inside the uts namespace.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// Resource limits.
    #[serde(default)]
    pub limits: Limits,
    /// File descriptors that stay open (the connection to the agent, log files); the rest
    /// beyond 0-2 are closed.
    #[serde(default)]
    pub keep_fds: Vec<i32>,
    /// Internet access: sockets of the inet families are allowed (the caller then also keeps
    /// the host network namespace).
    #[serde(default)]
    pub network: bool,
    /// The working directory inside.
    #[serde(default = "default_workdir")]
    pub workdir: PathBuf,
}

fn default_hostname() -> String {
    "quiver".into()
}

fn default_workdir() -> PathBuf {
    "/tmp".into()
}

/// A host path made visible inside the sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bind {
    /// The host path (a symlink is recreated as a symlink).
    pub src: PathBuf,
    /// Where it appears inside (the same path when absent).
    #[serde(default)]
    pub dst: Option<PathBuf>,
    /// Writable (a materialization's staging folder); read-only otherwise.
    #[serde(default)]
    pub writable: bool,
}

impl Bind {
    /// A read-only bind at the same path.
    pub fn ro(src: impl Into<PathBuf>) -> Bind {
        Bind { src: src.into(), dst: None, writable: false }
    }

    /// The path inside the sandbox.
    pub fn target(&self) -> &Path {
        self.dst.as_deref().unwrap_or(&self.src)
    }
}

/// rlimits of a confined process.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Limits {
    /// RLIMIT_NOFILE.
    pub open_files: u64,
    /// RLIMIT_NPROC (per uid; the pids cgroup is the real bound).
    pub processes: u64,
    /// RLIMIT_FSIZE in bytes.
    pub file_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { open_files: 4096, processes: 4096, file_size: 16 << 30 }
    }
}

impl Limits {
    pub(crate) fn apply(&self) -> Result<()> {
        let set = |r: Resource, v: u64, name: &str| setrlimit(r, v, v).map_err(|e| SandboxError::sys(format!("setrlimit {name}"), e));
        set(Resource::RLIMIT_NOFILE, self.open_files, "NOFILE")?;
        set(Resource::RLIMIT_NPROC, self.processes, "NPROC")?;
        set(Resource::RLIMIT_FSIZE, self.file_size, "FSIZE")?;
        set(Resource::RLIMIT_CORE, 0, "CORE")
    }
}

impl Spec {
    /// Refuses what would undo the sandbox: relative paths, `..`, binds over the special
    /// folders, uid or gid 0.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(SandboxError::Spec(m));
        if self.uid == 0 || self.gid == 0 {
            return bad("uid and gid must not be 0".into());
        }
        check_path(&self.root, "root")?;
        check_path(&self.workdir, "workdir")?;
        for b in &self.binds {
            check_path(&b.src, "bind source")?;
            let t = b.target();
            check_path(t, "bind target")?;
            if t == Path::new("/") || t == Path::new("/tmp") || ["/proc", "/dev"].iter().any(|s| t.starts_with(s)) {
                return bad(format!("bind target {} would cover a folder the sandbox provides", t.display()));
            }
        }
        if self.hostname.is_empty() || self.hostname.len() > 64 {
            return bad("hostname must be 1 to 64 bytes".into());
        }
        Ok(())
    }
}

fn check_path(p: &Path, what: &str) -> Result<()> {
    if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(SandboxError::Spec(format!("{what} {} must be absolute, without `..`", p.display())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        serde_json::from_value(serde_json::json!({
            "root": "/run/quiver/sandbox", "binds": [{"src": "/usr"}], "tmp_bytes": 1048576, "uid": 65534, "gid": 65534
        }))
        .expect("spec")
    }

    #[test]
    fn a_plain_spec_is_valid() {
        spec().validate().expect("valid");
    }

    #[test]
    fn what_would_undo_the_sandbox_is_refused() {
        let mut s = spec();
        s.uid = 0;
        assert!(s.validate().is_err(), "uid 0");
        for bad in ["usr", "/usr/../etc", "/", "/proc/1", "/dev", "/tmp"] {
            let mut s = spec();
            s.binds = vec![Bind::ro(bad)];
            assert!(s.validate().is_err(), "bind {bad}");
        }
        let mut s = spec();
        s.binds = vec![Bind::ro("/tmp/project")];
        s.validate().expect("a folder below /tmp is bound inside the private /tmp");
        let mut s = spec();
        s.hostname = String::new();
        assert!(s.validate().is_err(), "empty hostname");
    }
}

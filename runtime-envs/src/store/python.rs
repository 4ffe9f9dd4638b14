//! Finding the local CPython interpreters an environment can be built on. Nothing is
//! downloaded: a spec asking for a version that is not installed fails, naming what is.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A local CPython installation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interpreter {
    /// The interpreter binary.
    pub path: PathBuf,
    /// Its full version, `3.11.7`.
    pub version: String,
    /// `sys.base_prefix`: the installation a venv built on it uses.
    pub base_prefix: PathBuf,
}

impl Interpreter {
    fn parts(&self) -> Vec<u32> {
        self.version.split('.').filter_map(|p| p.parse().ok()).collect()
    }

    /// Whether this interpreter is the version a spec asks for (`3.11` takes any 3.11.x).
    pub fn matches(&self, wanted: &[u32]) -> bool {
        self.parts().starts_with(wanted)
    }
}

/// The places interpreters are looked for, in order of preference: pyenv's installations
/// (self-contained prefixes, which a sandbox can mount on their own), then the system's.
fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let pyenv = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pyenv")));
    if let Some(root) = pyenv {
        let mut versions: Vec<PathBuf> = std::fs::read_dir(root.join("versions"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin/python3"))
            .filter(|p| p.is_file())
            .collect();
        versions.sort();
        out.extend(versions);
    }
    for dir in ["/usr/local/bin", "/usr/bin"] {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.strip_prefix("python3.")
                    .is_some_and(|minor| !minor.is_empty() && minor.bytes().all(|b| b.is_ascii_digit()))
            })
            .map(|e| e.path())
            .collect();
        found.sort();
        out.extend(found);
    }
    out
}

/// Asks an interpreter what it is; `None` if it does not run or is not CPython 3.
fn inspect(path: &Path) -> Option<Interpreter> {
    const PROBE: &str = "import sys, platform\n\
        print(platform.python_implementation())\n\
        print('.'.join(map(str, sys.version_info[:3])))\n\
        print(sys.base_prefix)";
    let out = Command::new(path).args(["-I", "-S", "-c", PROBE]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let mut lines = text.lines();
    if lines.next()? != "CPython" {
        return None;
    }
    let version = lines.next()?.to_string();
    let base_prefix = PathBuf::from(lines.next()?);
    version.starts_with("3.").then(|| Interpreter { path: path.to_path_buf(), version, base_prefix })
}

/// The version a candidate's path announces (`versions/3.11.7/bin/python3`, `python3.11`).
fn version_hint(path: &Path) -> Option<Vec<u32>> {
    let name = path.file_name()?.to_str()?;
    let text = match name.strip_prefix("python") {
        Some(v) if v.contains('.') => v,
        _ => path.parent()?.parent()?.file_name()?.to_str()?,
    };
    text.split('.').map(|p| p.parse().ok()).collect()
}

/// Every usable interpreter among `paths` (or the default places), probed in parallel, one per
/// real file, in order of preference. With `wanted`, candidates whose path names another
/// version are not probed (each probe starts an interpreter).
pub fn discover(paths: Option<&[PathBuf]>, wanted: Option<&[u32]>) -> Vec<Interpreter> {
    let paths = paths.map(<[PathBuf]>::to_vec).unwrap_or_else(candidates);
    let mut seen = std::collections::HashSet::new();
    let paths: Vec<PathBuf> = paths
        .into_iter()
        .filter(|p| match (wanted, version_hint(p)) {
            (Some(w), Some(h)) => h.starts_with(w) || w.starts_with(&h),
            _ => true,
        })
        .filter(|p| seen.insert(std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())))
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = paths.iter().map(|p| s.spawn(move || inspect(p))).collect();
        handles.into_iter().filter_map(|h| h.join().ok().flatten()).collect()
    })
}

/// The interpreter for a requested version: the highest matching release, the first found on
/// a tie.
pub fn choose<'a>(all: &'a [Interpreter], wanted: &[u32]) -> Option<&'a Interpreter> {
    let mut best: Option<&Interpreter> = None;
    for i in all.iter().filter(|i| i.matches(wanted)) {
        if best.is_none_or(|b| i.parts() > b.parts()) {
            best = Some(i);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_announce_versions() {
        assert_eq!(version_hint(Path::new("/root/.pyenv/versions/3.11.7/bin/python3")), Some(vec![3, 11, 7]));
        assert_eq!(version_hint(Path::new("/usr/bin/python3.12")), Some(vec![3, 12]));
        assert_eq!(version_hint(Path::new("/root/.pyenv/versions/miniconda3/bin/python3")), None);
        assert_eq!(version_hint(Path::new("/usr/bin/python3")), None);
    }
}

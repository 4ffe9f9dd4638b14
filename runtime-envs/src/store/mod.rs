//! The environment store: specs resolved with uv into a lock, built once into
//! `root/KEY` (KEY hashes the interpreter's version and the lock), packages hard-linked from one
//! shared uv cache.
//!
//! Layout under `root`: `KEY/` (a relocatable venv plus `env.json`), `.resolved/SPEC` (the key
//! a spec resolved to, so a known spec is a lookup), `.used/KEY` (its mtime is the last use),
//! `.locks/NAME` (flock files), `.staging-*` and `.trash-KEY-*` (builds and removals under way;
//! an environment appears and disappears by one rename).

mod build;
mod error;
mod lock;
mod manage;
pub mod python;
mod spec;
pub mod uv;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use error::StoreError;
pub use manage::GcPolicy;
pub use spec::EnvSpec;

use error::io;
use lock::{Guard, Locks, Wait};
use python::Interpreter;

/// Where and how the store builds environments.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// The folder environments live in.
    pub root: PathBuf,
    /// uv's cache, shared by every environment; on the same file system as `root` so installs
    /// are hard links.
    pub cache: PathBuf,
    /// The uv binary; `None` finds it (see [`uv::find_uv`]).
    pub uv: Option<PathBuf>,
    /// Offline mode: install only from the wheels in this folder, nothing from the network.
    pub wheels: Option<PathBuf>,
    /// The package index to use instead of uv's default (ignored in offline mode).
    pub index_url: Option<String>,
    /// Packages every environment gets (the function harness needs pyarrow).
    pub base: BTreeMap<String, String>,
    /// The interpreters to choose from; `None` looks in pyenv's and the system's folders.
    pub interpreters: Option<Vec<PathBuf>>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            root: PathBuf::from("/var/lib/quiver/envs"),
            cache: PathBuf::from("/var/cache/quiver/uv"),
            uv: None,
            wheels: None,
            index_url: None,
            base: [("pyarrow".to_string(), String::new())].into(),
            interpreters: None,
        }
    }
}

/// The phase of a build, reported to `ensure`'s callback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Another caller is resolving or building the same spec; this one waits for its result.
    Waiting,
    /// uv is resolving the requirements into a lock while a venv is created beside it.
    Resolving {
        /// The chosen interpreter's full version.
        python: String,
    },
    /// Installing the lock's packages.
    Installing {
        /// How many packages the lock pins.
        packages: usize,
    },
}

/// A built environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Env {
    /// Its content key: a hash of the interpreter version and the lock.
    pub key: String,
    /// The venv's root.
    pub path: PathBuf,
    /// `bin/python` in the venv.
    pub python: PathBuf,
    /// The interpreter's full version, `3.11.7`.
    pub python_version: String,
    /// The interpreter installation (`sys.base_prefix`), which a venv needs readable.
    pub base_prefix: PathBuf,
    /// The venv's `site-packages`.
    pub site_packages: PathBuf,
    /// The spec: the caller's for `ensure`, the one that built it otherwise.
    pub spec: EnvSpec,
    /// The resolved lock, one `name==version` per line.
    pub lock: String,
}

/// `env.json`, written into each environment before it is renamed into place.
#[derive(Serialize, Deserialize)]
struct Manifest {
    key: String,
    python_version: String,
    interpreter: PathBuf,
    base_prefix: PathBuf,
    spec: EnvSpec,
    requirements: Vec<String>,
    lock: String,
    created_unix: u64,
}

/// The prefix of build folders in the root (`.staging-XXXXXX`).
const STAGING: &str = ".staging-";

/// Length of a key in hex digits (96 bits).
const KEY_LEN: usize = 24;

fn hash_hex(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    h.finalize().iter().take(KEY_LEN / 2).map(|b| format!("{b:02x}")).collect()
}

/// Whether `s` has the shape of a key (and so is safe to join onto `root`).
fn is_key(s: &str) -> bool {
    s.len() == KEY_LEN && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The environment store. Cheap to share between threads (`&Store` is enough).
pub struct Store {
    opts: StoreOptions,
    uv: Option<PathBuf>,
    locks: Arc<Locks>,
    /// The interpreter chosen for each requested version.
    interpreters: Mutex<HashMap<Vec<u32>, Interpreter>>,
}

impl Store {
    /// Opens (creating if needed) a store.
    pub fn open(opts: StoreOptions) -> Result<Store, StoreError> {
        for dir in [
            opts.root.clone(),
            opts.root.join(".locks"),
            opts.root.join(".resolved"),
            opts.root.join(".used"),
            opts.cache.clone(),
        ] {
            std::fs::create_dir_all(&dir).map_err(io(|| format!("creating {}", dir.display())))?;
        }
        let uv = opts.uv.clone().or_else(uv::find_uv);
        Ok(Store { opts, uv, locks: Arc::default(), interpreters: Mutex::default() })
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }

    /// The uv binary the store runs, if one was found.
    pub fn uv_path(&self) -> Option<&Path> {
        self.uv.as_deref()
    }

    /// Resolves `spec` (plus the base packages) and returns its environment, building it if
    /// no environment has the resolved lock yet. A spec resolved before is a lookup. Concurrent
    /// calls for one spec, in this process or others, build it once.
    pub fn ensure(&self, spec: &EnvSpec, progress: &dyn Fn(Progress)) -> Result<Env, StoreError> {
        let wanted = spec::validate_python(&spec.python)?;
        let reqs = spec::requirements(&spec.pip, &self.opts.base)?;
        let spec_hash = self.spec_hash(&spec.python, &reqs);
        if let Some(env) = self.lookup(&spec_hash, spec) {
            return Ok(env);
        }
        let uv = self.uv.as_deref().ok_or(StoreError::UvNotFound)?;
        let _spec_guard = self.lock(&format!("spec-{spec_hash}"), &mut || progress(Progress::Waiting))?;
        if let Some(env) = self.lookup(&spec_hash, spec) {
            return Ok(env);
        }
        let interp = self.interpreter(&spec.python, &wanted)?;
        progress(Progress::Resolving { python: interp.version.clone() });
        // A venv does not depend on the lock: create it while uv resolves, in a staging folder
        // that is dropped (with the venv) on any failure or if the key exists already.
        let root = &self.opts.root;
        let staging = tempfile::Builder::new()
            .prefix(STAGING)
            .tempdir_in(root)
            .map_err(io(|| format!("creating a staging folder in {}", root.display())))?;
        let venv = staging.path().join("env");
        let (lock, venv_made) = std::thread::scope(|s| {
            let maker = s.spawn(|| self.create_venv(uv, &interp, &venv));
            let lock = self.resolve(uv, &interp, &reqs);
            (lock, maker.join())
        });
        let lock = lock?;
        let key = hash_hex(&["quiver-env-v1", "CPython", &interp.version, &lock]);
        {
            let _key_guard = self.lock(&format!("env-{key}"), &mut || progress(Progress::Waiting))?;
            if self.get(&key).is_err() {
                venv_made.unwrap_or_else(|_| {
                    Err(StoreError::Build { step: "creating the venv", message: "the thread creating it panicked".into() })
                })?;
                self.install(uv, &interp, staging.path(), &key, &lock, &reqs, spec, progress)?;
            }
        }
        drop(staging);
        let resolved = self.opts.root.join(".resolved").join(&spec_hash);
        write_atomic(&resolved, key.as_bytes())?;
        self.touch(&key);
        let mut env = self.get(&key)?;
        env.spec = spec.clone();
        Ok(env)
    }

    /// A hash of everything resolution depends on besides the index's contents.
    fn spec_hash(&self, python: &str, reqs: &[String]) -> String {
        let wheels = self.opts.wheels.as_ref().map(|w| w.to_string_lossy().into_owned());
        let source = match (&wheels, &self.opts.index_url) {
            (Some(w), _) => format!("wheels:{w}"),
            (None, Some(u)) => format!("index:{u}"),
            (None, None) => "default".to_string(),
        };
        let joined = reqs.join("\n");
        hash_hex(&["quiver-spec-v1", python, &source, &joined])
    }

    /// The environment a spec resolved to before, if it is still complete and its interpreter
    /// still there. A missing environment is never rebuilt from this cached resolution: the
    /// caller resolves afresh, so a build that would now fail says so.
    fn lookup(&self, spec_hash: &str, spec: &EnvSpec) -> Option<Env> {
        let key = std::fs::read_to_string(self.opts.root.join(".resolved").join(spec_hash)).ok()?;
        let key = key.trim();
        if !is_key(key) {
            return None;
        }
        let mut env = self.get(key).ok()?;
        if !env.python.exists() {
            return None;
        }
        self.touch(key);
        env.spec = spec.clone();
        Some(env)
    }

    fn lock(&self, name: &str, contended: &mut dyn FnMut()) -> Result<Guard, StoreError> {
        self.locks
            .acquire(&self.opts.root.join(".locks"), name, Wait::Block, contended)?
            .ok_or_else(|| StoreError::Io {
                context: format!("locking {name}"),
                source: std::io::Error::other("a blocking lock returned without the lock"),
            })
    }

    /// The interpreter for a requested version, found once per store (an interpreter
    /// installed later is found by the next store).
    fn interpreter(&self, requested: &str, wanted: &[u32]) -> Result<Interpreter, StoreError> {
        let mut chosen = self.interpreters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = chosen.get(wanted) {
            return Ok(i.clone());
        }
        let paths = self.opts.interpreters.as_deref();
        if let Some(i) = python::choose(&python::discover(paths, Some(wanted)), wanted) {
            chosen.insert(wanted.to_vec(), i.clone());
            return Ok(i.clone());
        }
        let available = python::discover(paths, None)
            .iter()
            .map(|i| format!("{} ({})", i.version, i.path.display()))
            .collect();
        Err(StoreError::PythonNotFound { requested: requested.to_string(), available })
    }

    /// Records a use of `key` (best effort: a read-only store still serves lookups).
    fn touch(&self, key: &str) {
        let path = self.opts.root.join(".used").join(key);
        if let Ok(f) = std::fs::File::options().create(true).truncate(false).write(true).open(path) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }
}

/// Writes a file by renaming a temporary one over it, so readers see all of it or none.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io(|| format!("creating a file in {}", dir.display())))?;
    std::io::Write::write_all(&mut tmp, bytes).map_err(io(|| format!("writing {}", path.display())))?;
    tmp.persist(path).map_err(|e| StoreError::Io { context: format!("writing {}", path.display()), source: e.error })?;
    Ok(())
}

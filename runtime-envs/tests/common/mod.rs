//! Helpers for the store's tests: small wheels built on the spot, and the uv/CI gate.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

use quiver_envs::store::{python, uv};
use quiver_envs::{Store, StoreOptions};

/// Whether a missing prerequisite fails the test rather than skipping it.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The uv binary and a Python version to build for, or `None` (after saying why) when the
/// machine lacks them outside CI.
pub fn prerequisites(test: &str) -> Option<(PathBuf, String)> {
    let missing = |what: &str| {
        if in_ci() {
            panic!("{test}: {what} (CI=true, so this fails instead of skipping); run scripts/setup");
        }
        eprintln!("skipping {test}: {what}; run scripts/setup");
        None
    };
    let Some(uv) = uv::find_uv() else { return missing("uv is not installed") };
    let interpreters = python::discover(None, None);
    let Some(first) = interpreters.first() else { return missing("no CPython 3 interpreter found") };
    let minor = first.version.split('.').take(2).collect::<Vec<_>>().join(".");
    Some((uv, minor))
}

/// Writes a pure-Python wheel `NAME-VERSION-py3-none-any.whl` into `dir`: a package whose
/// `VERSION` is its version, plus `Requires-Dist` lines for `deps`.
pub fn write_wheel(dir: &Path, name: &str, version: &str, deps: &[&str]) -> PathBuf {
    let path = dir.join(format!("{name}-{version}-py3-none-any.whl"));
    let info = format!("{name}-{version}.dist-info");
    let mut metadata = format!("Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n");
    for d in deps {
        metadata.push_str(&format!("Requires-Dist: {d}\n"));
    }
    // A body large enough that a copy and a hard link are told apart by inode, not by luck.
    let module = format!("VERSION = {version:?}\nPAYLOAD = {:?}\n", "x".repeat(4096));
    let files = [
        (format!("{name}/__init__.py"), module),
        (format!("{info}/METADATA"), metadata),
        (format!("{info}/WHEEL"), "Wheel-Version: 1.0\nGenerator: quiver-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n".to_string()),
    ];
    let mut record: String = files.iter().map(|(p, _)| format!("{p},,\n")).collect();
    record.push_str(&format!("{info}/RECORD,,\n"));
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).expect("create wheel"));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (p, body) in files.iter().chain(std::iter::once(&(format!("{info}/RECORD"), record))) {
        zip.start_file(p.as_str(), opts).expect("zip entry");
        zip.write_all(body.as_bytes()).expect("zip write");
    }
    zip.finish().expect("zip finish");
    path
}

/// A scratch store: root and uv cache in one temporary folder (one file system, so installs
/// are hard links), offline from `wheels`, no base packages.
pub struct Scratch {
    pub dir: tempfile::TempDir,
    pub wheels: PathBuf,
    pub python: String,
}

impl Scratch {
    pub fn new(test: &str) -> Option<Scratch> {
        let (_, python) = prerequisites(test)?;
        let dir = tempfile::tempdir().expect("tempdir");
        let wheels = dir.path().join("wheels");
        std::fs::create_dir(&wheels).expect("wheels dir");
        write_wheel(&wheels, "alpha", "1.0", &[]);
        write_wheel(&wheels, "alpha", "2.0", &[]);
        write_wheel(&wheels, "beta", "1.0", &["alpha>=2"]);
        Some(Scratch { dir, wheels, python })
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("envs")
    }

    pub fn options(&self) -> StoreOptions {
        StoreOptions {
            root: self.root(),
            cache: self.dir.path().join("cache"),
            wheels: Some(self.wheels.clone()),
            base: Default::default(),
            ..StoreOptions::default()
        }
    }

    pub fn store(&self) -> Store {
        Store::open(self.options()).expect("open store")
    }

    /// The names in the store's root, dot-folders included, sorted.
    pub fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root())
            .expect("read root")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// The entries that are environments (not the store's dot-folders).
    pub fn envs(&self) -> Vec<String> {
        self.entries().into_iter().filter(|e| !e.starts_with('.')).collect()
    }

    /// Whether a staging or trash folder is left.
    pub fn leftovers(&self) -> Vec<String> {
        self.entries().into_iter().filter(|e| e.starts_with(".staging-") || e.starts_with(".trash-")).collect()
    }
}

/// Runs `code` with the environment's interpreter; returns its stdout.
pub fn run_python(python: &Path, code: &str) -> String {
    let out = std::process::Command::new(python).args(["-c", code]).output().expect("run python");
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf8").trim().to_string()
}

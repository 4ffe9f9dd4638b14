//! Why telemetry cannot start ([`Unavailable`]) and why a watch failed ([`Error`]).

use std::io;
use std::path::PathBuf;

/// Telemetry cannot run on this machine or in this build; the message says why.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// The crate was built without its BPF object (no clang, no libbpf-dev, other arch).
    #[error("telemetry unavailable: this build has no BPF programs: {0}")]
    NotBuilt(&'static str),
    /// tracefs is not mounted and mounting it failed (not root?).
    #[error("telemetry unavailable: cannot mount tracefs at {path} (needs root): {source}")]
    Tracefs {
        /// Where tracefs was to be mounted.
        path: &'static str,
        /// The mount error.
        source: nix::Error,
    },
    /// The kernel refused the object or one of its maps (no CAP_BPF, BPF disabled).
    #[error("telemetry unavailable: loading the BPF object failed (needs root/CAP_BPF): {0}")]
    Load(#[source] aya::EbpfError),
    /// A program failed to load into, or attach to, the kernel.
    #[error("telemetry unavailable: {what}: {source}")]
    Program {
        /// Which program and step.
        what: String,
        /// aya's error, with the verifier log when there is one.
        source: aya::programs::ProgramError,
    },
    /// A program or map the loader expects is missing from the object.
    #[error("telemetry unavailable: the BPF object has no {0}")]
    Missing(&'static str),
    /// A map of the object has an unexpected type or layout.
    #[error("telemetry unavailable: map {name}: {source}")]
    Map {
        /// The map's name.
        name: &'static str,
        /// aya's error.
        source: aya::maps::MapError,
    },
    /// glibc's copy routines could not be located for the copy meter.
    #[error("telemetry unavailable: cannot locate glibc's memcpy implementation: {0}")]
    Libc(String),
}

/// A watch could not be set up, read or released.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The path could not be opened or inspected.
    #[error("{path}: {source}")]
    Io {
        /// The cgroup directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The path is not a directory of a cgroup v2 hierarchy.
    #[error("{0}: not a cgroup v2 directory")]
    NotCgroup2(PathBuf),
    /// The cgroup is already watched by this telemetry.
    #[error("{0}: cgroup is already watched")]
    AlreadyWatched(PathBuf),
    /// Reading or writing a BPF map failed (e.g. too many cgroups watched at once).
    #[error("BPF map {map}: {source}")]
    Map {
        /// The map's name.
        map: &'static str,
        /// aya's error.
        source: aya::maps::MapError,
    },
    /// Attaching or detaching the network denial failed.
    #[error("{path}: network denial: {what}: {source}")]
    Deny {
        /// The cgroup directory.
        path: PathBuf,
        /// Which program and step.
        what: &'static str,
        /// aya's error.
        source: aya::programs::ProgramError,
    },
    /// Attaching or detaching the copy meter of a process failed (e.g. it has exited).
    #[error("copy meter for process {pid}: {source}")]
    Meter {
        /// The process (0 when detaching).
        pid: u32,
        /// aya's error.
        source: aya::programs::ProgramError,
    },
    /// The [`crate::Telemetry`] this watch belongs to was dropped: its programs are gone.
    #[error("telemetry has stopped: its programs were unloaded before the watch was taken")]
    Stopped,
}

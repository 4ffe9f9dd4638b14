//! Landlock: a second, unprivileged line behind the mount namespace. Everything is readable
//! and executable, only `/tmp` and writable binds take writes, and without network no TCP bind
//! or connect (on kernels with landlock ABI 4). Best effort: kernels without landlock keep the
//! other layers, and [`crate::Confined::landlock`] says so.

use landlock::{ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, path_beneath_rules};

use std::path::Path;

use crate::error::{Result, SandboxError};
use crate::spec::Spec;

fn err(e: impl std::fmt::Display) -> SandboxError {
    SandboxError::Landlock(e.to_string())
}

pub(crate) fn restrict(spec: &Spec) -> Result<bool> {
    let mut writable: Vec<&Path> = vec!["/tmp".as_ref(), "/dev".as_ref()];
    writable.extend(spec.binds.iter().filter(|b| b.writable).map(|b| b.target()));
    restrict_to(&["/".as_ref()], &writable, spec.network)
}

/// Restricts the calling thread (and the threads and processes it starts from now on) to
/// reading and executing beneath `read`, and anything beneath `write`; without `network`, no
/// TCP bind or connect. Every path must exist. Returns whether the kernel enforces it.
pub(crate) fn restrict_to(read: &[&Path], write: &[&Path], network: bool) -> Result<bool> {
    let abi = ABI::V5;
    let mut ruleset = Ruleset::default().set_compatibility(CompatLevel::BestEffort).handle_access(AccessFs::from_all(abi)).map_err(err)?;
    if !network {
        ruleset = ruleset.handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp).map_err(err)?;
    }
    let status = ruleset
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(read, AccessFs::from_read(abi)))
        .map_err(err)?
        .add_rules(path_beneath_rules(write, AccessFs::from_all(abi)))
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    Ok(status.ruleset != RulesetStatus::NotEnforced)
}

//! Landlock: a second, unprivileged line behind the mount namespace. Everything is readable
//! and executable, only `/tmp` and writable binds take writes, and without network no TCP bind
//! or connect (on kernels with landlock ABI 4). Best effort: kernels without landlock keep the
//! other layers, and [`crate::Confined::landlock`] says so.

use landlock::{ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, path_beneath_rules};

use crate::error::{Result, SandboxError};
use crate::spec::Spec;

fn err(e: impl std::fmt::Display) -> SandboxError {
    SandboxError::Landlock(e.to_string())
}

pub(crate) fn restrict(spec: &Spec) -> Result<bool> {
    let abi = ABI::V5;
    let mut writable: Vec<&std::path::Path> = vec!["/tmp".as_ref(), "/dev".as_ref()];
    writable.extend(spec.binds.iter().filter(|b| b.writable).map(|b| b.target()));
    let mut ruleset = Ruleset::default().set_compatibility(CompatLevel::BestEffort).handle_access(AccessFs::from_all(abi)).map_err(err)?;
    if !spec.network {
        ruleset = ruleset.handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp).map_err(err)?;
    }
    let status = ruleset
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(["/"], AccessFs::from_read(abi)))
        .map_err(err)?
        .add_rules(path_beneath_rules(writable, AccessFs::from_all(abi)))
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    Ok(status.ruleset != RulesetStatus::NotEnforced)
}

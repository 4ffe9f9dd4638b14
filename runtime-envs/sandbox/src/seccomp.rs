//! The seccomp filter: a deny list of the system calls a data function never needs and an
//! attacker would (namespaces, mounts, tracing, BPF, kernel modules, keyrings, io_uring, which
//! bypasses seccomp altogether), plus inet sockets when the function has no network.
//! A deny list rather than an allow list because Python and its C extensions use a wide,
//! version-dependent set of ordinary calls; the dangerous ones are few and stable.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch};

use crate::error::{Result, SandboxError};

/// Refused with EPERM, whatever the arguments.
pub(crate) const DENIED: &[(i64, &str)] = &[
    (libc::SYS_mount, "mount"),
    (libc::SYS_umount2, "umount2"),
    (libc::SYS_pivot_root, "pivot_root"),
    (libc::SYS_chroot, "chroot"),
    (libc::SYS_fsopen, "fsopen"),
    (libc::SYS_fsconfig, "fsconfig"),
    (libc::SYS_fsmount, "fsmount"),
    (libc::SYS_fspick, "fspick"),
    (libc::SYS_move_mount, "move_mount"),
    (libc::SYS_open_tree, "open_tree"),
    (libc::SYS_mount_setattr, "mount_setattr"),
    (libc::SYS_unshare, "unshare"),
    (libc::SYS_setns, "setns"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_process_vm_readv, "process_vm_readv"),
    (libc::SYS_process_vm_writev, "process_vm_writev"),
    (libc::SYS_pidfd_getfd, "pidfd_getfd"),
    (libc::SYS_kcmp, "kcmp"),
    (libc::SYS_bpf, "bpf"),
    (libc::SYS_perf_event_open, "perf_event_open"),
    (libc::SYS_userfaultfd, "userfaultfd"),
    (libc::SYS_kexec_load, "kexec_load"),
    (libc::SYS_kexec_file_load, "kexec_file_load"),
    (libc::SYS_init_module, "init_module"),
    (libc::SYS_finit_module, "finit_module"),
    (libc::SYS_delete_module, "delete_module"),
    (libc::SYS_keyctl, "keyctl"),
    (libc::SYS_add_key, "add_key"),
    (libc::SYS_request_key, "request_key"),
    (libc::SYS_reboot, "reboot"),
    (libc::SYS_swapon, "swapon"),
    (libc::SYS_swapoff, "swapoff"),
    (libc::SYS_acct, "acct"),
    (libc::SYS_quotactl, "quotactl"),
    (libc::SYS_open_by_handle_at, "open_by_handle_at"),
    (libc::SYS_name_to_handle_at, "name_to_handle_at"),
    (libc::SYS_iopl, "iopl"),
    (libc::SYS_ioperm, "ioperm"),
    (libc::SYS_syslog, "syslog"),
    (libc::SYS_settimeofday, "settimeofday"),
    (libc::SYS_clock_settime, "clock_settime"),
    (libc::SYS_clock_adjtime, "clock_adjtime"),
    (libc::SYS_adjtimex, "adjtimex"),
    (libc::SYS_sethostname, "sethostname"),
    (libc::SYS_setdomainname, "setdomainname"),
    (libc::SYS_mknod, "mknod"),
    (libc::SYS_mknodat, "mknodat"),
    (libc::SYS_fanotify_init, "fanotify_init"),
    (libc::SYS_lookup_dcookie, "lookup_dcookie"),
    (libc::SYS_vhangup, "vhangup"),
    (libc::SYS_io_uring_setup, "io_uring_setup"),
    (libc::SYS_io_uring_enter, "io_uring_enter"),
    (libc::SYS_io_uring_register, "io_uring_register"),
];

const NAMESPACE_FLAGS: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWCGROUP as u64,
];

fn err(e: impl std::fmt::Display) -> SandboxError {
    SandboxError::Seccomp(e.to_string())
}

fn rule(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompRule> {
    let c = SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value).map_err(err)?;
    SeccompRule::new(vec![c]).map_err(err)
}

fn eperm_program(network: bool) -> Result<BpfProgram> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = DENIED.iter().map(|&(n, _)| (n, Vec::new())).collect();
    // clone with any namespace flag: a new namespace is a way around the ones we set up.
    let clone_rules = NAMESPACE_FLAGS.iter().map(|&f| rule(0, SeccompCmpOp::MaskedEq(f), f)).collect::<Result<Vec<_>>>()?;
    rules.insert(libc::SYS_clone, clone_rules);
    if !network {
        let inet = [libc::AF_INET, libc::AF_INET6].iter().map(|&af| rule(0, SeccompCmpOp::Eq, af as u64)).collect::<Result<Vec<_>>>()?;
        rules.insert(libc::SYS_socket, inet);
    }
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), TargetArch::x86_64).map_err(err)?;
    filter.try_into().map_err(err)
}

/// clone3 passes its flags in memory, out of a filter's reach: refuse it with ENOSYS so that
/// glibc falls back to clone, whose flags the first filter checks.
fn clone3_program() -> Result<BpfProgram> {
    let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), TargetArch::x86_64).map_err(err)?;
    filter.try_into().map_err(err)
}

/// Installs both filters on the calling thread (and what it forks). Needs no_new_privs.
pub(crate) fn apply(network: bool) -> Result<()> {
    let eperm = eperm_program(network)?;
    let clone3 = clone3_program()?;
    seccompiler::apply_filter(&clone3).map_err(err)?;
    seccompiler::apply_filter(&eperm).map_err(err)
}

#[cfg(test)]
mod tests {
    #[test]
    fn both_filters_compile_for_both_network_settings() {
        for network in [false, true] {
            let p = super::eperm_program(network).expect("filter");
            assert!(p.len() > super::DENIED.len(), "every denied call has its instructions");
        }
        assert!(!super::clone3_program().expect("clone3").is_empty());
    }
}

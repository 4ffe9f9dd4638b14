//! Runs a command inside a quiver sandbox, like the function processes: for operators checking
//! what a function can see, and for the sandbox's tests.
//!
//! `quiver-sandbox-run SPEC.json [--memory BYTES] [--pids N] [--cpus F] [--no-net] -- CMD ARGS...`
//!
//! Creates a cgroup for the run (removed afterwards), forks, enters the sandbox in the child,
//! execs CMD, and exits with its status.

use std::ffi::CString;
use std::os::fd::AsFd;
use std::process::ExitCode;

use quiver_sandbox::cgroup::{CgroupLimits, CgroupRoot};
use quiver_sandbox::{Spec, netns};

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("quiver-sandbox-run: {e}");
            ExitCode::from(125)
        }
    }
}

fn run() -> Result<u8, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sep = args.iter().position(|a| a == "--").ok_or("usage: quiver-sandbox-run SPEC.json [--memory B] [--pids N] [--cpus F] [--no-net] -- CMD ARGS...")?;
    let (opts, cmd) = (&args[..sep], &args[sep + 1..]);
    let spec_path = opts.first().ok_or("missing SPEC.json")?;
    let mut spec: Spec = serde_json::from_slice(&std::fs::read(spec_path).map_err(|e| format!("{spec_path}: {e}"))?).map_err(|e| format!("{spec_path}: {e}"))?;
    let mut limits = CgroupLimits::default();
    let mut no_net = false;
    let mut it = opts[1..].iter();
    while let Some(o) = it.next() {
        let mut val = || it.next().ok_or(format!("{o} needs a value"));
        match o.as_str() {
            "--memory" => limits.memory = Some(val()?.parse().map_err(|e| format!("--memory: {e}"))?),
            "--pids" => limits.pids = Some(val()?.parse().map_err(|e| format!("--pids: {e}"))?),
            "--cpus" => limits.cpus = Some(val()?.parse().map_err(|e| format!("--cpus: {e}"))?),
            "--no-net" => no_net = true,
            other => return Err(format!("unknown option {other}")),
        }
    }
    spec.network = !no_net;
    let cmd: Vec<CString> = cmd.iter().map(|a| CString::new(a.as_str()).map_err(|e| e.to_string())).collect::<Result<_, _>>()?;
    if cmd.is_empty() {
        return Err("no command".into());
    }
    let net = if no_net { Some(netns::empty().map_err(|e| e.to_string())?) } else { None };
    let root = CgroupRoot::discover("quiver-sandbox-run").map_err(|e| e.to_string())?;
    let mut cg = root.create(&format!("run-{}", std::process::id()), &limits).map_err(|e| e.to_string())?;
    let procs = cg.procs_files().map_err(|e| e.to_string())?;
    // SAFETY: this program is single-threaded here (the netns thread has been joined).
    match unsafe { nix::unistd::fork() }.map_err(|e| e.to_string())? {
        nix::unistd::ForkResult::Child => {
            let fds: Vec<_> = procs.iter().map(|f| f.as_fd()).collect();
            let r = quiver_sandbox::enter(&spec, &fds, net.as_ref().map(|n| n.as_fd()));
            match r {
                Ok(_) => {
                    let e = nix::unistd::execvp(&cmd[0], &cmd).unwrap_err();
                    eprintln!("quiver-sandbox-run: exec {:?}: {e}", cmd[0]);
                }
                Err(e) => eprintln!("quiver-sandbox-run: {e}"),
            }
            // SAFETY: leaving the forked child without running the parent's destructors.
            unsafe { libc::_exit(126) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(procs);
            let status = nix::sys::wait::waitpid(child, None).map_err(|e| e.to_string())?;
            let oom = cg.oom_kills();
            cg.remove();
            if oom > 0 {
                eprintln!("quiver-sandbox-run: killed by the memory limit");
            }
            Ok(match status {
                nix::sys::wait::WaitStatus::Exited(_, c) => c as u8,
                nix::sys::wait::WaitStatus::Signaled(_, s, _) => 128 + s as u8,
                _ => 125,
            })
        }
    }
}

//! Zygotes: one long-lived Python process per environment with the harness and the
//! environment's packages imported, forking a sandboxed child per call (the Python side is
//! `quiver/_zygote.py`, which documents the protocol).
//!
//! A pool keeps at most `max` zygotes and evicts the least recently used one to start another.
//! A zygote found dead is replaced. A call that had to start its zygote is a cold start, and
//! [`Forked::cold`] says so.

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use nix::sys::socket::{self, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType};
use serde::Deserialize;

use crate::store::Env;

/// Host paths every call sees read-only besides its environment: the system's libraries.
const SYSTEM_BINDS: [&str; 5] = ["/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache"];

/// The read-only binds a call from `env` needs: the system's libraries, the venv and its
/// interpreter, the harness package, the preload library, and `extra` (the model's folder).
/// Canonical paths, parents before children.
pub fn binds(env: &Env, harness: &std::path::Path, preload: &std::path::Path, extra: &[&std::path::Path]) -> Vec<quiver_sandbox::Bind> {
    let mut out: Vec<quiver_sandbox::Bind> = SYSTEM_BINDS.iter().filter(|p| std::path::Path::new(p).exists()).map(|p| quiver_sandbox::Bind::ro(*p)).collect();
    for p in [env.path.as_path(), env.base_prefix.as_path(), harness, preload].into_iter().chain(extra.iter().copied()) {
        // The sandbox refuses `..` and relative paths; configured ones may have either.
        out.push(quiver_sandbox::Bind::ro(p.canonicalize().unwrap_or_else(|_| p.to_owned())));
    }
    // A bind below another (a project inside /usr) must come after it.
    out.sort_by_key(|b| b.src.components().count());
    out.dedup_by(|a, b| a.src == b.src);
    out
}

/// Why a call could not be forked.
#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    /// The zygote could not be started or did not get ready.
    #[error("starting the zygote for environment {key}: {message}")]
    Start {
        /// The environment.
        key: String,
        /// What went wrong.
        message: String,
    },
    /// The zygote answered with an error, or its socket failed.
    #[error("zygote: {0}")]
    Fork(String),
}

/// Where the pieces a zygote loads are.
#[derive(Debug, Clone)]
pub struct ZygoteOptions {
    /// The folder holding the `quiver` Python package (the harness).
    pub harness_dir: PathBuf,
    /// `libquiver_preload.so`, preloaded into zygotes and so into every function.
    pub preload: PathBuf,
    /// `libquiver_sandbox.so`, which the children confine themselves with.
    pub sandbox_lib: PathBuf,
    /// Most zygotes alive at once.
    pub max: usize,
    /// How long a zygote may take to import its packages.
    pub start_timeout: Duration,
}

/// What a fork request carries.
#[derive(Debug)]
pub struct ForkRequest<'a> {
    /// The function's end of its socket to the agent.
    pub conn: BorrowedFd<'a>,
    /// Its log file (stdout and stderr).
    pub log: BorrowedFd<'a>,
    /// `cgroup.procs` files it joins.
    pub cgroup_procs: Vec<BorrowedFd<'a>>,
    /// The model may reach the network (stays in the host's network namespace).
    pub network: bool,
    /// The quiver-sandbox spec, as JSON.
    pub sandbox: serde_json::Value,
}

/// A forked call.
#[derive(Debug, Clone, Copy)]
pub struct Forked {
    /// The child's pid (in the agent's pid namespace).
    pub pid: i32,
    /// The zygote had to be started for this call.
    pub cold: bool,
    /// How long the zygote's imports took, for a cold start.
    pub import_ms: Option<f64>,
}

struct Zygote {
    child: Child,
    ctl: OwnedFd,
    last_used: Instant,
}

impl Zygote {
    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Slot = Arc<Mutex<Option<Zygote>>>;
type SpawnJob = (Command, mpsc::Sender<std::io::Result<Child>>);

/// The zygotes of one agent.
pub struct ZygotePool {
    opts: ZygoteOptions,
    netns: Option<Arc<OwnedFd>>,
    slots: Mutex<HashMap<String, Slot>>,
    spawner: Mutex<mpsc::Sender<SpawnJob>>,
}

#[derive(Deserialize)]
struct Ready {
    ready: bool,
    #[serde(default)]
    import_ms: f64,
}

#[derive(Deserialize)]
struct ForkReply {
    pid: Option<i32>,
    error: Option<String>,
}

impl ZygotePool {
    /// A pool whose children join `netns` (the empty network namespace) unless a call has
    /// network access.
    pub fn new(opts: ZygoteOptions, netns: Option<Arc<OwnedFd>>) -> ZygotePool {
        // Zygotes die with the agent (PR_SET_PDEATHSIG), which fires when the *thread* that
        // forked them ends: one long-lived thread starts them all.
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        let _ = std::thread::Builder::new().name("quiver-zygotes".into()).spawn(move || {
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
        });
        ZygotePool { opts, netns, slots: Mutex::new(HashMap::new()), spawner: Mutex::new(tx) }
    }

    /// Starts the zygote of `env` unless it runs (a plan that needs it arrived).
    pub fn prestart(&self, env: &Env) -> Result<(), ZygoteError> {
        let slot = self.slot(&env.key);
        let mut z = slot.lock().unwrap_or_else(|e| e.into_inner());
        if !z.as_mut().is_some_and(Zygote::alive) {
            *z = Some(self.start(env)?.0);
        }
        Ok(())
    }

    /// Forks a call from the zygote of `env`, starting (or replacing) it first when needed.
    pub fn fork(&self, env: &Env, req: &ForkRequest<'_>) -> Result<Forked, ZygoteError> {
        let slot = self.slot(&env.key);
        let mut z = slot.lock().unwrap_or_else(|e| e.into_inner());
        let mut cold = None;
        if !z.as_mut().is_some_and(Zygote::alive) {
            let (new, ms) = self.start(env)?;
            *z = Some(new);
            cold = Some(ms);
        }
        let zy = z.as_mut().expect("set above");
        zy.last_used = Instant::now();
        match ask(zy, req) {
            Ok(pid) => Ok(Forked { pid, cold: cold.is_some(), import_ms: cold }),
            Err(e) if cold.is_none() && !zy.alive() => {
                // It died since we last looked: replace it once.
                eprintln!("quiver-envs: the zygote for {} died ({e}); replacing it", env.key);
                let (new, ms) = self.start(env)?;
                *z = Some(new);
                let pid = ask(z.as_mut().expect("set above"), req)?;
                Ok(Forked { pid, cold: true, import_ms: Some(ms) })
            }
            Err(e) => Err(e),
        }
    }

    /// Environments with a live zygote, and their pids.
    pub fn live(&self) -> Vec<(String, u32)> {
        let slots: Vec<(String, Slot)> = self.slots.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        slots
            .into_iter()
            .filter_map(|(k, s)| {
                let mut z = s.try_lock().ok()?;
                let z = z.as_mut()?;
                z.alive().then(|| (k, z.child.id()))
            })
            .collect()
    }

    /// Stops every zygote.
    pub fn shutdown(&self) {
        let slots: Vec<Slot> = self.slots.lock().unwrap_or_else(|e| e.into_inner()).drain().map(|(_, v)| v).collect();
        for s in slots {
            s.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }

    fn slot(&self, key: &str) -> Slot {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).entry(key.to_owned()).or_default().clone()
    }

    /// Evicts least recently used zygotes until one more fits.
    fn make_room(&self, except: &str) {
        loop {
            let slots: Vec<(String, Slot)> = self.slots.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let mut live = Vec::new();
            for (k, s) in &slots {
                if k == except {
                    continue;
                }
                // A slot in use (starting or forking) is not evictable now.
                if let Ok(mut z) = s.try_lock() {
                    if let Some(zy) = z.as_mut() {
                        if zy.alive() {
                            live.push((zy.last_used, s.clone()));
                        } else {
                            z.take();
                        }
                    }
                }
            }
            if live.len() < self.opts.max.max(1) {
                return;
            }
            live.sort_by_key(|(t, _)| *t);
            if let Ok(mut z) = live[0].1.try_lock() {
                z.take();
            }
        }
    }

    fn start(&self, env: &Env) -> Result<(Zygote, f64), ZygoteError> {
        let fail = |m: String| ZygoteError::Start { key: env.key.clone(), message: m };
        self.make_room(&env.key);
        let (ours, theirs) = socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(|e| fail(format!("socketpair: {e}")))?;
        let preimport: Vec<String> = env.spec.pip.keys().map(|p| p.to_lowercase().replace('-', "_")).collect();
        let mut cmd = Command::new(&env.python);
        cmd.args(["-m", "quiver._zygote", "--fd", "3", "--sandbox-lib"])
            .arg(&self.opts.sandbox_lib)
            .args(["--preimport", &preimport.join(",")])
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("PYTHONPATH", &self.opts.harness_dir)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("LD_PRELOAD", &self.opts.preload)
            .env("ARROW_DEFAULT_MEMORY_POOL", "system")
            .stdin(Stdio::null());
        let ctl_raw = theirs.as_raw_fd();
        let net_raw: RawFd = self.netns.as_ref().map_or(-1, |n| n.as_raw_fd());
        if net_raw >= 0 {
            cmd.args(["--netns-fd", "4"]);
        }
        // SAFETY: only async-signal-safe calls between fork and exec: fcntl and dup2 place the control
        // socket on fd 3 and the network namespace on fd 4 (dup2 clears close-on-exec),
        // setpgid gives the zygote its own group, PR_SET_PDEATHSIG ties it to the agent.
        unsafe {
            cmd.pre_exec(move || {
                // Either fd may sit on 3 or 4 already: move both out of the way first.
                let ctl = libc::fcntl(ctl_raw, libc::F_DUPFD, 10);
                let net = if net_raw >= 0 { libc::fcntl(net_raw, libc::F_DUPFD, 10) } else { -1 };
                if ctl < 0 || (net_raw >= 0 && net < 0) {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::dup2(ctl, 3) < 0 || (net >= 0 && libc::dup2(net, 4) < 0) || libc::setpgid(0, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            })
        };
        let (tx, rx) = mpsc::channel();
        self.spawner.lock().unwrap_or_else(|e| e.into_inner()).send((cmd, tx)).map_err(|_| fail("the spawning thread is gone".into()))?;
        let child = rx.recv().map_err(|_| fail("the spawning thread is gone".into()))?.map_err(|e| fail(format!("{}: {e}", env.python.display())))?;
        drop(theirs);
        let mut z = Zygote { child, ctl: ours, last_used: Instant::now() };
        set_timeout(z.ctl.as_fd(), Some(self.opts.start_timeout));
        let ready: Ready = match recv_json(z.ctl.as_fd()) {
            Ok(r) => r,
            Err(e) => {
                let status = z.child.try_wait().ok().flatten().map(|s| format!(" (exited: {s})")).unwrap_or_default();
                return Err(fail(format!("no ready message: {e}{status}")));
            }
        };
        if !ready.ready {
            return Err(fail("not ready".into()));
        }
        set_timeout(z.ctl.as_fd(), Some(Duration::from_secs(10)));
        Ok((z, ready.import_ms))
    }
}

impl Drop for ZygotePool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn ask(z: &mut Zygote, req: &ForkRequest<'_>) -> Result<i32, ZygoteError> {
    let mut fds = vec![req.conn.as_raw_fd(), req.log.as_raw_fd()];
    fds.extend(req.cgroup_procs.iter().map(|f| f.as_raw_fd()));
    let msg = serde_json::json!({
        "conn": 0,
        "log": 1,
        "cgroups": (2..fds.len()).collect::<Vec<_>>(),
        "network": req.network,
        "sandbox": req.sandbox,
    });
    let bytes = serde_json::to_vec(&msg).map_err(|e| ZygoteError::Fork(e.to_string()))?;
    let iov = [IoSlice::new(&bytes)];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    socket::sendmsg::<()>(z.ctl.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None).map_err(|e| ZygoteError::Fork(format!("sending the request: {e}")))?;
    let reply: ForkReply = recv_json(z.ctl.as_fd()).map_err(ZygoteError::Fork)?;
    match (reply.pid, reply.error) {
        (Some(pid), _) if pid > 0 => Ok(pid),
        (_, Some(e)) => Err(ZygoteError::Fork(e)),
        _ => Err(ZygoteError::Fork("empty reply".into())),
    }
}

fn recv_json<T: for<'de> Deserialize<'de>>(fd: BorrowedFd<'_>) -> Result<T, String> {
    let mut buf = vec![0u8; 64 << 10];
    let n = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match socket::recvmsg::<()>(fd.as_raw_fd(), &mut iov, None, MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(m) => break m.bytes,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("reading: {e}")),
        }
    };
    if n == 0 {
        return Err("the zygote closed its socket".into());
    }
    serde_json::from_slice(&buf[..n]).map_err(|e| format!("bad message: {e}"))
}

fn set_timeout(fd: BorrowedFd<'_>, t: Option<Duration>) {
    let tv = t.map_or(nix::sys::time::TimeVal::new(0, 0), |d| nix::sys::time::TimeVal::new(d.as_secs() as i64, d.subsec_micros() as i64));
    let _ = socket::setsockopt(&fd, socket::sockopt::ReceiveTimeout, &tv);
}

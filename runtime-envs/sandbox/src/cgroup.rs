//! One cgroup per invocation, with memory, pids and cpu limits, made and removed by the agent.
//!
//! The production target is cgroup v2 under the agent unit's delegated subtree (`Delegate=yes`):
//! each controller is used from v2 when the v2 hierarchy offers it. Where it does not (hybrid
//! hosts such as these build machines, where memory, pids and cpu are only mounted as v1), that
//! controller falls back to its v1 hierarchy, under a `quiver` folder. The invocation also gets
//! a v2 folder whenever cgroup2 is mounted, even with no controllers, because that is what eBPF
//! programs attach to and identify functions by.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Result, SandboxError};

/// Limits of one invocation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CgroupLimits {
    /// Memory in bytes (RAM; the memfd arena counts too).
    pub memory: Option<u64>,
    /// Most tasks (processes and threads).
    pub pids: Option<u64>,
    /// CPU bandwidth, 1.0 = one core.
    pub cpus: Option<f64>,
}

/// Where each controller lives on this host.
#[derive(Debug, Clone)]
pub struct CgroupRoot {
    /// The v2 folder functions are created under, when cgroup2 is mounted.
    pub v2: Option<PathBuf>,
    /// Controllers v2 offers there.
    pub v2_controllers: Vec<String>,
    /// v1 folders (`quiver` under each hierarchy) for controllers v2 lacks.
    pub v1: Vec<(String, PathBuf)>,
}

/// The cgroup folders of one invocation.
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    v2: Option<PathBuf>,
    memory: Option<(bool, PathBuf)>,
}

const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SandboxError + '_ {
    move |source| SandboxError::Cgroup { path: path.to_owned(), source }
}

fn write(path: &Path, value: &str) -> Result<()> {
    let mut f = fs::OpenOptions::new().write(true).open(path).map_err(io(path))?;
    f.write_all(value.as_bytes()).map_err(io(path))
}

impl CgroupRoot {
    /// Finds the hierarchies from `/proc/self/mountinfo` and prepares `name` folders: under the
    /// agent's own v2 cgroup when it may delegate (a systemd unit with `Delegate=yes`), else
    /// under the v2 root; v1 fallbacks under each v1 hierarchy's root.
    pub fn discover(name: &str) -> Result<CgroupRoot> {
        let info = fs::read_to_string("/proc/self/mountinfo").map_err(io(Path::new("/proc/self/mountinfo")))?;
        let mut v2_mount = None;
        let mut v1 = Vec::new();
        for line in info.lines() {
            let Some((pre, post)) = line.split_once(" - ") else { continue };
            let mount_point = pre.split(' ').nth(4).unwrap_or("");
            let mut post = post.split(' ');
            let fstype = post.next().unwrap_or("");
            let opts = post.nth(1).unwrap_or("");
            if fstype == "cgroup2" && v2_mount.is_none() {
                v2_mount = Some(PathBuf::from(mount_point));
            } else if fstype == "cgroup" {
                for c in CONTROLLERS {
                    if opts.split(',').any(|o| o == c) && !v1.iter().any(|(n, _): &(String, PathBuf)| n == c) {
                        v1.push((c.to_owned(), PathBuf::from(mount_point)));
                    }
                }
            }
        }
        let v2 = match v2_mount {
            Some(m) => Some(prepare_v2(&m, name)?),
            None => None,
        };
        let v2_controllers: Vec<String> = match &v2 {
            Some(d) => fs::read_to_string(d.join("cgroup.controllers")).unwrap_or_default().split_whitespace().map(str::to_owned).collect(),
            None => Vec::new(),
        };
        if let Some(d) = &v2 {
            // Children may use what this folder has; failures mean the controller stays off.
            for c in CONTROLLERS.iter().filter(|c| v2_controllers.iter().any(|v| v == *c)) {
                let _ = write(&d.join("cgroup.subtree_control"), &format!("+{c}"));
            }
        }
        let mut fallback = Vec::new();
        for (c, mount) in v1 {
            if v2_controllers.iter().any(|v| *v == c) {
                continue;
            }
            let dir = mount.join(name);
            fs::create_dir_all(&dir).map_err(io(&dir))?;
            fallback.push((c, dir));
        }
        Ok(CgroupRoot { v2, v2_controllers, v1: fallback })
    }

    /// Which controllers are missing entirely (neither v2 nor v1): their limits are not enforced.
    pub fn missing(&self) -> Vec<&'static str> {
        CONTROLLERS.iter().copied().filter(|c| !self.v2_controllers.iter().any(|v| v == c) && !self.v1.iter().any(|(n, _)| n == c)).collect()
    }

    /// Creates the folders of invocation `id` and writes its limits.
    pub fn create(&self, id: &str, limits: &CgroupLimits) -> Result<Cgroup> {
        if id.is_empty() || id.contains('/') || id.starts_with('.') {
            return Err(SandboxError::Spec(format!("bad cgroup name {id:?}")));
        }
        let mut cg = Cgroup { dirs: Vec::new(), v2: None, memory: None };
        if let Some(root) = &self.v2 {
            let d = root.join(id);
            fs::create_dir(&d).map_err(io(&d))?;
            cg.dirs.push(d.clone());
            cg.v2 = Some(d);
        }
        for (c, root) in &self.v1 {
            let d = root.join(id);
            fs::create_dir(&d).map_err(io(&d))?;
            cg.dirs.push(d.clone());
            if c == "memory" {
                cg.memory = Some((false, d.clone()));
            }
            let r = match c.as_str() {
                "memory" => limits.memory.map_or(Ok(()), |m| write(&d.join("memory.limit_in_bytes"), &m.to_string())),
                "pids" => limits.pids.map_or(Ok(()), |p| write(&d.join("pids.max"), &p.to_string())),
                "cpu" => limits.cpus.map_or(Ok(()), |c| {
                    write(&d.join("cpu.cfs_period_us"), "100000")?;
                    write(&d.join("cpu.cfs_quota_us"), &((c * 100_000.0).max(1000.0) as u64).to_string())
                }),
                _ => Ok(()),
            };
            if let Err(e) = r {
                cg.remove();
                return Err(e);
            }
        }
        if let Some(d) = cg.v2.clone() {
            let has = |c: &str| self.v2_controllers.iter().any(|v| v == c);
            let r = (|| {
                if has("memory") {
                    cg.memory = Some((true, d.clone()));
                    if let Some(m) = limits.memory {
                        write(&d.join("memory.max"), &m.to_string())?;
                        write(&d.join("memory.swap.max"), "0").ok();
                    }
                }
                if let (true, Some(p)) = (has("pids"), limits.pids) {
                    write(&d.join("pids.max"), &p.to_string())?;
                }
                if let (true, Some(c)) = (has("cpu"), limits.cpus) {
                    write(&d.join("cpu.max"), &format!("{} 100000", (c * 100_000.0).max(1000.0) as u64))?;
                }
                Ok(())
            })();
            if let Err(e) = r {
                cg.remove();
                return Err(e);
            }
        }
        Ok(cg)
    }
}

/// The v2 folder functions go under: below the agent's own cgroup when that is delegated to
/// it, else below the hierarchy's root.
fn prepare_v2(mount: &Path, name: &str) -> Result<PathBuf> {
    let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let own = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/").trim().to_owned();
    let own_dir = mount.join(own.trim_start_matches('/'));
    // A delegated unit owns its folder; a process at the root (or in a folder it does not
    // own) puts functions beside itself instead, under the root.
    let delegated = own != "/" && std::env::var_os("INVOCATION_ID").is_some() && own_dir.join("cgroup.subtree_control").exists();
    let base = if delegated {
        // The no-internal-processes rule: the agent moves itself to a leaf before its folder
        // can enable controllers for the functions' folders.
        let leaf = own_dir.join("agent");
        fs::create_dir_all(&leaf).map_err(io(&leaf))?;
        write(&leaf.join("cgroup.procs"), "0")?;
        own_dir
    } else {
        mount.to_owned()
    };
    let dir = base.join(name);
    fs::create_dir_all(&dir).map_err(io(&dir))?;
    Ok(dir)
}

impl Cgroup {
    /// Opens each folder's `cgroup.procs` for writing: the function process writes "0" to each
    /// to join before it runs anything.
    pub fn procs_files(&self) -> Result<Vec<fs::File>> {
        self.dirs.iter().map(|d| {
            let p = d.join("cgroup.procs");
            fs::OpenOptions::new().write(true).open(&p).map_err(io(&p))
        }).collect()
    }

    /// Moves `pid` into every folder.
    pub fn add(&self, pid: u32) -> Result<()> {
        self.dirs.iter().try_for_each(|d| write(&d.join("cgroup.procs"), &pid.to_string()))
    }

    /// The v2 folder (for eBPF), if any.
    pub fn v2_dir(&self) -> Option<&Path> {
        self.v2.as_deref()
    }

    /// Pids in the invocation.
    pub fn pids(&self) -> Vec<i32> {
        let mut out = Vec::new();
        for d in &self.dirs {
            for l in fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default().lines() {
                if let Ok(p) = l.trim().parse::<i32>() {
                    if !out.contains(&p) {
                        out.push(p);
                    }
                }
            }
        }
        out
    }

    /// Times the kernel's OOM killer acted in the invocation (the memory limit was hit).
    pub fn oom_kills(&self) -> u64 {
        let Some((v2, d)) = &self.memory else { return 0 };
        let file = if *v2 { d.join("memory.events") } else { d.join("memory.oom_control") };
        fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill ").and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0)
    }

    /// Peak memory use in bytes, when the controller reports one.
    pub fn memory_peak(&self) -> Option<u64> {
        let (v2, d) = self.memory.as_ref()?;
        let file = if *v2 { d.join("memory.peak") } else { d.join("memory.max_usage_in_bytes") };
        fs::read_to_string(file).ok()?.trim().parse().ok()
    }

    /// Kills every process in the invocation, forks included, and waits (up to `wait`) until
    /// none is left. `cgroup.kill` where v2 has it; else SIGKILL to each listed pid, repeated
    /// because a fork bomb adds pids while we kill.
    pub fn kill(&self, wait: Duration) -> bool {
        if let Some(d) = &self.v2 {
            let _ = write(&d.join("cgroup.kill"), "1");
        }
        let end = Instant::now() + wait;
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return true;
            }
            for p in pids {
                // SAFETY: kill has no memory effects.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Kills what is left and removes the folders.
    pub fn remove(&mut self) {
        if !self.dirs.is_empty() {
            self.kill(Duration::from_secs(5));
        }
        for d in self.dirs.drain(..) {
            // A folder is removable once its last task is reaped; zombies linger briefly.
            for _ in 0..500 {
                if fs::remove_dir(&d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.remove();
    }
}

//! The loader: [`Telemetry`] owns the loaded programs, [`Watch`] one registered cgroup.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use aya::Ebpf;
use aya::maps::{HashMap, IterableMap, MapData, MapError};
use aya::programs::cgroup_sock::CgroupSockLinkId;
use aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId;
use aya::programs::uprobe::{UProbeAttachLocation, UProbeLinkId, UProbeScope};
use aya::programs::{
    CgroupAttachMode, CgroupSock, CgroupSockAddr, Program, ProgramError, TracePoint, UProbe,
};

use crate::maps::{PID_FAULTS, PidKey, STATS, Stats};
use crate::{CopyProbes, Counters, Error, Unavailable, cgroup_id, copies, tracefs};

/// Tracepoint programs and the events they attach to.
const TRACEPOINTS: [(&str, &str, &str); 3] = [
    ("qv_page_fault", "exceptions", "page_fault_user"),
    ("qv_mmap", "syscalls", "sys_enter_mmap"),
    ("qv_munmap", "syscalls", "sys_enter_munmap"),
];
const MEMCPY: &str = "qv_memcpy";
const SOCK_CREATE: &str = "qv_sock_create";
const CONNECT4: &str = "qv_connect4";
const CONNECT6: &str = "qv_connect6";

/// The loaded and attached BPF programs of one agent. Dropping it detaches and unloads them all.
pub struct Telemetry {
    inner: Arc<Mutex<State>>,
    probes: CopyProbes,
}

struct State {
    ebpf: Ebpf,
    /// Keeps per-process attachment fast (see perf.rs); closed with the rest.
    _sched_key: Option<std::os::fd::OwnedFd>,
    stats: HashMap<MapData, u64, Stats>,
    pid_faults: HashMap<MapData, PidKey, u64>,
    watched: HashSet<u64>,
}

/// The kernel's ids of a [`Telemetry`]'s programs and maps (as `bpftool prog`/`map` list them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelIds {
    /// Program ids.
    pub programs: Vec<u32>,
    /// Map ids.
    pub maps: Vec<u32>,
}

/// One registered cgroup. [`Watch::take`] (or dropping it) unregisters it and lifts its
/// network denial.
#[derive(Debug)]
pub struct Watch {
    inner: Weak<Mutex<State>>,
    dir: PathBuf,
    cgroup_id: u64,
    deny: Option<DenyLinks>,
    released: bool,
}

#[derive(Debug)]
struct DenyLinks {
    sock: CgroupSockLinkId,
    connect4: CgroupSockAddrLinkId,
    connect6: CgroupSockAddrLinkId,
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Unavailable>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or(Unavailable::Missing(name))?;
    p.try_into().map_err(|source| Unavailable::Program {
        what: format!("{name}: type"),
        source,
    })
}

fn take_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, Unavailable> {
    let map = ebpf.take_map(name).ok_or(Unavailable::Missing(name))?;
    HashMap::try_from(map).map_err(|source| Unavailable::Map { name, source })
}

impl Telemetry {
    /// Mounts tracefs when missing, loads the programs and attaches the machine-wide ones
    /// (page faults, mmap/munmap tracepoints). Fails with the reason when this build, this
    /// kernel or these privileges cannot run them; the caller logs it and carries on without.
    pub fn start() -> Result<Telemetry, Unavailable> {
        let object = crate::object::OBJECT.map_err(Unavailable::NotBuilt)?;
        tracefs::ensure_mounted()?;
        let probes = copies::resolve()?;
        let mut ebpf = Ebpf::load(object).map_err(Unavailable::Load)?;
        let failed = |what: String| move |source| Unavailable::Program { what, source };

        for (name, category, event) in TRACEPOINTS {
            let tp: &mut TracePoint = program(&mut ebpf, name)?;
            tp.load().map_err(failed(format!("loading {name}")))?;
            tp.attach(category, event)
                .map_err(failed(format!("attaching {name} to {category}/{event}")))?;
        }
        // The copy meter is attached per process by meter_copies: a uprobe for every
        // process on the machine costs each of them a trap per copy (see docs/telemetry.md).
        let up: &mut UProbe = program(&mut ebpf, MEMCPY)?;
        up.load().map_err(failed(format!("loading {MEMCPY}")))?;
        let sock: &mut CgroupSock = program(&mut ebpf, SOCK_CREATE)?;
        sock.load()
            .map_err(failed(format!("loading {SOCK_CREATE}")))?;
        for name in [CONNECT4, CONNECT6] {
            let p: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            p.load().map_err(failed(format!("loading {name}")))?;
        }

        let stats = take_map(&mut ebpf, STATS)?;
        let pid_faults = take_map(&mut ebpf, PID_FAULTS)?;
        let state = State {
            ebpf,
            _sched_key: crate::perf::hold_sched_key(),
            stats,
            pid_faults,
            watched: HashSet::new(),
        };
        Ok(Telemetry {
            inner: Arc::new(Mutex::new(state)),
            probes,
        })
    }

    /// The glibc implementations the copy meter probes.
    pub fn copy_probes(&self) -> &CopyProbes {
        &self.probes
    }

    /// Starts counting for the cgroup v2 at `cgroup_dir` (from now on, for every process in it)
    /// and, with `deny_network`, makes `socket(AF_INET/AF_INET6)` and `connect` on IPv4/IPv6
    /// fail there with EPERM, for its child cgroups too. Register the cgroup before the
    /// function's first process enters it.
    pub fn watch(&self, cgroup_dir: &Path, deny_network: bool) -> Result<Watch, Error> {
        let id = cgroup_id(cgroup_dir)?;
        let mut guard = lock(&self.inner);
        let state = &mut *guard;
        if state.watched.contains(&id) {
            return Err(Error::AlreadyWatched(cgroup_dir.to_path_buf()));
        }
        state
            .stats
            .insert(id, Stats::ZERO, 0)
            .map_err(|source| Error::Map { map: STATS, source })?;
        state.watched.insert(id);
        let mut watch = Watch {
            inner: Arc::downgrade(&self.inner),
            dir: cgroup_dir.to_path_buf(),
            cgroup_id: id,
            deny: None,
            released: false,
        };
        if deny_network {
            match attach_deny(&mut state.ebpf, cgroup_dir) {
                Ok(links) => watch.deny = Some(links),
                Err(e) => {
                    drop(guard);
                    drop(watch);
                    return Err(e);
                }
            }
        }
        Ok(watch)
    }

    /// Meters the glibc copies (memcpy, memmove, mempcpy and their `_chk` forms) of process
    /// `pid`, all its threads and whatever it execs, not the processes it forks, until the
    /// returned meter is dropped. Copies are charged to the process's cgroup when that cgroup is
    /// watched. Each metered copy call costs the process one uprobe trap; processes not metered
    /// pay nothing. Attaching takes milliseconds: meter a worker when it starts, before it is
    /// handed work.
    pub fn meter_copies(&self, pid: u32) -> Result<CopyMeter, Error> {
        let meter_err = |source| Error::Meter { pid, source };
        let nz = std::num::NonZeroU32::new(pid)
            .ok_or_else(|| meter_err(io_error("pid 0 names no process")))?;
        let mut meter = CopyMeter {
            inner: Arc::downgrade(&self.inner),
            pid,
            links: Vec::new(),
        };
        let mut state = lock(&self.inner);
        let up: &mut UProbe = program(&mut state.ebpf, MEMCPY)
            .map_err(|_| meter_err(io_error("BPF program missing")))?;
        for p in &self.probes.probes {
            let at = UProbeAttachLocation::AbsoluteOffset(p.file_offset);
            // On failure the meter's drop detaches what was attached.
            let link = up
                .attach(at, &self.probes.library, UProbeScope::OneProcess(nz))
                .map_err(meter_err)?;
            meter.links.push(link);
        }
        Ok(meter)
    }

    /// The kernel ids of the loaded programs and maps, to check that they are gone after a drop.
    pub fn kernel_ids(&self) -> KernelIds {
        let state = lock(&self.inner);
        let programs = state
            .ebpf
            .programs()
            .filter_map(|(_, p)| p.info().ok())
            .map(|i| i.id());
        let maps = [state.stats.map().info(), state.pid_faults.map().info()];
        KernelIds {
            programs: programs.collect(),
            maps: maps
                .into_iter()
                .filter_map(Result::ok)
                .map(|i| i.id())
                .collect(),
        }
    }
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("copy_probes", &self.probes)
            .finish_non_exhaustive()
    }
}

fn io_error(msg: &str) -> ProgramError {
    ProgramError::IOError(std::io::Error::other(msg.to_string()))
}

/// The copy meter of one process; dropping it detaches the meter.
#[derive(Debug)]
pub struct CopyMeter {
    inner: Weak<Mutex<State>>,
    pid: u32,
    links: Vec<UProbeLinkId>,
}

impl CopyMeter {
    /// The metered process.
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

impl Drop for CopyMeter {
    fn drop(&mut self) {
        // Without the telemetry its programs, and so these links, are gone already.
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let mut state = lock(&inner);
        if let Ok(up) = program::<UProbe>(&mut state.ebpf, MEMCPY) {
            for link in self.links.drain(..) {
                if let Err(e) = up.detach(link) {
                    log::warn!("detaching the copy meter of process {}: {e}", self.pid);
                }
            }
        }
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves the maps consistent (each update is one syscall).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn attach_deny(ebpf: &mut Ebpf, dir: &Path) -> Result<DenyLinks, Error> {
    let cgroup = File::open(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let err = |what| {
        move |source| Error::Deny {
            path: dir.to_path_buf(),
            what,
            source,
        }
    };
    // Attached as bpf_links (kernel >= 5.7), which always coexist with the cgroup's other
    // programs; link_create refuses any attach flag, so the mode must stay the default.
    let mode = CgroupAttachMode::Single;
    let sock_prog: &mut CgroupSock = program(ebpf, SOCK_CREATE).map_err(|_| missing(dir))?;
    let sock = sock_prog
        .attach(&cgroup, mode)
        .map_err(err("attaching sock_create"))?;
    let mut attached = Vec::new();
    for name in [CONNECT4, CONNECT6] {
        let p: &mut CgroupSockAddr = program(ebpf, name).map_err(|_| missing(dir))?;
        match p.attach(&cgroup, mode) {
            Ok(link) => attached.push((name, link)),
            Err(source) => {
                for (name, link) in attached {
                    if let Ok(p) = program::<CgroupSockAddr>(ebpf, name) {
                        let _ = p.detach(link);
                    }
                }
                if let Ok(p) = program::<CgroupSock>(ebpf, SOCK_CREATE) {
                    let _ = p.detach(sock);
                }
                return Err(Error::Deny {
                    path: dir.to_path_buf(),
                    what: "attaching connect",
                    source,
                });
            }
        }
    }
    let mut links = attached.into_iter().map(|(_, l)| l);
    let (connect4, connect6) = (links.next().expect("two"), links.next().expect("two"));
    Ok(DenyLinks {
        sock,
        connect4,
        connect6,
    })
}

fn missing(dir: &Path) -> Error {
    // start() checked every program, so this only happens if the object changed under us.
    Error::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::other("BPF program missing"),
    }
}

impl Watch {
    /// The cgroup id being counted.
    pub fn cgroup_id(&self) -> u64 {
        self.cgroup_id
    }

    /// The watched cgroup directory.
    pub fn cgroup_dir(&self) -> &Path {
        &self.dir
    }

    /// Whether network denial is attached to the cgroup.
    pub fn denies_network(&self) -> bool {
        self.deny.is_some()
    }

    /// Reads and clears the cgroup's counters, unregisters it and detaches its network denial. Call it once the function's processes have exited.
    pub fn take(mut self) -> Result<Counters, Error> {
        self.release()
    }

    fn release(&mut self) -> Result<Counters, Error> {
        self.released = true;
        let inner = self.inner.upgrade().ok_or(Error::Stopped)?;
        let mut guard = lock(&inner);
        let state = &mut *guard;
        state.watched.remove(&self.cgroup_id);
        let map_err = |map| move |source| Error::Map { map, source };

        let mut first_err = None;
        if let Some(links) = self.deny.take() {
            first_err = detach_deny(&mut state.ebpf, &self.dir, links).err();
        }
        let stats = state.stats.get(&self.cgroup_id, 0).map_err(map_err(STATS));
        let _ = state.stats.remove(&self.cgroup_id);
        let mut by_pid = BTreeMap::new();
        let keys: Vec<PidKey> = state
            .pid_faults
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.cgroup_id == self.cgroup_id)
            .collect();
        for k in keys {
            match state.pid_faults.get(&k, 0) {
                Ok(n) => {
                    by_pid.insert(k.tgid, n);
                }
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(PID_FAULTS)(e)),
            }
            let _ = state.pid_faults.remove(&k);
        }
        let stats = stats?;
        if let Some(e) = first_err {
            return Err(e);
        }
        Ok(Counters::from_stats(&stats, by_pid))
    }
}

fn detach_deny(ebpf: &mut Ebpf, dir: &Path, links: DenyLinks) -> Result<(), Error> {
    let err = |what| {
        move |source| Error::Deny {
            path: dir.to_path_buf(),
            what,
            source,
        }
    };
    let mut result = Ok(());
    match program::<CgroupSock>(ebpf, SOCK_CREATE) {
        Ok(p) => result = result.and(p.detach(links.sock).map_err(err("detaching sock_create"))),
        Err(_) => result = Err(missing(dir)),
    }
    for (name, link) in [(CONNECT4, links.connect4), (CONNECT6, links.connect6)] {
        match program::<CgroupSockAddr>(ebpf, name) {
            Ok(p) => result = result.and(p.detach(link).map_err(err("detaching connect"))),
            Err(_) => result = Err(missing(dir)),
        }
    }
    result
}

impl Drop for Watch {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        match self.release() {
            Ok(_) | Err(Error::Stopped) => {}
            Err(e) => log::warn!("releasing the watch of {}: {e}", self.dir.display()),
        }
    }
}

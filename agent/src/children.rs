//! The agent's live function processes, so that stopping the agent kills and reaps them all.

use std::collections::HashSet;
use std::sync::Mutex;

static LIVE: Mutex<Option<HashSet<i32>>> = Mutex::new(None);

/// Notes a started worker (its pid is also its process group).
pub fn register(pid: i32) {
    LIVE.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(HashSet::new).insert(pid);
}

/// Forgets a reaped worker.
pub fn unregister(pid: i32) {
    if let Some(s) = LIVE.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        s.remove(&pid);
    }
}

/// Kills every live worker's process group (their waiters reap them).
pub fn kill_all() -> usize {
    let pids: Vec<i32> = LIVE.lock().unwrap_or_else(|e| e.into_inner()).iter().flatten().copied().collect();
    for &p in &pids {
        // SAFETY: kill has no memory effects; each group is one of our workers.
        unsafe { libc::kill(-p, libc::SIGKILL) };
    }
    pids.len()
}

/// Number of live workers.
pub fn count() -> usize {
    LIVE.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map_or(0, HashSet::len)
}

/// Pids of the live workers.
pub fn pids() -> Vec<i32> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner()).iter().flatten().copied().collect()
}

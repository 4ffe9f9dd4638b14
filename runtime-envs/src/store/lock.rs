//! Build-once locking: a named lock held across threads of this process (a set of held names
//! and a condition variable) and across processes (`flock` on `root/.locks/NAME`).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};

use nix::fcntl::{Flock, FlockArg};

use super::StoreError;

/// The names held by this process.
#[derive(Default)]
pub struct Locks {
    held: Mutex<HashSet<String>>,
    released: Condvar,
}

/// A held lock; dropping it releases both levels.
pub struct Guard {
    locks: Arc<Locks>,
    name: String,
    _file: Flock<File>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        // The flock goes with `_file` after this; waiters of this process re-check the set.
        let mut held = self.locks.held.lock().unwrap_or_else(|e| e.into_inner());
        held.remove(&self.name);
        self.locks.released.notify_all();
    }
}

/// How `acquire` goes about a lock someone else holds.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Block until it is free.
    Block,
    /// Give up at once.
    Try,
}

impl Locks {
    /// Takes the lock `name`, whose file lives in `dir`. `contended` runs once if the lock is
    /// held elsewhere and this call is going to wait. `Ok(None)` when `Wait::Try` finds it held.
    pub fn acquire(
        self: &Arc<Self>,
        dir: &std::path::Path,
        name: &str,
        wait: Wait,
        contended: &mut dyn FnMut(),
    ) -> Result<Option<Guard>, StoreError> {
        let mut told = false;
        {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            while held.contains(name) {
                if wait == Wait::Try {
                    return Ok(None);
                }
                if !told {
                    contended();
                    told = true;
                }
                held = self.released.wait(held).unwrap_or_else(|e| e.into_inner());
            }
            held.insert(name.to_string());
        }
        // From here on the name is ours within this process; release it if the flock fails.
        let release = |locks: &Arc<Locks>| {
            let mut held = locks.held.lock().unwrap_or_else(|e| e.into_inner());
            held.remove(name);
            locks.released.notify_all();
        };
        let path: PathBuf = dir.join(name);
        let file = match OpenOptions::new().create(true).truncate(false).write(true).open(&path) {
            Ok(f) => f,
            Err(e) => {
                release(self);
                return Err(StoreError::Io { context: format!("opening {}", path.display()), source: e });
            }
        };
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
                if wait == Wait::Try {
                    release(self);
                    return Ok(None);
                }
                if !told {
                    contended();
                }
                match Flock::lock(file, FlockArg::LockExclusive) {
                    Ok(f) => f,
                    Err((_, errno)) => {
                        release(self);
                        return Err(StoreError::Io {
                            context: format!("locking {}", path.display()),
                            source: errno.into(),
                        });
                    }
                }
            }
            Err((_, errno)) => {
                release(self);
                return Err(StoreError::Io { context: format!("locking {}", path.display()), source: errno.into() });
            }
        };
        Ok(Some(Guard { locks: Arc::clone(self), name: name.to_string(), _file: file }))
    }
}

//! The C ABI a Python zygote calls through ctypes (`libquiver_sandbox.so`), in a freshly forked
//! child:
//!
//! ```text
//! quiver_sandbox_enter_namespaces(cgroup_fds, n, net_fd)   // net_fd < 0: keep the network
//! pid = os.fork()          // parent: waitpid and os._exit with the child's status
//! quiver_sandbox_confine(spec_json)                         // child: pid 1 of the namespace
//! ```
//!
//! Each returns 0, or -1 with the reason in `quiver_sandbox_last_error()`.

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_int};
use std::os::fd::BorrowedFd;

use crate::spec::Spec;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn fail(msg: String) -> c_int {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
    -1
}

/// Step 1 of [`crate::enter`]; `cgroup_fds` points to `n` open `cgroup.procs` files.
///
/// # Safety
/// `cgroup_fds` must point to `n` readable `c_int`s (or be null with `n == 0`), each an open fd.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn quiver_sandbox_enter_namespaces(cgroup_fds: *const c_int, n: usize, net_fd: c_int) -> c_int {
    let fds: &[c_int] = if n == 0 || cgroup_fds.is_null() {
        &[]
    } else {
        // SAFETY: the caller promises `n` ints at `cgroup_fds`.
        unsafe { std::slice::from_raw_parts(cgroup_fds, n) }
    };
    // SAFETY: the caller promises the fds are open for the duration of the call.
    let procs: Vec<BorrowedFd<'_>> = fds.iter().map(|&f| unsafe { BorrowedFd::borrow_raw(f) }).collect();
    // SAFETY: as above, for the network namespace fd.
    let net = (net_fd >= 0).then(|| unsafe { BorrowedFd::borrow_raw(net_fd) });
    match crate::enter_namespaces(&procs, net) {
        Ok(()) => 0,
        Err(e) => fail(e.to_string()),
    }
}

/// Step 2 of [`crate::enter`], with the [`Spec`] as JSON. Returns 0 (landlock enforced), 1
/// (confined, but this kernel has no landlock) or -1.
///
/// # Safety
/// `spec_json` must be a valid NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn quiver_sandbox_confine(spec_json: *const c_char) -> c_int {
    if spec_json.is_null() {
        return fail("null spec".into());
    }
    // SAFETY: the caller promises a NUL-terminated string.
    let text = unsafe { CStr::from_ptr(spec_json) }.to_string_lossy();
    let spec: Spec = match serde_json::from_str(&text) {
        Ok(s) => s,
        Err(e) => return fail(format!("bad sandbox spec: {e}")),
    };
    match crate::confine(&spec) {
        Ok(c) if c.landlock => 0,
        Ok(_) => 1,
        Err(e) => fail(e.to_string()),
    }
}

/// The last error of this thread, valid until its next failing call.
#[unsafe(no_mangle)]
pub extern "C" fn quiver_sandbox_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

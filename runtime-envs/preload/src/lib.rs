//! `libquiver_preload.so`: loaded with `LD_PRELOAD` into function processes (and into the
//! zygotes they are forked from), it is the process's C allocator and the C ABI the Python
//! function harness calls through `ctypes`.
//!
//! **Allocator.** Every entry point of the `malloc` family is defined here and forwarded to
//! [`quiver_shm::cmalloc`]. Until [`quiver_arena_enable`] is called everything goes to glibc, so
//! a zygote that never enables it pays one atomic load per call. Once enabled (in the function
//! process itself, after `fork`), allocations of at least the threshold are served page-aligned
//! from the process's own memfd arena: pyarrow (with `ARROW_DEFAULT_MEMORY_POOL=system`) and
//! numpy then build their output buffers in shareable memory, and the SIPC writer references
//! them instead of copying.
//!
//! **Harness ABI** (see [`abi`]): JSON messages and SIPC tables over the agent's
//! `SOCK_SEQPACKET` socket, tables crossing into and out of pyarrow through the Arrow C stream
//! interface without a copy.

pub mod abi;

use std::ffi::c_void;

use quiver_shm::cmalloc;

/// C `malloc`.
///
/// # Safety
/// As C's `malloc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
    // SAFETY: same contract.
    unsafe { cmalloc::malloc(size) }
}

/// C `free`.
///
/// # Safety
/// As C's `free`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn free(ptr: *mut c_void) {
    // SAFETY: same contract.
    unsafe { cmalloc::free(ptr) }
}

/// C `realloc`.
///
/// # Safety
/// As C's `realloc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: same contract.
    unsafe { cmalloc::realloc(ptr, size) }
}

/// C `calloc`.
///
/// # Safety
/// As C's `calloc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    // SAFETY: same contract.
    unsafe { cmalloc::calloc(n, size) }
}

/// C `posix_memalign`.
///
/// # Safety
/// As C's `posix_memalign`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> libc::c_int {
    // SAFETY: same contract.
    unsafe { cmalloc::posix_memalign(out, align, size) }
}

/// C `aligned_alloc`.
///
/// # Safety
/// As C's `aligned_alloc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    // SAFETY: same contract as memalign, which glibc's aligned_alloc also is.
    unsafe { cmalloc::memalign(align, size) }
}

/// C `memalign`.
///
/// # Safety
/// As C's `memalign`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    // SAFETY: same contract.
    unsafe { cmalloc::memalign(align, size) }
}

/// C `valloc`: page-aligned.
///
/// # Safety
/// As C's `valloc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn valloc(size: usize) -> *mut c_void {
    // SAFETY: same contract as memalign with a page alignment.
    unsafe { cmalloc::memalign(page(), size) }
}

/// C `pvalloc`: page-aligned, the size rounded up to whole pages.
///
/// # Safety
/// As C's `pvalloc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pvalloc(size: usize) -> *mut c_void {
    let Some(size) = size.max(1).checked_next_multiple_of(page()) else {
        return std::ptr::null_mut();
    };
    // SAFETY: same contract as memalign with a page alignment.
    unsafe { cmalloc::memalign(page(), size) }
}

/// C `malloc_usable_size`.
///
/// # Safety
/// As C's `malloc_usable_size`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn malloc_usable_size(ptr: *mut c_void) -> usize {
    // SAFETY: same contract.
    unsafe { cmalloc::malloc_usable_size(ptr) }
}

fn page() -> usize {
    quiver_shm::mapping::page_size()
}

/// Turns the arena on for this process: allocations of at least `threshold_bytes` (0: the
/// `QUIVER_ARENA_THRESHOLD` environment variable, else 64 KiB) come from a fresh memfd arena
/// of this process. Call it in the function process, never in a zygote (a forked child must
/// enable its own). Returns 0, or -1 when this library is not the process's allocator (it was
/// loaded without `LD_PRELOAD`): outputs are then copied, and counted as such.
#[unsafe(no_mangle)]
pub extern "C" fn quiver_arena_enable(threshold_bytes: usize) -> libc::c_int {
    if !is_process_allocator() {
        abi::set_error("libquiver_preload.so is not the process's allocator (load it with LD_PRELOAD)".into());
        return -1;
    }
    cmalloc::enable_process_arena(threshold_bytes);
    0
}

/// Whether the `malloc` the process resolves is this library's. Taking `malloc`'s address here
/// would go through the same resolution, so compare the objects the two addresses lie in.
fn is_process_allocator() -> bool {
    // SAFETY: dlsym with a static, NUL-terminated name.
    let active = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"malloc".as_ptr()) };
    let base = |addr: *const libc::c_void| {
        // SAFETY: Dl_info is plain data; dladdr only writes it.
        let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
        // SAFETY: dladdr accepts any address and fills info when it lies in a loaded object.
        (unsafe { libc::dladdr(addr, &mut info) } != 0).then_some(info.dli_fbase)
    };
    let ours = base(quiver_arena_enable as *const libc::c_void);
    !active.is_null() && ours.is_some() && base(active) == ours
}

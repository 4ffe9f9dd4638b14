//! Physical frame numbers behind a virtual range, from `/proc/self/pagemap`: how tests prove
//! that two processes see the very same memory rather than equal copies.
//!
//! Without `CAP_SYS_ADMIN` the kernel reports frame numbers as zero; [`frames`] then fails with
//! a clear error instead of returning meaningless zeros.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::error::{Result, ShmError};
use crate::mapping::page_size;

const PRESENT: u64 = 1 << 63;
const PFN_MASK: u64 = (1 << 55) - 1;

/// Frame numbers of every page of `[ptr, ptr+len)`; each page is read first so it is present.
pub fn frames(ptr: *const u8, len: usize) -> Result<Vec<u64>> {
    let page = page_size();
    let start = ptr as usize / page * page;
    let end = (ptr as usize + len).div_ceil(page) * page;
    let f = File::open("/proc/self/pagemap").map_err(|source| ShmError::Fd { call: "open /proc/self/pagemap", source })?;
    let mut out = Vec::with_capacity((end - start) / page);
    for addr in (start..end).step_by(page) {
        let probe = addr.max(ptr as usize);
        // SAFETY: the caller hands us a readable range; reading one byte faults the page in.
        unsafe { std::ptr::read_volatile(probe as *const u8) };
        let mut e = [0u8; 8];
        f.read_exact_at(&mut e, (addr / page * 8) as u64)
            .map_err(|source| ShmError::Fd { call: "read /proc/self/pagemap", source })?;
        let e = u64::from_le_bytes(e);
        if e & PRESENT == 0 {
            return Err(ShmError::Layout(format!("page at {addr:#x} is not present")));
        }
        let pfn = e & PFN_MASK;
        if pfn == 0 {
            return Err(ShmError::Layout("pagemap hides frame numbers (needs CAP_SYS_ADMIN, run as root)".into()));
        }
        out.push(pfn);
    }
    Ok(out)
}

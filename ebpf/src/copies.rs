//! Where the copy meter's uprobes go.
//!
//! glibc's `memcpy`, `memmove` and `mempcpy` are IFUNCs: the symbol is a resolver that picks an
//! implementation for this CPU (`__memmove_avx512_unaligned_erms`, `__memmove_avx_unaligned_erms`,
//! ...), and a probe on the symbol would catch the resolver, not the copies. The dynamic linker
//! resolves IFUNCs the same way for every process using this libc on this machine, and `dlsym`
//! returns the resolved implementation, so asking our own process gives the addresses every
//! function process will call. libc is stripped, so this needs no symbol table.
//!
//! The `_chk` variants (`__memcpy_chk`, `__memmove_chk`, `__mempcpy_chk`) need no probe of their
//! own: glibc's x86-64 implementations compare the sizes and fall through into the plain entry
//! right after them, and the generic ones call it, so a probe on each plain entry counts every
//! call once. `mempcpy` jumps past `memmove`'s entry and so gets its own probe.

use std::ffi::{CStr, CString, c_int, c_void};
use std::path::PathBuf;

use crate::Unavailable;

/// The entry points probed, each resolved through its IFUNC.
const ENTRIES: [&str; 3] = ["memcpy", "memmove", "mempcpy"];

/// One probed implementation: the symbols that resolve to it and its offset in the library file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyProbe {
    /// The public names whose IFUNC resolves here (e.g. `["memcpy", "memmove"]`).
    pub symbols: Vec<&'static str>,
    /// Offset of the implementation's first instruction in the library file.
    pub file_offset: u64,
}

/// The library the copy meter probes and the implementations it probes in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyProbes {
    /// The glibc file (as the dynamic linker loaded it).
    pub library: PathBuf,
    /// The distinct implementations, one uprobe each.
    pub probes: Vec<CopyProbe>,
}

/// Resolves the implementations this CPU uses.
pub(crate) fn resolve() -> Result<CopyProbes, Unavailable> {
    // SAFETY: the name is a valid C string; RTLD_NOLOAD only returns a handle to an object
    // that is already loaded (libc, which this process links against) and never runs its code.
    let handle = unsafe { libc::dlopen(c"libc.so.6".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if handle.is_null() {
        return Err(Unavailable::Libc(
            "libc.so.6 is not loaded (not a glibc system?)".into(),
        ));
    }
    let mut library: Option<PathBuf> = None;
    let mut probes: Vec<CopyProbe> = Vec::new();
    for name in ENTRIES {
        let cname = CString::new(name).expect("no NUL in symbol names");
        // SAFETY: handle is a live dlopen handle and cname a valid C string; for an IFUNC dlsym
        // runs glibc's own resolver, which only reads the CPU features.
        let addr = unsafe { libc::dlsym(handle, cname.as_ptr()) };
        if addr.is_null() {
            return Err(Unavailable::Libc(format!("dlsym({name}) found nothing")));
        }
        let (path, file_offset) = file_offset(addr as usize)
            .ok_or_else(|| Unavailable::Libc(format!("{name} at {addr:p} is in no loaded file")))?;
        match &library {
            Some(l) if *l != path => {
                return Err(Unavailable::Libc(format!(
                    "{name} resolves into {}, not {}",
                    path.display(),
                    l.display()
                )));
            }
            _ => library = Some(path),
        }
        match probes.iter_mut().find(|p| p.file_offset == file_offset) {
            Some(p) => p.symbols.push(name),
            None => probes.push(CopyProbe {
                symbols: vec![name],
                file_offset,
            }),
        }
    }
    // SAFETY: the handle came from dlopen above; closing it drops the reference NOLOAD took.
    unsafe { libc::dlclose(handle) };
    Ok(CopyProbes {
        library: library.expect("ENTRIES is not empty"),
        probes,
    })
}

struct Search {
    addr: usize,
    found: Option<(PathBuf, u64)>,
}

/// The file holding the code at `addr` and the address's offset in it, from the program headers
/// of the loaded objects.
fn file_offset(addr: usize) -> Option<(PathBuf, u64)> {
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: dl_iterate_phdr passes a valid info for the duration of the call, and data is
        // the &mut Search given below, not aliased while the iteration runs.
        let (info, search) = unsafe { (&*info, &mut *(data as *mut Search)) };
        if info.dlpi_phdr.is_null() {
            return 0;
        }
        // SAFETY: dlpi_phdr points to dlpi_phnum program headers of a loaded object.
        let phdrs = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
        for ph in phdrs {
            if ph.p_type != libc::PT_LOAD || ph.p_flags & libc::PF_X == 0 {
                continue;
            }
            let start = info.dlpi_addr as usize + ph.p_vaddr as usize;
            if (start..start + ph.p_memsz as usize).contains(&search.addr) {
                let offset = (search.addr - start) as u64 + ph.p_offset;
                let name = if info.dlpi_name.is_null() {
                    PathBuf::new()
                } else {
                    // SAFETY: dlpi_name is a NUL-terminated string owned by the dynamic linker.
                    let s = unsafe { CStr::from_ptr(info.dlpi_name) };
                    PathBuf::from(s.to_string_lossy().into_owned())
                };
                search.found = Some((name, offset));
                return 1;
            }
        }
        0
    }
    let mut search = Search { addr, found: None };
    // SAFETY: visit matches the callback signature and only touches `search` through `data`,
    // which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(visit), &mut search as *mut Search as *mut c_void) };
    search.found.filter(|(p, _)| p.is_absolute())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_into_libc() {
        let p = resolve().expect("glibc");
        assert!(p.library.to_string_lossy().contains("libc.so"), "{p:?}");
        assert!(!p.probes.is_empty() && p.probes.len() <= ENTRIES.len());
        assert!(p.probes.iter().any(|c| c.symbols.contains(&"memcpy")));
    }
}

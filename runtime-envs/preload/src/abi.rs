//! The C ABI of the Python harness, called through `ctypes`. Every function returns 0 on
//! success and -1 on failure, with the reason in [`quiver_last_error`]; none panics across the
//! boundary (a panic is caught and reported as an error).
//!
//! Messages use quiver-shm's transport framing (docs/sipc.md, "Transport"); tables are SIPC,
//! read with full validation (the sender is another, untrusted process) and handed to pyarrow
//! through the Arrow C stream interface, so the buffers pyarrow sees are the read-only
//! mappings of the sender's sealed segments.

use std::cell::RefCell;
use std::ffi::{CString, c_char, c_int};
use std::os::fd::{BorrowedFd, RawFd};
use std::panic::AssertUnwindSafe;

use arrow_array::RecordBatchIterator;
use arrow_array::ffi_stream::{FFI_ArrowArrayStream, RecordBatchStreamReader};
use quiver_shm::sipc::{ReadOptions, TableWriter, read_table};
use quiver_shm::transport::{self, RecvLimits};

/// Largest JSON message accepted (the agent's limit too).
const MAX_MESSAGE: usize = 16 << 20;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records `msg` as this thread's last error.
pub(crate) fn set_error(msg: String) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs `f`, turning an error or a panic into -1 and the last error.
fn guard(f: impl FnOnce() -> Result<(), String>) -> c_int {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            set_error(e);
            -1
        }
        Err(_) => {
            set_error("internal error (panic) in libquiver_preload".into());
            -1
        }
    }
}

fn sock<'a>(fd: c_int) -> Result<BorrowedFd<'a>, String> {
    if fd < 0 {
        return Err(format!("bad socket fd {fd}"));
    }
    // SAFETY: the caller owns fd and keeps it open for the duration of the call.
    Ok(unsafe { BorrowedFd::borrow_raw(fd as RawFd) })
}

/// The reason the last call on this thread failed (empty if none did). Valid until the next
/// failing call on this thread.
#[unsafe(no_mangle)]
pub extern "C" fn quiver_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Receives one JSON message (no fds) into a fresh buffer `*out` of `*len` bytes, which the
/// caller frees with [`quiver_free`].
///
/// # Safety
/// `out` and `len` are valid for one write each.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn quiver_recv_json(fd: c_int, out: *mut *mut u8, len: *mut usize) -> c_int {
    guard(|| {
        if out.is_null() || len.is_null() {
            return Err("null out pointer".into());
        }
        let limits = RecvLimits { max_descriptor_bytes: MAX_MESSAGE, max_fds: 0 };
        let (bytes, _) = transport::recv(sock(fd)?, &limits).map_err(|e| e.to_string())?;
        let n = bytes.len();
        // SAFETY: a plain allocation of n bytes (at least 1), freed by quiver_free.
        let buf = unsafe { libc::malloc(n.max(1)) } as *mut u8;
        if buf.is_null() {
            return Err(format!("out of memory for a {n}-byte message"));
        }
        // SAFETY: buf has room for n bytes; out and len are valid per the contract.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf, n);
            out.write(buf);
            len.write(n);
        }
        Ok(())
    })
}

/// Frees a buffer returned by [`quiver_recv_json`].
///
/// # Safety
/// `ptr` is null or a buffer from `quiver_recv_json`, freed once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn quiver_free(ptr: *mut u8) {
    // SAFETY: per the contract it came from libc::malloc.
    unsafe { libc::free(ptr.cast()) }
}

/// Sends `len` bytes at `data` as one message (no fds).
///
/// # Safety
/// `data` is valid for `len` bytes of reads.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn quiver_send_json(fd: c_int, data: *const u8, len: usize) -> c_int {
    guard(|| {
        if data.is_null() && len > 0 {
            return Err("null data".into());
        }
        let bytes = if len == 0 {
            &[][..]
        } else {
            // SAFETY: per the contract data points to len readable bytes.
            unsafe { std::slice::from_raw_parts(data, len) }
        };
        transport::send(sock(fd)?, bytes, &[]).map_err(|e| e.to_string())
    })
}

/// Receives one SIPC table, validates it fully and exports it into `*out` as an Arrow C
/// stream (import it with `pyarrow.RecordBatchReader._import_from_c`). The mappings live as
/// long as the importer holds any of the buffers.
///
/// # Safety
/// `out` is valid for writing one `ArrowArrayStream` (whatever it held is overwritten, not
/// released).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn quiver_recv_table(fd: c_int, out: *mut FFI_ArrowArrayStream) -> c_int {
    guard(|| {
        if out.is_null() {
            return Err("null stream pointer".into());
        }
        let (bytes, fds) = transport::recv(sock(fd)?, &RecvLimits::default()).map_err(|e| e.to_string())?;
        let read = read_table(&bytes, fds, &ReadOptions::default()).map_err(|e| format!("input table: {e}"))?;
        let reader = RecordBatchIterator::new(read.batches.into_iter().map(Ok), read.schema);
        let stream = FFI_ArrowArrayStream::new(Box::new(reader));
        // SAFETY: out is valid for one write per the contract.
        unsafe { out.write(stream) };
        Ok(())
    })
}

/// Takes the Arrow C stream at `stream` (it is released here, whatever happens), writes its
/// batches as one SIPC table (buffers in this process's arena or in received segments are
/// referenced, the rest copied), then sends the reply `{"Table": {"rows", "bytes":
/// {"referenced", "copied"}}}` and the table. The counts go to `referenced` and `copied` when
/// they are not null.
///
/// Writing seals the arena chunks the table references: memory the process still writes to
/// must not share them, so call this last and exit right after.
///
/// # Safety
/// `stream` points to a valid, unreleased `ArrowArrayStream`; `referenced` and `copied` are
/// null or valid for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn quiver_send_table(
    fd: c_int,
    stream: *mut FFI_ArrowArrayStream,
    referenced: *mut u64,
    copied: *mut u64,
) -> c_int {
    guard(|| {
        if stream.is_null() {
            return Err("null stream pointer".into());
        }
        // SAFETY: per the contract a valid stream; from_raw moves it out and leaves it released.
        let reader = unsafe { RecordBatchStreamReader::from_raw(stream) }.map_err(|e| format!("output stream: {e}"))?;
        let schema = arrow_array::RecordBatchReader::schema(&reader);
        let mut w = TableWriter::new(schema);
        let mut rows = 0u64;
        for b in reader {
            let b = b.map_err(|e| format!("output batch: {e}"))?;
            rows += b.num_rows() as u64;
            w.write(&b).map_err(|e| format!("writing the output: {e}"))?;
        }
        let table = w.finish().map_err(|e| format!("writing the output: {e}"))?;
        let (r, c) = (table.stats.bytes_referenced, table.stats.bytes_copied);
        let reply = format!(r#"{{"Table":{{"rows":{rows},"bytes":{{"referenced":{r},"copied":{c}}}}}}}"#);
        let s = sock(fd)?;
        transport::send(s, reply.as_bytes(), &[]).map_err(|e| e.to_string())?;
        transport::send_table(s, &table).map_err(|e| e.to_string())?;
        // SAFETY: null or valid for one write, per the contract.
        unsafe {
            if let Some(p) = referenced.as_mut() {
                *p = r;
            }
            if let Some(p) = copied.as_mut() {
                *p = c;
            }
        }
        Ok(())
    })
}

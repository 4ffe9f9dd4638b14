//! DuckDB in quiver: an in-memory database whose views read Arrow tables in place.
//!
//! DuckDB's own Arrow scan reads a view's Arrow buffers where they lie (0 bytes copied for
//! fixed-width columns). duckdb-rs's `arrow()` table function copies every vector, and DuckDB
//! 2.0's `duckdb_arrow_scan` applies pushed-down projections to the wrong columns, so neither is
//! used: a small C++ shim (shim/arrow_scan.cpp) registers a scan without pushdown that asks for
//! a fresh stream each time the view is scanned.

use std::ffi::{CStr, CString, c_char, c_void};
use std::ptr;

use arrow_array::ffi_stream::FFI_ArrowArrayStream;
use arrow_array::{RecordBatch, RecordBatchIterator};
use arrow_schema::SchemaRef;
use duckdb::{Connection, ffi};

/// Why DuckDB could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("DuckDB: {0}")]
pub struct DuckError(pub String);

type ProduceFn = unsafe extern "C" fn(*mut c_void, *mut FFI_ArrowArrayStream);
type FreeFn = unsafe extern "C" fn(*mut c_void);

unsafe extern "C" {
    /// shim/arrow_scan.cpp: creates or replaces a view over `table`; takes ownership of it.
    fn quiver_register_arrow(
        con: ffi::duckdb_connection,
        view: *const c_char,
        table: *mut c_void,
        produce: ProduceFn,
        free_table: FreeFn,
        err: *mut c_char,
        err_len: usize,
    ) -> ffi::duckdb_state;
}

/// What DuckDB holds for a view: the batches (their buffers stay in the mapped segments).
struct Table {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
}

/// Called by DuckDB, on its threads, each time it scans the view.
unsafe extern "C" fn produce(table: *mut c_void, out: *mut FFI_ArrowArrayStream) {
    // SAFETY: `table` is the Box<Table> handed over in `register`, alive until `free_table`.
    let t = unsafe { &*(table as *const Table) };
    // Cloning batches clones Arc'd buffers, not their bytes.
    let reader = RecordBatchIterator::new(t.batches.clone().into_iter().map(Ok), t.schema.clone());
    // SAFETY: `out` points to an uninitialised stream struct DuckDB owns and later releases.
    unsafe { ptr::write(out, FFI_ArrowArrayStream::new(Box::new(reader))) };
}

/// Called by DuckDB when the view goes.
unsafe extern "C" fn free_table(table: *mut c_void) {
    // SAFETY: `table` came from Box::into_raw in `register` and is freed exactly once.
    drop(unsafe { Box::from_raw(table as *mut Table) });
}

/// A database and one raw connection on it (`quiver_register_arrow` needs one; duckdb-rs keeps
/// its own connection handle private).
pub struct Db {
    db: ffi::duckdb_database,
    con: ffi::duckdb_connection,
}

impl Db {
    /// An in-memory database with one connection.
    pub fn open() -> Result<Db, DuckError> {
        let mut db: ffi::duckdb_database = ptr::null_mut();
        // SAFETY: a null path opens an in-memory database; db is an out-parameter.
        if unsafe { ffi::duckdb_open(ptr::null(), &mut db) } != ffi::DuckDBSuccess {
            return Err(DuckError("opening the database failed".into()));
        }
        let mut con: ffi::duckdb_connection = ptr::null_mut();
        // SAFETY: db was just opened; con is an out-parameter.
        if unsafe { ffi::duckdb_connect(db, &mut con) } != ffi::DuckDBSuccess {
            // SAFETY: db is open and nothing else uses it.
            unsafe { ffi::duckdb_close(&mut db) };
            return Err(DuckError("connecting failed".into()));
        }
        Ok(Db { db, con })
    }

    /// Creates or replaces view `name` over the batches, read in place.
    pub fn register(&self, name: &str, schema: SchemaRef, batches: Vec<RecordBatch>) -> Result<(), DuckError> {
        let view = CString::new(name).map_err(|e| DuckError(e.to_string()))?;
        let table = Box::into_raw(Box::new(Table { schema, batches }));
        let mut err = [0 as c_char; 512];
        // SAFETY: the connection is open; ownership of `table` passes to the shim, which frees
        // it through `free_table` (also on failure); `err` is a writable buffer of its length.
        let rc = unsafe {
            quiver_register_arrow(self.con, view.as_ptr(), table.cast(), produce, free_table, err.as_mut_ptr(), err.len())
        };
        if rc != ffi::DuckDBSuccess {
            // SAFETY: the shim NUL-terminates whatever it wrote into err.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
            return Err(DuckError(format!("registering {name}: {msg}")));
        }
        Ok(())
    }

    /// A duckdb-rs connection to the same database (it does not close the database on drop);
    /// drop it before the `Db`.
    pub fn connection(&self) -> Result<Connection, DuckError> {
        // SAFETY: self.db is open; callers drop their connections before the Db (documented).
        unsafe { Connection::open_from_raw(self.db) }.map_err(|e| DuckError(e.to_string()))
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        // SAFETY: both handles are open and ours; every duckdb-rs connection is gone. Closing
        // the database drops the views, which frees their tables.
        unsafe {
            ffi::duckdb_disconnect(&mut self.con);
            ffi::duckdb_close(&mut self.db);
        }
    }
}


//! DuckDB in quiver: an in-memory database whose views read Arrow tables in place.
//!
//! DuckDB's own Arrow scan reads a view's Arrow buffers where they lie (0 bytes copied for
//! fixed-width columns). duckdb-rs's `arrow()` table function copies every vector, and DuckDB
//! 2.0's `duckdb_arrow_scan` applies pushed-down projections to the wrong columns, so neither is
//! used: a small C++ shim (shim/arrow_scan.cpp) registers a scan without pushdown that asks for
//! a fresh stream each time the view is scanned.
//!
//! Results leave through [`Db::query_arrow`]: DuckDB's chunks are fetched first, then a second
//! shim (shim/arrow_export.cpp) converts a batch of them with DuckDB's Arrow appender inside an
//! arena malloc scope, so the buffers it allocates are already shareable.

use std::ffi::{CStr, CString, c_char, c_void};
use std::ptr;
use std::sync::Arc;

use arrow_array::ffi::{FFI_ArrowArray, FFI_ArrowSchema};
use arrow_array::ffi_stream::FFI_ArrowArrayStream;
use arrow_array::{RecordBatch, RecordBatchIterator, StructArray};
use arrow_schema::{Schema, SchemaRef};
use duckdb::{Connection, ffi};
use quiver_shm::Arena;

/// Why DuckDB could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("DuckDB: {0}")]
pub struct DuckError(pub String);

/// Why a query failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The query's own fault: syntax, binding, a runtime error while executing it.
    #[error("{0}")]
    Sql(String),
    /// Handing the result over failed.
    #[error("DuckDB: {0}")]
    Export(String),
}

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

    /// shim/arrow_export.cpp: converts `n` chunks of one result into one struct array.
    fn quiver_chunks_to_arrow(
        options: ffi::duckdb_arrow_options,
        chunks: *mut ffi::duckdb_data_chunk,
        n: usize,
        out: *mut FFI_ArrowArray,
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

    /// Runs one SQL statement and returns its result as Arrow batches of `batch_rows` rows (the
    /// last may be shorter). With an arena, each batch is converted inside its malloc scope, so
    /// the batches' buffers are arena memory; DuckDB's holders of them live there too, which is
    /// why such batches must not be released once their chunks are sealed (see the SQL worker).
    pub fn query_arrow(
        &self,
        sql: &str,
        batch_rows: usize,
        arena: Option<&Arena>,
    ) -> Result<(SchemaRef, Vec<RecordBatch>), QueryError> {
        let export = |what: &str| QueryError::Export(what.to_owned());
        let csql = CString::new(sql).map_err(|_| QueryError::Sql("the query contains a NUL byte".into()))?;
        let mut stmt = Prepared(ptr::null_mut());
        // SAFETY: the connection is open; stmt is an out-parameter, destroyed by its guard.
        if unsafe { ffi::duckdb_prepare(self.con, csql.as_ptr(), &mut stmt.0) } != ffi::DuckDBSuccess {
            // SAFETY: a failed prepare still yields a statement whose error string lives with it.
            return Err(QueryError::Sql(unsafe { message(ffi::duckdb_prepare_error(stmt.0)) }));
        }
        // SAFETY: duckdb_result is a plain C struct that DuckDB fills in.
        let mut res = ResultGuard(unsafe { std::mem::zeroed() });
        // SAFETY: stmt is prepared; res is an out-parameter, destroyed by its guard.
        if unsafe { ffi::duckdb_execute_prepared_streaming(stmt.0, &mut res.0) } != ffi::DuckDBSuccess {
            // SAFETY: the failed result carries its error message.
            return Err(QueryError::Sql(unsafe { message(ffi::duckdb_result_error(&mut res.0)) }));
        }
        // SAFETY: res holds a successful result.
        let options = Options(unsafe { ffi::duckdb_result_get_arrow_options(&mut res.0) });
        let ffi_schema = res.arrow_schema(&options)?;
        let schema = Arc::new(Schema::try_from(&ffi_schema).map_err(|e| export(&e.to_string()))?);
        let mut batches = Vec::new();
        loop {
            let chunks = res.fetch(batch_rows)?;
            if chunks.0.is_empty() {
                break;
            }
            let mut array = FFI_ArrowArray::empty();
            let mut err = [0 as c_char; 512];
            let mut convert = || {
                // SAFETY: the chunks are live chunks of this result; `array` is an empty struct
                // the shim fills in and hands over; `err` is a writable buffer of its length.
                unsafe {
                    quiver_chunks_to_arrow(options.0, chunks.0.as_ptr().cast_mut(), chunks.0.len(), &mut array, err.as_mut_ptr(), err.len())
                }
            };
            let rc = match arena {
                Some(a) => a.malloc_scope(convert),
                None => convert(),
            };
            drop(chunks);
            if rc != ffi::DuckDBSuccess {
                // SAFETY: the shim NUL-terminates what it wrote; err starts zeroed.
                return Err(QueryError::Export(unsafe { message(err.as_ptr()) }));
            }
            // SAFETY: `array` is a valid struct array exported by DuckDB for this schema.
            let data = unsafe { arrow_array::ffi::from_ffi(array, &ffi_schema) }.map_err(|e| export(&e.to_string()))?;
            let (_, columns, _) = StructArray::from(data).into_parts();
            batches.push(RecordBatch::try_new(schema.clone(), columns).map_err(|e| export(&e.to_string()))?);
        }
        Ok((schema, batches))
    }

    /// A duckdb-rs connection to the same database (it does not close the database on drop);
    /// drop it before the `Db`.
    pub fn connection(&self) -> Result<Connection, DuckError> {
        // SAFETY: self.db is open; callers drop their connections before the Db (documented).
        unsafe { Connection::open_from_raw(self.db) }.map_err(|e| DuckError(e.to_string()))
    }
}

/// A C string DuckDB owns, or a placeholder.
///
/// # Safety
/// `p` is null or a NUL-terminated string alive for the call.
unsafe fn message(p: *const c_char) -> String {
    if p.is_null() {
        return "unknown error".into();
    }
    // SAFETY: as the caller promises.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// A prepared statement, destroyed on drop (also after a failed prepare, as DuckDB asks).
struct Prepared(ffi::duckdb_prepared_statement);

impl Drop for Prepared {
    fn drop(&mut self) {
        // SAFETY: ours; destroying a null statement is a no-op.
        unsafe { ffi::duckdb_destroy_prepare(&mut self.0) };
    }
}

/// Arrow options of a result.
struct Options(ffi::duckdb_arrow_options);

impl Drop for Options {
    fn drop(&mut self) {
        // SAFETY: ours, destroyed once.
        unsafe { ffi::duckdb_destroy_arrow_options(&mut self.0) };
    }
}

/// Data chunks fetched from a result, destroyed on drop.
struct Chunks(Vec<ffi::duckdb_data_chunk>);

impl Drop for Chunks {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // SAFETY: each chunk came from duckdb_fetch_chunk and is destroyed once.
            unsafe { ffi::duckdb_destroy_data_chunk(c) };
        }
    }
}

/// A (streaming) query result, destroyed on drop.
struct ResultGuard(ffi::duckdb_result);

impl ResultGuard {
    /// The result's schema, as an Arrow struct schema.
    fn arrow_schema(&mut self, options: &Options) -> Result<FFI_ArrowSchema, QueryError> {
        // SAFETY: the result succeeded; column types are destroyed below, names live with it.
        let n = unsafe { ffi::duckdb_column_count(&mut self.0) };
        let mut types: Vec<ffi::duckdb_logical_type> = Vec::with_capacity(n as usize);
        let mut names: Vec<*const c_char> = Vec::with_capacity(n as usize);
        for i in 0..n {
            // SAFETY: i < column count.
            unsafe {
                types.push(ffi::duckdb_column_logical_type(&mut self.0, i));
                names.push(ffi::duckdb_column_name(&mut self.0, i));
            }
        }
        let mut schema = FFI_ArrowSchema::empty();
        // SAFETY: types and names hold n entries; the schema is an empty struct DuckDB fills in
        // (arrow-rs's FFI struct has the C layout DuckDB's ArrowSchema has).
        let err = unsafe {
            ffi::duckdb_to_arrow_schema(options.0, types.as_mut_ptr(), names.as_mut_ptr(), n, (&mut schema as *mut FFI_ArrowSchema).cast())
        };
        for t in &mut types {
            // SAFETY: each type came from duckdb_column_logical_type and is destroyed once.
            unsafe { ffi::duckdb_destroy_logical_type(t) };
        }
        // SAFETY: err is null or an error object we own.
        unsafe { check(err) }.map_err(QueryError::Export)?;
        Ok(schema)
    }

    /// Chunks holding at least `rows` rows, fewer at the end, none when the result is done.
    fn fetch(&mut self, rows: usize) -> Result<Chunks, QueryError> {
        let mut out = Chunks(Vec::new());
        let mut have = 0usize;
        while have < rows.max(1) {
            // SAFETY: fetching from a live result; the chunk is ours (destroyed by `out`).
            let c = unsafe { ffi::duckdb_fetch_chunk(self.0) };
            if c.is_null() {
                // SAFETY: the result carries its error message, if any.
                let e = unsafe { ffi::duckdb_result_error(&mut self.0) };
                if !e.is_null() {
                    // SAFETY: e is a NUL-terminated string owned by the result.
                    return Err(QueryError::Sql(unsafe { message(e) }));
                }
                break;
            }
            // SAFETY: c is a live chunk.
            let n = unsafe { ffi::duckdb_data_chunk_get_size(c) } as usize;
            if n == 0 {
                // An empty chunk marks the end; it converts to nothing.
                drop(Chunks(vec![c]));
                break;
            }
            out.0.push(c);
            have += n;
        }
        Ok(out)
    }
}

impl Drop for ResultGuard {
    fn drop(&mut self) {
        // SAFETY: ours; destroying a zeroed or failed result is allowed.
        unsafe { ffi::duckdb_destroy_result(&mut self.0) };
    }
}

/// Turns a DuckDB error object into a message, destroying it.
///
/// # Safety
/// `e` is null or an error object the caller owns.
unsafe fn check(mut e: ffi::duckdb_error_data) -> Result<(), String> {
    if e.is_null() {
        return Ok(());
    }
    // SAFETY: e is a live error object; its message lives until it is destroyed below.
    let r = unsafe {
        if ffi::duckdb_error_data_has_error(e) { Err(message(ffi::duckdb_error_data_message(e))) } else { Ok(()) }
    };
    // SAFETY: ours, destroyed once.
    unsafe { ffi::duckdb_destroy_error_data(&mut e) };
    r
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


//! The sql function: DuckDB over the parents' tables, each a view read in place (see
//! `crate::duck`), its result converted to Arrow inside the node's arena so it leaves without a
//! copy.

use quiver_shm::Arena;
use quiver_shm::sipc::SipcRead;

use super::{Output, WorkError};
use crate::duck::{Db, QueryError};

/// Rows per output batch: large enough that every buffer is one allocation per column, small
/// enough that a consumer's scan has batches for all its threads.
pub const BATCH_ROWS: usize = 1 << 17;

pub fn run(sql: &str, inputs: &[(String, SipcRead)]) -> Result<Output, WorkError> {
    let arena = Arena::named("sql");
    let db = Db::open().map_err(WorkError::system)?;
    for (name, t) in inputs {
        db.register(name, t.schema.clone(), t.batches.clone()).map_err(WorkError::system)?;
    }
    let (schema, batches) = db.query_arrow(sql, BATCH_ROWS, Some(&arena)).map_err(|e| match e {
        QueryError::Sql(m) => WorkError::User(format!("SQL: {m}")),
        e => WorkError::system(e),
    })?;
    drop(db);
    Ok(Output::Table(batches, schema))
}

//! The sql function: DuckDB over the parents' tables, each a view read in place (see
//! `crate::duck`).

use quiver_shm::sipc::SipcRead;

use super::{Output, WorkError};
use crate::duck::Db;

pub fn run(sql: &str, inputs: &[(String, SipcRead)]) -> Result<Output, WorkError> {
    let db = Db::open().map_err(WorkError::system)?;
    for (name, t) in inputs {
        db.register(name, t.schema.clone(), t.batches.clone()).map_err(WorkError::system)?;
    }
    let out = {
        let conn = db.connection().map_err(WorkError::system)?;
        let mut stmt = conn.prepare(sql).map_err(|e| WorkError::User(format!("SQL: {e}")))?;
        let arrow = stmt.stream_arrow([]).map_err(|e| WorkError::User(format!("SQL: {e}")))?;
        let schema = arrow.get_schema();
        let batches = arrow.collect::<Result<Vec<_>, _>>().map_err(|e| WorkError::User(format!("SQL: {e}")))?;
        Output::Table(batches, schema)
    };
    drop(db);
    Ok(out)
}

//! The copying edge (`"edges": "ipc"`): an output encoded as an Arrow IPC stream and decoded
//! again into fresh arena memory, the two copies a pipeline that passes tables through IPC
//! streams pays per edge. The decoded batches are then handed on like any other.

use arrow_array::RecordBatch;
use arrow_ipc::reader::StreamReader;
use arrow_ipc::writer::StreamWriter;
use arrow_schema::SchemaRef;
use quiver_shm::{Arena, ShmError};

/// The batches, copied through an IPC stream, and the bytes copied.
pub fn copy(batches: &[RecordBatch], schema: &SchemaRef) -> Result<(Vec<RecordBatch>, u64), ShmError> {
    let err = |e: arrow_schema::ArrowError| ShmError::Protocol(format!("IPC copy: {e}"));
    let mut w = StreamWriter::try_new(Vec::new(), schema).map_err(err)?;
    for b in batches {
        w.write(b).map_err(err)?;
    }
    let stream = w.into_inner().map_err(err)?;
    let arena = Arena::named("ipc");
    // Decoded buffers are Arrow allocations made in the scope: they land in the arena.
    let out = arena.scope(|| {
        StreamReader::try_new(std::io::Cursor::new(&stream), None)
            .map_err(err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)
    })?;
    // Encoding copies every buffer into the stream; decoding copies each message body out of
    // it once (the arrays are slices of that copy).
    Ok((out, 2 * stream.len() as u64))
}

//! The benchmark table: a wide, taxi-like schema of about 575 bytes a row (10M rows is about
//! 5.8 GB, like the 6 GB table of Bauplan's Table 3), built directly in an arena.

use std::sync::Arc;

use anyhow::Result;
use arrow_array::{ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow_buffer::{NullBuffer, OffsetBuffer, ScalarBuffer};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use quiver_shm::Arena;

/// Number of float feature columns that make the table wide.
const FEATURES: usize = 60;

/// The table's schema.
pub fn schema() -> SchemaRef {
    let mut f = vec![
        Field::new("trip_id", DataType::Int64, false),
        Field::new("vendor_id", DataType::Int32, false),
        Field::new("pickup_at", DataType::Timestamp(TimeUnit::Microsecond, None), false),
        Field::new("dropoff_at", DataType::Timestamp(TimeUnit::Microsecond, None), false),
        Field::new("passenger_count", DataType::Int32, false),
        Field::new("trip_distance", DataType::Float64, false),
        Field::new("pu_location_id", DataType::Int32, false),
        Field::new("do_location_id", DataType::Int32, false),
        Field::new("payment_type", DataType::Int32, false),
        Field::new("fare_amount", DataType::Float64, false),
        Field::new("tip_amount", DataType::Float64, true),
        Field::new("total_amount", DataType::Float64, false),
        Field::new("store_and_fwd_flag", DataType::Utf8, false),
        Field::new("country", DataType::Utf8, false),
    ];
    f.extend((0..FEATURES).map(|i| Field::new(format!("f{i:02}"), DataType::Float64, false)));
    Arc::new(Schema::new(f))
}

fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fill<T: arrow_buffer::ArrowNativeType>(arena: &Arena, n: usize, f: impl Fn(u64) -> T, base: u64) -> Result<ScalarBuffer<T>> {
    let mut v = arena.vec::<T>(n)?;
    for (i, x) in v.spare_mut().iter_mut().enumerate() {
        *x = f(base + i as u64);
    }
    v.set_len(n);
    Ok(ScalarBuffer::from(v.finish()))
}

fn strings(arena: &Arena, n: usize, base: u64, pick: impl Fn(u64) -> &'static str) -> Result<ArrayRef> {
    let mut offsets = arena.vec::<i32>(n + 1)?;
    let mut bytes = arena.vec::<u8>(n * 2)?;
    offsets.push(0)?;
    for i in 0..n as u64 {
        bytes.extend_from_slice(pick(base + i).as_bytes())?;
        offsets.push(bytes.len() as i32)?;
    }
    let offsets = OffsetBuffer::new(ScalarBuffer::from(offsets.finish()));
    Ok(Arc::new(StringArray::try_new(offsets, bytes.finish(), None)?))
}

/// One batch of rows `base..base+n`, every buffer in `arena`.
pub fn batch(arena: &Arena, base: u64, n: usize) -> Result<RecordBatch> {
    const T0: i64 = 1_704_067_200_000_000; // 2024-01-01 in microseconds
    let fl = |salt: u64| move |r: u64| (mix(r ^ salt) % 100_000) as f64 / 100.0;
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::new(fill(arena, n, |r| r as i64, base)?, None)),
        Arc::new(Int32Array::new(fill(arena, n, |r| (r % 3) as i32 + 1, base)?, None)),
        Arc::new(TimestampMicrosecondArray::new(fill(arena, n, |r| T0 + r as i64 * 250_000, base)?, None)),
        Arc::new(TimestampMicrosecondArray::new(fill(arena, n, |r| T0 + r as i64 * 250_000 + (mix(r) % 3_600_000_000) as i64, base)?, None)),
        Arc::new(Int32Array::new(fill(arena, n, |r| (mix(r ^ 1) % 6) as i32 + 1, base)?, None)),
        Arc::new(Float64Array::new(fill(arena, n, fl(2), base)?, None)),
        Arc::new(Int32Array::new(fill(arena, n, |r| (mix(r ^ 3) % 265) as i32 + 1, base)?, None)),
        Arc::new(Int32Array::new(fill(arena, n, |r| (mix(r ^ 4) % 265) as i32 + 1, base)?, None)),
        Arc::new(Int32Array::new(fill(arena, n, |r| (mix(r ^ 5) % 5) as i32 + 1, base)?, None)),
        Arc::new(Float64Array::new(fill(arena, n, fl(6), base)?, None)),
    ];
    let mut valid = arena.vec::<u8>(n.div_ceil(8))?;
    for (i, b) in valid.spare_mut().iter_mut().enumerate() {
        // Every 17th tip is missing.
        *b = (0..8).fold(0u8, |acc, bit| acc | (u8::from(!(base + (i * 8 + bit) as u64).is_multiple_of(17)) << bit));
    }
    valid.set_len(n.div_ceil(8));
    let nulls = NullBuffer::new(arrow_buffer::BooleanBuffer::new(valid.finish(), 0, n));
    cols.push(Arc::new(Float64Array::new(fill(arena, n, fl(7), base)?, Some(nulls))));
    cols.push(Arc::new(Float64Array::new(fill(arena, n, fl(8), base)?, None)));
    cols.push(strings(arena, n, base, |r| if mix(r ^ 9).is_multiple_of(20) { "Y" } else { "N" })?);
    cols.push(strings(arena, n, base, |r| ["IT", "FR", "DE", "ES", "US", "GB"][(mix(r ^ 10) % 6) as usize])?);
    for k in 0..FEATURES as u64 {
        cols.push(Arc::new(Float64Array::new(fill(arena, n, fl(100 + k), base)?, None)));
    }
    Ok(RecordBatch::try_new(schema(), cols)?)
}

/// The whole table as batches of `batch_rows` rows.
pub fn build(arena: &Arena, rows: u64, batch_rows: usize) -> Result<Vec<RecordBatch>> {
    let mut out = Vec::new();
    let mut base = 0;
    while base < rows {
        let n = (rows - base).min(batch_rows as u64) as usize;
        out.push(batch(arena, base, n)?);
        base += n as u64;
    }
    Ok(out)
}

/// Bytes of all buffers of the table.
pub fn bytes(batches: &[RecordBatch]) -> u64 {
    batches.iter().flat_map(|b| b.columns()).map(|c| c.get_buffer_memory_size() as u64).sum()
}

//! A full scan: read every value of every column once, as a consumer would, and fold it into
//! a checksum so both sides can prove they saw the same table.

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int32Type, Int64Type, TimestampMicrosecondType};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, TimeUnit};

/// Folds every value of every column into one number, independent of how rows are split into
/// batches (float values are summed as bit patterns, which is associative).
pub fn checksum(batches: &[RecordBatch]) -> u64 {
    let width = batches.first().map_or(0, |b| b.num_columns());
    let mut per_col = vec![0u64; width];
    for b in batches {
        for (i, c) in b.columns().iter().enumerate() {
            let s = match c.data_type() {
                DataType::Int64 => c.as_primitive::<Int64Type>().values().iter().fold(0i64, |a, &v| a.wrapping_add(v)) as u64,
                DataType::Int32 => c.as_primitive::<Int32Type>().values().iter().fold(0i64, |a, &v| a.wrapping_add(v as i64)) as u64,
                DataType::Timestamp(TimeUnit::Microsecond, _) => c
                    .as_primitive::<TimestampMicrosecondType>()
                    .values()
                    .iter()
                    .fold(0i64, |a, &v| a.wrapping_add(v)) as u64,
                // Values under nulls are unspecified (a decoder may zero them): skip them.
                DataType::Float64 if c.null_count() > 0 => {
                    c.as_primitive::<Float64Type>().iter().flatten().fold(0u64, |a, v| a.wrapping_add(v.to_bits()))
                }
                DataType::Float64 => c.as_primitive::<Float64Type>().values().iter().fold(0u64, |a, &v| a.wrapping_add(v.to_bits())),
                DataType::Utf8 => {
                    // Only the bytes the offsets cover: a decoder's values buffer may hold more.
                    let a = c.as_string::<i32>();
                    let o = a.value_offsets();
                    let (lo, hi) = (o[0] as usize, o[o.len() - 1] as usize);
                    a.values()[lo..hi].iter().fold(0u64, |a, &v| a.wrapping_add(v as u64))
                }
                other => panic!("scan does not cover {other}"),
            };
            let nulls = c.logical_null_count() as u64;
            per_col[i] = per_col[i].wrapping_add(s).wrapping_add(nulls << 40);
        }
    }
    per_col.iter().fold(0u64, |h, &c| h.rotate_left(7) ^ c)
}

//! `quiver example taxi`: deterministic synthetic NYC-taxi-like trips as Parquet, for the
//! example project, the tests and the benchmarks. The same flags give the same bytes.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

/// Rows per file.
pub const ROWS_PER_FILE: u64 = 1 << 20;
/// Rows per row group (so scans can prune by statistics).
pub const ROWS_PER_GROUP: usize = 128 * 1024;
/// Roughly the Parquet bytes per row, to turn a size into a row count.
pub const BYTES_PER_ROW: u64 = 32;

/// The trips schema.
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("trip_id", DataType::Int64, false),
        Field::new("pickup_at", DataType::Timestamp(TimeUnit::Microsecond, None), false),
        Field::new("dropoff_at", DataType::Timestamp(TimeUnit::Microsecond, None), false),
        Field::new("pickup_location_id", DataType::Int32, false),
        Field::new("dropoff_location_id", DataType::Int32, false),
        Field::new("passenger_count", DataType::Int32, false),
        Field::new("trip_distance", DataType::Float64, false),
        Field::new("fare_amount", DataType::Float64, false),
        Field::new("tip_amount", DataType::Float64, true),
        Field::new("payment_type", DataType::Utf8, false),
        Field::new("country", DataType::Utf8, false),
    ]))
}

fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Rows `start..start+n` of the trips table.
pub fn batch(start: u64, n: usize) -> RecordBatch {
    const T0: i64 = 1_704_067_200_000_000; // 2024-01-01
    let ids = start..start + n as u64;
    let col = |f: &dyn Fn(u64) -> f64| Float64Array::from_iter_values(ids.clone().map(f));
    let cents = |r: u64, salt: u64, max: u64| (mix(r ^ salt) % max) as f64 / 100.0;
    // Zone popularity is skewed, as in the real data: a few zones see most pickups.
    let zone = |r: u64, salt: u64| {
        let u = mix(r ^ salt) % 10_000;
        (if u < 6_000 { u % 40 } else { u % 265 }) as i32 + 1
    };
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(ids.clone().map(|r| r as i64))),
        Arc::new(TimestampMicrosecondArray::from_iter_values(ids.clone().map(|r| T0 + r as i64 * 30_000_000))),
        Arc::new(TimestampMicrosecondArray::from_iter_values(
            ids.clone().map(|r| T0 + r as i64 * 30_000_000 + 60_000_000 + (mix(r) % 3_600) as i64 * 1_000_000),
        )),
        Arc::new(Int32Array::from_iter_values(ids.clone().map(|r| zone(r, 1)))),
        Arc::new(Int32Array::from_iter_values(ids.clone().map(|r| zone(r, 2)))),
        Arc::new(Int32Array::from_iter_values(ids.clone().map(|r| (mix(r ^ 3) % 6) as i32 + 1))),
        Arc::new(col(&|r| cents(r, 4, 3_000))),
        Arc::new(col(&|r| 3.0 + cents(r, 5, 8_000))),
        Arc::new(Float64Array::from_iter(ids.clone().map(|r| (r % 11 != 0).then(|| cents(r, 6, 1_500))))),
        Arc::new(StringArray::from_iter_values(ids.clone().map(|r| ["card", "cash", "card", "card", "dispute"][(mix(r ^ 7) % 5) as usize]))),
        Arc::new(StringArray::from_iter_values(ids.map(|r| ["IT", "FR", "DE", "ES", "US", "GB"][(mix(r ^ 8) % 6) as usize]))),
    ];
    RecordBatch::try_new(schema(), cols).expect("columns match the schema")
}

/// Writes `rows` trips into `out` as `trips-NNNN.parquet` files.
pub fn generate(out: &Path, rows: u64) -> anyhow::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(out)?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(ROWS_PER_GROUP))
        .build();
    let mut files = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while start < rows {
        let n = (rows - start).min(ROWS_PER_FILE);
        let path = out.join(format!("trips-{i:04}.parquet"));
        let tmp = out.join(format!(".trips-{i:04}.parquet.tmp"));
        let mut w = ArrowWriter::try_new(File::create(&tmp)?, schema(), Some(props.clone()))?;
        let mut done = 0;
        while done < n {
            let m = (n - done).min(ROWS_PER_GROUP as u64) as usize;
            w.write(&batch(start + done, m))?;
            done += m as u64;
        }
        w.close()?;
        std::fs::rename(&tmp, &path)?;
        files.push(path);
        start += n;
        i += 1;
    }
    Ok(files)
}

/// Parses `1GB`, `200MB`, `5000rows` or a plain row count into rows.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let num = |v: &str| v.trim().parse::<f64>().map_err(|_| format!("bad size {s:?}: use e.g. 1GB, 200MB or 100000rows"));
    let rows = if let Some(v) = t.strip_suffix("rows") {
        num(v)?
    } else if let Some(v) = t.strip_suffix("gb") {
        num(v)? * 1e9 / BYTES_PER_ROW as f64
    } else if let Some(v) = t.strip_suffix("mb") {
        num(v)? * 1e6 / BYTES_PER_ROW as f64
    } else {
        num(&t)?
    };
    if !(1.0..=1e11).contains(&rows) {
        return Err(format!("size {s:?} is out of range"));
    }
    Ok(rows as u64)
}

//! Fuzzes the SIPC reader with arbitrary descriptors against real sealed segments: whatever
//! the bytes, `read_table` returns a table or an error, never a panic or a bad memory access.
#![no_main]

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, OnceLock};

use arrow_array::builder::{ListBuilder, Int32Builder, StringDictionaryBuilder};
use arrow_array::types::Int32Type;
use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray, StringViewArray, StructArray, UnionArray};
use arrow_buffer::ScalarBuffer;
use arrow_schema::{DataType, Field, UnionFields};
use libfuzzer_sys::fuzz_target;
use quiver_shm::sipc::{ReadOptions, SipcTable, TableWriter, read_table};

fn table() -> SipcTable {
    let ints: ArrayRef = Arc::new(Int64Array::from_iter((0..300).map(|i| (i % 5 != 0).then_some(i))));
    let strs: ArrayRef = Arc::new(StringArray::from_iter((0..300).map(|i| (i % 7 != 0).then(|| format!("s{i}")))));
    let views: ArrayRef = Arc::new(StringViewArray::from_iter_values((0..300).map(|i| format!("a longer view string {i}"))));
    let mut lb = ListBuilder::new(Int32Builder::new());
    for i in 0..300 {
        for j in 0..(i % 4) {
            lb.values().append_value(j);
        }
        lb.append(i % 9 != 0);
    }
    let lists: ArrayRef = Arc::new(lb.finish());
    let mut db = StringDictionaryBuilder::<Int32Type>::new();
    for i in 0..300 {
        db.append_value(["x", "y", "z"][i % 3]);
    }
    let dict: ArrayRef = Arc::new(db.finish());
    let st: ArrayRef = Arc::new(StructArray::from(vec![
        (Arc::new(Field::new("a", DataType::Int64, true)), ints.clone()),
        (Arc::new(Field::new("b", DataType::Utf8, true)), strs.clone()),
    ]));
    let uf = UnionFields::try_new(vec![0, 1], vec![Field::new("i", DataType::Int64, true), Field::new("s", DataType::Utf8, true)]).unwrap();
    let ids: ScalarBuffer<i8> = (0..300).map(|i| (i % 2) as i8).collect();
    let offs: ScalarBuffer<i32> = (0..300).map(|i| i / 2).collect();
    let union: ArrayRef = Arc::new(
        UnionArray::try_new(uf, ids, Some(offs), vec![ints.slice(0, 150), strs.slice(0, 150)]).unwrap(),
    );
    let b = RecordBatch::try_from_iter([
        ("ints", ints),
        ("strs", strs),
        ("views", views),
        ("lists", lists),
        ("dict", dict),
        ("st", st),
        ("union", union),
    ])
    .unwrap();
    let mut w = TableWriter::new(b.schema());
    w.write(&b.slice(0, 100)).unwrap();
    w.write(&b.slice(100, 200)).unwrap();
    w.finish().unwrap()
}

static TABLE: OnceLock<SipcTable> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let t = TABLE.get_or_init(|| {
        let t = table();
        // Seed the corpus with the valid descriptor, so mutations start from real structure.
        let dir = std::path::Path::new("corpus/descriptor");
        if dir.is_dir() {
            let _ = std::fs::write(dir.join("valid-table"), &t.descriptor);
        }
        t
    });
    let fds: Vec<OwnedFd> = t.segments.iter().map(|s| s.as_fd().try_clone_to_owned().unwrap()).collect();
    if let Ok(read) = read_table(data, fds, &ReadOptions::default()) {
        // Touch every value so a bad reference would fault here.
        for b in &read.batches {
            for c in b.columns() {
                let _ = format!("{:?}", c.slice(0, c.len().min(3)));
                let _ = c.to_data().get_array_memory_size();
            }
        }
    }
});

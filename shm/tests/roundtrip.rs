//! Round trip through two processes: random schemas (every type, nesting, nulls, slices,
//! dictionaries shared across batches) written here, read and written back by `sipc-peer`,
//! read again here, must equal the input.

mod common;

use std::sync::Arc;

use arrow_array::RecordBatch;
use common::Peer;
use common::arrays::{any_type, batch, leaf_types};
use proptest::prelude::*;
use quiver_shm::sipc::TableWriter;

fn roundtrip(peer: &Peer, batches: &[RecordBatch]) {
    let schema = batches[0].schema();
    let mut w = TableWriter::new(schema.clone());
    for b in batches {
        w.write(b).expect("write");
    }
    let table = w.finish().expect("finish");
    let back = peer.echo(&table).expect("peer read the table");
    assert_eq!(back.schema, schema);
    assert_eq!(back.batches.len(), batches.len());
    for (a, b) in batches.iter().zip(&back.batches) {
        assert_eq!(a, b);
    }
}

/// Splits a batch into two slices (non-zero offsets), which share every buffer, dictionaries
/// included.
fn sliced(b: &RecordBatch, cut: usize) -> Vec<RecordBatch> {
    let cut = cut.min(b.num_rows());
    vec![b.slice(0, cut), b.slice(cut, b.num_rows() - cut)]
}

#[test]
fn every_leaf_type_round_trips() {
    let peer = Peer::spawn("echo");
    for (i, t) in leaf_types().into_iter().enumerate() {
        let b = batch(&[t], 37, i as u64);
        roundtrip(&peer, &sliced(&b, 13));
    }
}

#[test]
fn empty_tables_round_trip() {
    let peer = Peer::spawn("echo");
    let b = batch(&leaf_types(), 0, 1);
    roundtrip(&peer, std::slice::from_ref(&b));
}

#[test]
fn shared_dictionary_is_written_once() {
    let b = batch(&[arrow_schema::DataType::Dictionary(Box::new(arrow_schema::DataType::Int32), Box::new(arrow_schema::DataType::Utf8))], 100, 9);
    let mut w = TableWriter::new(b.schema());
    for part in sliced(&b, 40) {
        w.write(&part).expect("write");
    }
    let t = w.finish().expect("finish");
    let raw = quiver_shm::sipc::RawDescriptor::decode(&t.descriptor, &Default::default()).expect("decode");
    assert_eq!(raw.dictionaries.len(), 1, "both slices reference one dictionary");
    let peer = Peer::spawn("echo");
    let back = peer.echo(&t).expect("read");
    let a = back.batches[0].column(0).to_data();
    let c = back.batches[1].column(0).to_data();
    assert!(a.child_data()[0].ptr_eq(&c.child_data()[0]), "the reader shares it too");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_tables_round_trip(
        types in prop::collection::vec(any_type(), 1..4),
        len in 0usize..60,
        cut in 0usize..60,
        seed in any::<u64>(),
    ) {
        thread_local! { static PEER: Peer = Peer::spawn("echo"); }
        let b = batch(&types, len, seed);
        PEER.with(|p| roundtrip(p, &sliced(&b, cut)));
    }
}

#[test]
fn schema_metadata_survives() {
    let b = batch(&[arrow_schema::DataType::Int64], 5, 3);
    let schema = Arc::new(b.schema().as_ref().clone().with_metadata(std::collections::HashMap::from([("origin".to_string(), "test".to_string())])));
    let b = b.with_schema(schema).expect("same fields");
    roundtrip(&Peer::spawn("echo"), &[b]);
}

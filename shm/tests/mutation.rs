//! Random and mutated descriptors against real segments: the reader returns a table or an
//! error, and never panics or touches memory outside its mappings.

mod common;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::OnceLock;

use common::arrays::{any_type, batch, leaf_types};
use proptest::prelude::*;
use quiver_shm::sipc::{Limits, RawDescriptor, ReadOptions, SipcTable, TableWriter, read_table};

fn tables() -> &'static Vec<SipcTable> {
    static T: OnceLock<Vec<SipcTable>> = OnceLock::new();
    T.get_or_init(|| {
        let mut out = Vec::new();
        let leaves = leaf_types();
        for (i, chunk) in leaves.chunks(6).enumerate() {
            let b = batch(chunk, 40, i as u64);
            let mut w = TableWriter::new(b.schema());
            w.write(&b.slice(0, 15)).expect("write");
            w.write(&b.slice(15, 25)).expect("write");
            out.push(w.finish().expect("finish"));
        }
        out
    })
}

fn fds(t: &SipcTable) -> Vec<OwnedFd> {
    t.segments.iter().map(|s| s.as_fd().try_clone_to_owned().expect("dup")).collect()
}

/// Reads, and touches every value of whatever comes back.
fn read_and_touch(desc: &[u8], t: &SipcTable) {
    if let Ok(r) = read_table(desc, fds(t), &ReadOptions::default()) {
        for b in &r.batches {
            for c in b.columns() {
                let _ = format!("{c:?}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn flipped_bytes_never_panic(which in 0usize..7, flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let t = &tables()[which % tables().len()];
        let mut d = t.descriptor.clone();
        for (at, v) in flips {
            let i = at.index(d.len());
            d[i] ^= v;
        }
        read_and_touch(&d, t);
    }

    #[test]
    fn truncated_or_extended_never_panic(which in 0usize..7, cut in any::<prop::sample::Index>(), extra in prop::collection::vec(any::<u8>(), 0..64)) {
        let t = &tables()[which % tables().len()];
        let mut d = t.descriptor[..cut.index(t.descriptor.len() + 1)].to_vec();
        d.extend(extra);
        read_and_touch(&d, t);
    }

    #[test]
    fn mutated_trees_never_panic(
        which in 0usize..7,
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..8, any::<u64>()), 1..6),
    ) {
        let t = &tables()[which % tables().len()];
        let mut raw = RawDescriptor::decode(&t.descriptor, &Limits::default()).expect("valid");
        for (at, field, v) in edits {
            let n = raw.batches.len();
            let tree = &mut raw.batches[at.index(n)];
            let small = v % 512;
            match field {
                0 => { let i = at.index(tree.nodes.len()); tree.nodes[i].length = small; }
                1 => { let i = at.index(tree.nodes.len()); tree.nodes[i].offset = small; }
                2 => { let i = at.index(tree.nodes.len()); tree.nodes[i].null_count = small; }
                3 => { let i = at.index(tree.nodes.len()); tree.nodes[i].aux = v % 4; }
                4 => { let i = at.index(tree.buffers.len()); tree.buffers[i].offset = small * 8; }
                5 => { let i = at.index(tree.buffers.len()); tree.buffers[i].length = small; }
                6 => { let i = at.index(tree.buffers.len()); tree.buffers[i].segment = (v % 3) as u32; }
                _ => { let i = at.index(tree.nodes.len()); tree.nodes[i].validity_offset = v % 64; }
            }
        }
        read_and_touch(&raw.encode(), t);
    }

    #[test]
    fn random_schemas_with_foreign_trees_never_panic(ty in any_type(), seed in any::<u64>(), which in 0usize..7) {
        // A valid table of one schema, read with the trees of another.
        let b = batch(&[ty], 20, seed);
        let mut w = TableWriter::new(b.schema());
        w.write(&b).expect("write");
        let own = w.finish().expect("finish");
        let other = &tables()[which % tables().len()];
        let mut raw = RawDescriptor::decode(&own.descriptor, &Limits::default()).expect("valid");
        let o = RawDescriptor::decode(&other.descriptor, &Limits::default()).expect("valid");
        raw.batches = o.batches;
        raw.dictionaries = o.dictionaries;
        raw.segment_sizes = o.segment_sizes;
        read_and_touch(&raw.encode(), other);
    }
}

/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * Layouts shared by the BPF programs (quiver.bpf.c) and their loader (ebpf/src/maps.rs, which
 * mirrors them with #[repr(C)]): change both together.
 */
#ifndef QUIVER_BPF_H
#define QUIVER_BPF_H

#include <linux/types.h>

#define QV_HIST_BUCKETS 64

/* Everything counted for one watched cgroup v2, keyed by its id in qv_stats. */
struct qv_stats {
	__u64 page_faults;
	__u64 memcpy_bytes;
	__u64 memcpy_calls;
	__u64 mmaps;
	__u64 mmap_bytes;
	__u64 munmaps;
	__u64 munmap_bytes;
	/* memcpy calls by size: bucket 0 holds size 0, bucket b >= 1 sizes in [2^(b-1), 2^b). */
	__u64 memcpy_hist[QV_HIST_BUCKETS];
};

/* Key of qv_pid_faults: page faults of one process inside a watched cgroup. */
struct qv_pid_key {
	__u64 cgroup_id;
	__u32 tgid;
	__u32 pad;
};

#endif /* QUIVER_BPF_H */

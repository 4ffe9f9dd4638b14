// SPDX-License-Identifier: GPL-2.0
/*
 * quiver's BPF programs: per-cgroup telemetry (page faults, bytes copied by glibc's memcpy
 * family, mmap/munmap) and network denial for function cgroups.
 *
 * Only cgroups the agent registered in qv_stats are counted: every other process on the machine
 * pays one hash lookup per event and nothing else is written.
 */
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>

#include "quiver.h"

#define AF_INET		2
#define AF_INET6	10

/* A program returning 0 from a cgroup sock hook makes the syscall fail with EPERM. */
#define SOCK_DENY	0
#define SOCK_ALLOW	1

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct qv_stats);
} qv_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct qv_pid_key);
	__type(value, __u64);
} qv_pid_faults SEC(".maps");

/* The record of syscalls/sys_enter_{mmap,munmap}: common header, syscall nr, then args. */
struct sys_enter_ctx {
	__u64 common;
	__s32 syscall_nr;
	__u32 pad;
	__u64 addr;
	__u64 len;
};

static __always_inline struct qv_stats *watched(__u64 *cgroup_id)
{
	*cgroup_id = bpf_get_current_cgroup_id();
	return bpf_map_lookup_elem(&qv_stats, cgroup_id);
}

/* Number of significant bits of v (0 for 0), without loops for the verifier. */
static __always_inline __u32 bit_length(__u64 v)
{
	__u32 n = 0;

	if (v >> 32) {
		v >>= 32;
		n += 32;
	}
	if (v >> 16) {
		v >>= 16;
		n += 16;
	}
	if (v >> 8) {
		v >>= 8;
		n += 8;
	}
	if (v >> 4) {
		v >>= 4;
		n += 4;
	}
	if (v >> 2) {
		v >>= 2;
		n += 2;
	}
	if (v >> 1) {
		v >>= 1;
		n += 1;
	}
	return n + (__u32)v;
}

SEC("tracepoint/exceptions/page_fault_user")
int qv_page_fault(void *ctx)
{
	struct qv_pid_key key = {};
	struct qv_stats *stats;
	__u64 one = 1, *count;

	stats = watched(&key.cgroup_id);
	if (!stats)
		return 0;
	__sync_fetch_and_add(&stats->page_faults, 1);

	key.tgid = bpf_get_current_pid_tgid() >> 32;
	count = bpf_map_lookup_elem(&qv_pid_faults, &key);
	if (count) {
		__sync_fetch_and_add(count, 1);
		return 0;
	}
	/* A racing first fault of the same process may win: then add to its entry. */
	if (bpf_map_update_elem(&qv_pid_faults, &key, &one, BPF_NOEXIST)) {
		count = bpf_map_lookup_elem(&qv_pid_faults, &key);
		if (count)
			__sync_fetch_and_add(count, 1);
	}
	return 0;
}

/*
 * Entry of a memcpy/memmove/mempcpy implementation (attached per process by the loader): the
 * size is the third argument, in %rdx.
 */
SEC("uprobe")
int qv_memcpy(struct pt_regs *ctx)
{
	struct qv_stats *stats;
	__u64 cgroup_id, size;
	__u32 bucket;

	stats = watched(&cgroup_id);
	if (!stats)
		return 0;
	size = ctx->rdx;
	bucket = bit_length(size);
	if (bucket >= QV_HIST_BUCKETS)
		bucket = QV_HIST_BUCKETS - 1;
	__sync_fetch_and_add(&stats->memcpy_bytes, size);
	__sync_fetch_and_add(&stats->memcpy_calls, 1);
	__sync_fetch_and_add(&stats->memcpy_hist[bucket], 1);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_mmap")
int qv_mmap(struct sys_enter_ctx *ctx)
{
	struct qv_stats *stats;
	__u64 cgroup_id;

	stats = watched(&cgroup_id);
	if (!stats)
		return 0;
	__sync_fetch_and_add(&stats->mmaps, 1);
	__sync_fetch_and_add(&stats->mmap_bytes, ctx->len);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_munmap")
int qv_munmap(struct sys_enter_ctx *ctx)
{
	struct qv_stats *stats;
	__u64 cgroup_id;

	stats = watched(&cgroup_id);
	if (!stats)
		return 0;
	__sync_fetch_and_add(&stats->munmaps, 1);
	__sync_fetch_and_add(&stats->munmap_bytes, ctx->len);
	return 0;
}

/* Attached to each denied function's cgroup: no IPv4 or IPv6 socket can be created there. */
SEC("cgroup/sock_create")
int qv_sock_create(struct bpf_sock *sk)
{
	if (sk->family == AF_INET || sk->family == AF_INET6)
		return SOCK_DENY;
	return SOCK_ALLOW;
}

/* A second line behind qv_sock_create, for sockets that entered the cgroup already open. */
SEC("cgroup/connect4")
int qv_connect4(struct bpf_sock_addr *ctx)
{
	return SOCK_DENY;
}

SEC("cgroup/connect6")
int qv_connect6(struct bpf_sock_addr *ctx)
{
	return SOCK_DENY;
}

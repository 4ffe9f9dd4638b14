/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * quiver-kzero: move the pages behind a private anonymous range into an
 * in-memory file without copying them.
 *
 * Device ioctls (on /dev/quiver-kzero): NEW_FILE, DEANON, STATS.
 * File ioctls (on an fd returned by NEW_FILE): ADD_SEALS, GET_SEALS.
 */
#ifndef _UAPI_LINUX_QUIVER_KZERO_H
#define _UAPI_LINUX_QUIVER_KZERO_H

#include <linux/ioctl.h>
#include <linux/types.h>

/* fstatfs() f_type of a kzero file: how a reader recognises one. */
#define QUIVER_KZERO_MAGIC		0x717a6b30	/* "qzk0" */

/* NEW_FILE flags. */
#define QUIVER_KZERO_CLOEXEC		(1ULL << 0)

struct quiver_kzero_new_file {
	__u64 flags;	/* in: QUIVER_KZERO_CLOEXEC */
	__u64 fd;	/* out: the new file's descriptor */
};

/*
 * DEANON flags.
 * PRIVATE: the caller's range becomes a private (copy-on-write) mapping of
 *	the file instead of a shared one: later writes by the caller go to
 *	fresh anonymous pages and never reach the file.
 * NO_COPY: refuse (EBUSY) instead of copying pages that are shared with
 *	another process (after fork).
 */
#define QUIVER_KZERO_DEANON_PRIVATE	(1ULL << 0)
#define QUIVER_KZERO_DEANON_NO_COPY	(1ULL << 1)

struct quiver_kzero_deanon {
	__u64 fd;		/* in: a kzero file */
	__u64 addr;		/* in: page aligned */
	__u64 len;		/* in: page aligned, > 0 */
	__u64 flags;		/* in: QUIVER_KZERO_DEANON_* */
	__u64 offset;		/* out: file offset where addr landed */
	__u64 pages_moved;	/* out: pages whose frame did not change */
	__u64 pages_copied;	/* out: pages shared after fork, copied */
	__u64 pages_zeroed;	/* out: never-touched pages, zero-filled */
};

struct quiver_kzero_stats {
	__u64 pages_moved;	/* total moved without a copy */
	__u64 pages_copied;	/* total copied (shared after fork) */
	__u64 pages_zeroed;	/* total zero-filled (never touched) */
	__u64 pages_live;	/* pages held by live files now */
	__u64 files_live;	/* files not yet released */
	__u64 deanon_calls;	/* successful DEANON calls */
};

/* Seal bits, the same values as F_SEAL_* of fcntl(2). */
#define QUIVER_KZERO_SEAL_SEAL		0x0001ULL
#define QUIVER_KZERO_SEAL_SHRINK	0x0002ULL
#define QUIVER_KZERO_SEAL_GROW		0x0004ULL
#define QUIVER_KZERO_SEAL_WRITE		0x0008ULL
#define QUIVER_KZERO_SEAL_ALL		0x000fULL

struct quiver_kzero_seals {
	__u64 seals;	/* ADD_SEALS: in; GET_SEALS: out */
	__u64 size;	/* GET_SEALS: out, the file size in bytes */
};

#define QUIVER_KZERO_IOC_MAGIC		0xb9

#define QUIVER_KZERO_IOC_NEW_FILE \
	_IOWR(QUIVER_KZERO_IOC_MAGIC, 0x01, struct quiver_kzero_new_file)
#define QUIVER_KZERO_IOC_DEANON \
	_IOWR(QUIVER_KZERO_IOC_MAGIC, 0x02, struct quiver_kzero_deanon)
#define QUIVER_KZERO_IOC_STATS \
	_IOWR(QUIVER_KZERO_IOC_MAGIC, 0x03, struct quiver_kzero_stats)
#define QUIVER_KZERO_IOC_ADD_SEALS \
	_IOWR(QUIVER_KZERO_IOC_MAGIC, 0x10, struct quiver_kzero_seals)
#define QUIVER_KZERO_IOC_GET_SEALS \
	_IOWR(QUIVER_KZERO_IOC_MAGIC, 0x11, struct quiver_kzero_seals)

#endif /* _UAPI_LINUX_QUIVER_KZERO_H */

// SPDX-License-Identifier: GPL-2.0
/*
 * Tests of the quiver-kzero module, run as root inside the test VM.
 * `kzero_test [NAME...]` runs the named tests (all without names), each in its
 * own child so a crash fails that test only, and prints `PASS name` or
 * `FAIL name: reason` per test.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../../kmod/include/uapi/linux/quiver_kzero.h"

#define PG 4096UL
#define HUGE (2UL << 20)

static int dev = -1;
static char failure[512];

/* Records why the test failed (the first reason wins) and returns -1. */
static int fail(const char *fmt, ...)
{
	va_list ap;

	if (!failure[0]) {
		va_start(ap, fmt);
		vsnprintf(failure, sizeof(failure), fmt, ap);
		va_end(ap);
	}
	return -1;
}

#define CHECK(cond, ...) do { if (!(cond)) return fail(__VA_ARGS__); } while (0)

static int new_file(void)
{
	struct quiver_kzero_new_file a = { .flags = QUIVER_KZERO_CLOEXEC };

	if (ioctl(dev, QUIVER_KZERO_IOC_NEW_FILE, &a))
		return -1;
	return (int)a.fd;
}

/* DEANON; returns 0 or -errno, filling *out when given. */
static int deanon(int fd, void *addr, size_t len, uint64_t flags,
		  struct quiver_kzero_deanon *out)
{
	struct quiver_kzero_deanon a = {
		.fd = (uint64_t)fd, .addr = (uint64_t)(uintptr_t)addr,
		.len = len, .flags = flags,
	};

	if (ioctl(dev, QUIVER_KZERO_IOC_DEANON, &a))
		return -errno;
	if (out)
		*out = a;
	return 0;
}

static int get_seals(int fd, struct quiver_kzero_seals *s)
{
	return ioctl(fd, QUIVER_KZERO_IOC_GET_SEALS, s) ? -errno : 0;
}

static int add_seals(int fd, uint64_t seals)
{
	struct quiver_kzero_seals s = { .seals = seals };

	return ioctl(fd, QUIVER_KZERO_IOC_ADD_SEALS, &s) ? -errno : 0;
}

static struct quiver_kzero_stats stats(void)
{
	struct quiver_kzero_stats s = {0};

	ioctl(dev, QUIVER_KZERO_IOC_STATS, &s);
	return s;
}

/* Physical frame behind addr (0 when not present). */
static uint64_t pfn(const void *addr)
{
	/* Opened per call: an fd opened before a fork would read the parent. */
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	uint64_t e = 0;
	ssize_t n = pread(fd, &e, 8, (off_t)((uintptr_t)addr / PG) * 8);

	close(fd);
	if (n != 8)
		return 0;
	if (!(e >> 63))
		return 0;
	return e & ((1ULL << 55) - 1);
}

static uint64_t kpageflags(uint64_t frame)
{
	uint64_t f = 0;
	int fd = open("/proc/kpageflags", O_RDONLY | O_CLOEXEC);

	if (fd >= 0) {
		if (pread(fd, &f, 8, (off_t)frame * 8) != 8)
			f = 0;
		close(fd);
	}
	return f;
}

static long meminfo(const char *key)
{
	char line[256];
	long v = -1;
	FILE *f = fopen("/proc/meminfo", "r");

	while (f && fgets(line, sizeof(line), f))
		if (!strncmp(line, key, strlen(key)) && line[strlen(key)] == ':')
			v = atol(line + strlen(key) + 1);
	if (f)
		fclose(f);
	return v;
}

/*
 * Free memory in KiB: MemFree plus the pages waiting in per-CPU free lists
 * (the `count:` lines of /proc/zoneinfo), which MemFree leaves out and which
 * hold freed huge pages too.
 */
static long free_kib(void)
{
	char line[256];
	long pcp = 0;
	FILE *f = fopen("/proc/zoneinfo", "r");

	while (f && fgets(line, sizeof(line), f)) {
		char *c = strstr(line, "count:");

		if (c && strstr(line, "    "))
			pcp += atol(c + 6);
	}
	if (f)
		fclose(f);
	return meminfo("MemFree") + pcp * (long)(PG >> 10);
}

static void *map_anon(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	return p == MAP_FAILED ? NULL : p;
}

/* A 2 MiB aligned anonymous region of len bytes. */
static void *map_anon_huge_aligned(size_t len)
{
	char *p = map_anon(len + HUGE);
	char *a;

	if (!p)
		return NULL;
	a = (char *)(((uintptr_t)p + HUGE - 1) & ~(HUGE - 1));
	if (a > p)
		munmap(p, a - p);
	munmap(a + len, p + len + HUGE - (a + len));
	return a;
}

static void fill(void *p, size_t len, uint64_t seed)
{
	uint64_t *w = p;
	size_t i;

	for (i = 0; i < len / 8; i++)
		w[i] = seed * 0x9E3779B97F4A7C15ULL + i;
}

static int verify(const void *p, size_t len, uint64_t seed)
{
	const uint64_t *w = p;
	size_t i;

	for (i = 0; i < len / 8; i++)
		if (w[i] != seed * 0x9E3779B97F4A7C15ULL + i)
			return fail("byte %zu differs", i * 8);
	return 0;
}

static int frames(const char *p, size_t len, uint64_t *out)
{
	size_t i;

	for (i = 0; i < len / PG; i++) {
		out[i] = pfn(p + i * PG);
		CHECK(out[i], "page %zu not present", i);
	}
	return 0;
}

/* A child process maps the file and checks bytes and frames. */
static int reader_child(int fd, off_t off, size_t len, uint64_t seed,
			const uint64_t *want)
{
	pid_t pid = fork();
	int st;

	if (pid == 0) {
		char *q = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, off);
		size_t i;

		if (q == MAP_FAILED)
			_exit(2);
		if (verify(q, len, seed))
			_exit(3);
		for (i = 0; want && i < len / PG; i++)
			if (pfn(q + i * PG) != want[i])
				_exit(4);
		_exit(0);
	}
	if (pid < 0 || waitpid(pid, &st, 0) != pid)
		return fail("fork/wait");
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0,
	      "reader process failed (status %#x: 2 mmap, 3 bytes, 4 frames)", st);
	return 0;
}

static int t_zero_copy(void)
{
	size_t n = 64, len = n * PG, i;
	uint64_t before[64], after[64];
	struct quiver_kzero_deanon d;
	struct statfs sfs;
	struct stat sb;
	char *p = map_anon(len);
	int fd = new_file(), r;

	CHECK(p && fd >= 0, "setup: %s", strerror(errno));
	CHECK(madvise(p, len, MADV_NOHUGEPAGE) == 0, "madvise");
	fill(p, len, 1);
	if (frames(p, len, before))
		return -1;
	r = deanon(fd, p, len, 0, &d);
	CHECK(r == 0, "DEANON: %s", strerror(-r));
	CHECK(d.offset == 0 && d.pages_moved == n && !d.pages_copied &&
	      !d.pages_zeroed, "offset %llu moved %llu copied %llu zeroed %llu",
	      (unsigned long long)d.offset, (unsigned long long)d.pages_moved,
	      (unsigned long long)d.pages_copied,
	      (unsigned long long)d.pages_zeroed);
	if (verify(p, len, 1) || frames(p, len, after))
		return -1;
	for (i = 0; i < n; i++)
		CHECK(before[i] == after[i], "page %zu: frame %#llx became %#llx",
		      i, (unsigned long long)before[i],
		      (unsigned long long)after[i]);
	CHECK(fstat(fd, &sb) == 0 && S_ISREG(sb.st_mode) &&
	      sb.st_size == (off_t)len, "fstat size %lld",
	      (long long)sb.st_size);
	CHECK(fstatfs(fd, &sfs) == 0 && sfs.f_type == QUIVER_KZERO_MAGIC,
	      "fstatfs f_type %#lx", (long)sfs.f_type);
	if (reader_child(fd, 0, len, 1, before))
		return -1;
	/* The caller's range is a shared mapping now: a write reaches the file. */
	p[5] = 'x';
	{
		char *q = mmap(NULL, PG, PROT_READ, MAP_SHARED, fd, 0);

		CHECK(q != MAP_FAILED && q[5] == 'x', "shared write not seen");
		munmap(q, PG);
	}
	/* A second range is appended behind the first. */
	{
		char *p2 = map_anon(2 * PG);

		fill(p2, 2 * PG, 2);
		r = deanon(fd, p2, 2 * PG, 0, &d);
		CHECK(r == 0 && d.offset == len, "append: %d offset %llu", r,
		      (unsigned long long)d.offset);
		if (reader_child(fd, (off_t)len, 2 * PG, 2, NULL))
			return -1;
		munmap(p2, 2 * PG);
	}
	munmap(p, len);
	close(fd);
	return 0;
}

static int t_private(void)
{
	size_t len = 16 * PG, i;
	struct quiver_kzero_deanon d;
	uint64_t f0, before[16];
	char *p = map_anon(len);
	int fd = new_file(), r;

	CHECK(p && fd >= 0, "setup");
	madvise(p, len, MADV_NOHUGEPAGE);
	fill(p, len, 3);
	if (frames(p, len, before))
		return -1;
	f0 = before[0];
	r = deanon(fd, p, len, QUIVER_KZERO_DEANON_PRIVATE, &d);
	CHECK(r == 0 && d.pages_moved == 16, "DEANON: %d", r);
	/* Mapped at once, before any access, in the same frames. */
	for (i = 0; i < 16; i++)
		CHECK(pfn(p + i * PG) == before[i], "page %zu not mapped to its frame", i);
	CHECK(verify(p, len, 3) == 0, "bytes changed");
	/* Like anonymous memory, a zapped page reads zeros, not the file. */
	CHECK(madvise(p + 8 * PG, 8 * PG, MADV_DONTNEED) == 0, "MADV_DONTNEED: %s",
	      strerror(errno));
	for (i = 8 * PG; i < len; i++)
		CHECK(p[i] == 0, "byte %zu after MADV_DONTNEED not zero", i);
	p[9 * PG] = 42;
	CHECK(p[9 * PG] == 42 && p[9 * PG + 1] == 0, "write after MADV_DONTNEED");
	fill(p + 8 * PG, 8 * PG, 99);
	/* With no writable shared mapping the write seal is allowed... */
	CHECK(add_seals(fd, QUIVER_KZERO_SEAL_ALL) == 0, "seal: %s",
	      strerror(errno));
	/* ...and a write by the caller is copied, the file keeps its bytes. */
	p[0] ^= 0x55;
	CHECK(pfn(p) != f0, "write did not copy the page");
	CHECK(verify(p + 8 * PG, 8 * PG, 99) == 0, "rewritten half lost");
	if (reader_child(fd, 0, len, 3, NULL))
		return -1;
	munmap(p, len);
	close(fd);
	return 0;
}

static int t_untouched(void)
{
	size_t len = 32 * PG, i;
	struct quiver_kzero_deanon d;
	char *p = map_anon(len);
	int fd = new_file(), r;

	CHECK(p && fd >= 0, "setup");
	madvise(p, len, MADV_NOHUGEPAGE);
	p[0] = 1;	/* one touched page, the rest never */
	r = deanon(fd, p, len, 0, &d);
	CHECK(r == 0, "DEANON: %s", strerror(-r));
	CHECK(d.pages_moved == 1 && d.pages_zeroed == 31,
	      "moved %llu zeroed %llu", (unsigned long long)d.pages_moved,
	      (unsigned long long)d.pages_zeroed);
	for (i = 1; i < len; i++)
		CHECK(p[i] == 0, "byte %zu not zero", i);
	CHECK(p[0] == 1, "touched byte lost");
	munmap(p, len);
	close(fd);
	return 0;
}

static int t_thp(void)
{
	size_t len = 2 * HUGE, n = len / PG, i;
	uint64_t *before = calloc(n, 8), *after = calloc(n, 8);
	struct quiver_kzero_deanon d;
	char *p = map_anon_huge_aligned(len);
	int fd = new_file(), r, huge = 0;

	CHECK(p && fd >= 0 && before && after, "setup");
	madvise(p, len, MADV_HUGEPAGE);
	fill(p, len, 4);
	if (frames(p, len, before))
		return -1;
	for (i = 0; i < n; i += 512)
		huge += !!(kpageflags(before[i]) & (1ULL << 22)); /* KPF_THP */
	CHECK(huge > 0, "no transparent huge page to test with");
	/* The whole first huge page and a slice out of the middle of the second. */
	r = deanon(fd, p, HUGE, 0, &d);
	CHECK(r == 0 && d.pages_moved == 512, "whole THP: %d moved %llu", r,
	      (unsigned long long)d.pages_moved);
	r = deanon(fd, p + HUGE + 64 * PG, 16 * PG, 0, &d);
	CHECK(r == 0 && d.pages_moved == 16 && d.offset == HUGE,
	      "partial THP: %d moved %llu", r,
	      (unsigned long long)d.pages_moved);
	if (verify(p, len, 4) || frames(p, len, after))
		return -1;
	for (i = 0; i < n; i++)
		CHECK(before[i] == after[i], "page %zu moved frames", i);
	if (reader_child(fd, 0, HUGE, 4, before))
		return -1;
	munmap(p, len);
	close(fd);
	free(before);
	free(after);
	return 0;
}

static int t_fork_shared(void)
{
	size_t len = 8 * PG;
	struct quiver_kzero_deanon d;
	int fd = new_file(), r, st, go[2];
	char *p = map_anon(len);
	uint64_t f0;
	pid_t pid;

	CHECK(p && fd >= 0 && pipe(go) == 0, "setup");
	madvise(p, len, MADV_NOHUGEPAGE);
	fill(p, len, 5);
	f0 = pfn(p);
	pid = fork();
	if (pid == 0) {
		char c;

		/* Keep the pages COW-shared until the parent is done. */
		close(go[1]);
		if (read(go[0], &c, 1) != 1)
			_exit(2);
		_exit(verify(p, len, 5) ? 3 : 0);
	}
	close(go[0]);
	r = deanon(fd, p, len, QUIVER_KZERO_DEANON_NO_COPY, NULL);
	CHECK(r == -EBUSY, "NO_COPY on shared pages: %d, want EBUSY", r);
	r = deanon(fd, p, len, 0, &d);
	CHECK(r == 0, "DEANON: %s", strerror(-r));
	CHECK(d.pages_copied == 8 && d.pages_moved == 0, "copied %llu moved %llu",
	      (unsigned long long)d.pages_copied,
	      (unsigned long long)d.pages_moved);
	CHECK(pfn(p) != f0 && verify(p, len, 5) == 0, "copy wrong");
	p[0] = 0;	/* must not reach the child */
	CHECK(write(go[1], "g", 1) == 1, "pipe");
	CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) &&
	      WEXITSTATUS(st) == 0, "child saw a change (%#x)", st);
	munmap(p, len);
	close(fd);
	close(go[1]);
	return 0;
}

/* pagemap bit 62: the page is in swap. */
static int swapped(const void *addr)
{
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	uint64_t e = 0;
	ssize_t n = pread(fd, &e, 8, (off_t)((uintptr_t)addr / PG) * 8);

	close(fd);
	return n == 8 && (e >> 62 & 1);
}

static int t_swap(void)
{
	size_t n = 64, len = n * PG, i, out = 0;
	struct quiver_kzero_deanon d;
	char *p = map_anon(len);
	int fd = new_file(), r;

	CHECK(p && fd >= 0, "setup");
	madvise(p, len, MADV_NOHUGEPAGE);
	fill(p, len, 8);
	CHECK(madvise(p, len, 21 /* MADV_PAGEOUT */) == 0, "MADV_PAGEOUT: %s",
	      strerror(errno));
	for (i = 0; i < n; i++)
		out += swapped(p + i * PG);
	CHECK(out >= n / 2, "only %zu of %zu pages went to swap (is swap on?)",
	      out, n);
	r = deanon(fd, p, len, 0, &d);
	CHECK(r == 0, "DEANON: %s", strerror(-r));
	/* Swapped in first, then moved: no copy, nothing zero-filled. */
	CHECK(d.pages_moved == n && !d.pages_copied && !d.pages_zeroed,
	      "moved %llu copied %llu zeroed %llu",
	      (unsigned long long)d.pages_moved,
	      (unsigned long long)d.pages_copied,
	      (unsigned long long)d.pages_zeroed);
	for (i = 0; i < n; i++)
		CHECK(pfn(p + i * PG) && !swapped(p + i * PG),
		      "page %zu not present after DEANON", i);
	if (verify(p, len, 8))
		return -1;
	printf("# swap: %zu of %zu pages were in swap before DEANON\n", out, n);
	munmap(p, len);
	close(fd);
	return 0;
}

static int t_multi_vma(void)
{
	size_t len = 12 * PG, i;
	uint64_t before[12], after[12];
	struct quiver_kzero_deanon d;
	char *p = map_anon(len);
	int fd = new_file(), r;

	CHECK(p && fd >= 0, "setup");
	madvise(p, len, MADV_NOHUGEPAGE);
	fill(p, len, 6);
	/* Three VMAs: read-write, read-only, read-write. */
	CHECK(mprotect(p + 4 * PG, 4 * PG, PROT_READ) == 0, "mprotect");
	if (frames(p, len, before))
		return -1;
	r = deanon(fd, p, len, 0, &d);
	CHECK(r == 0 && d.pages_moved == 12, "DEANON: %d moved %llu", r,
	      (unsigned long long)d.pages_moved);
	if (verify(p, len, 6) || frames(p, len, after))
		return -1;
	for (i = 0; i < 12; i++)
		CHECK(before[i] == after[i], "page %zu moved frames", i);
	{
		/* The read-only part kept its protection. */
		char line[256], want[64];
		int ro = 0;
		FILE *m = fopen("/proc/self/maps", "r");

		snprintf(want, sizeof(want), "%lx-%lx r--s",
			 (unsigned long)(p + 4 * PG), (unsigned long)(p + 8 * PG));
		while (m && fgets(line, sizeof(line), m))
			ro |= !strncmp(line, want, strlen(want));
		if (m)
			fclose(m);
		CHECK(ro, "read-only segment not mapped r--s");
	}
	munmap(p, len);
	close(fd);
	return 0;
}

static int send_fd(int sock, int fd)
{
	char buf[CMSG_SPACE(sizeof(int))] = {0}, b = 0;
	struct iovec io = { .iov_base = &b, .iov_len = 1 };
	struct msghdr m = { .msg_iov = &io, .msg_iovlen = 1,
			    .msg_control = buf, .msg_controllen = sizeof(buf) };
	struct cmsghdr *c = CMSG_FIRSTHDR(&m);

	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &fd, sizeof(int));
	return sendmsg(sock, &m, 0) == 1 ? 0 : -1;
}

static int recv_fd(int sock)
{
	char buf[CMSG_SPACE(sizeof(int))] = {0}, b;
	struct iovec io = { .iov_base = &b, .iov_len = 1 };
	struct msghdr m = { .msg_iov = &io, .msg_iovlen = 1,
			    .msg_control = buf, .msg_controllen = sizeof(buf) };
	struct cmsghdr *c;
	int fd;

	if (recvmsg(sock, &m, 0) != 1)
		return -1;
	c = CMSG_FIRSTHDR(&m);
	if (!c || c->cmsg_type != SCM_RIGHTS)
		return -1;
	memcpy(&fd, CMSG_DATA(c), sizeof(int));
	return fd;
}

static int t_writer_exits(void)
{
	size_t len = 16UL << 20;
	long base, during, after;
	struct quiver_kzero_stats s0 = stats(), s1;
	int sv[2], fd, st;
	char *q;
	pid_t pid;

	CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0, "socketpair");
	sync();
	base = free_kib();
	pid = fork();
	if (pid == 0) {
		char *p = map_anon(len);
		int f = new_file();

		if (!p || f < 0)
			_exit(2);
		fill(p, len, 7);
		if (deanon(f, p, len, 0, NULL))
			_exit(3);
		_exit(send_fd(sv[0], f) ? 4 : 0);
	}
	fd = recv_fd(sv[1]);
	CHECK(fd >= 0, "no fd from the writer");
	CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) &&
	      WEXITSTATUS(st) == 0, "writer failed (%#x)", st);
	/* The writer is gone; its pages are not. */
	q = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
	CHECK(q != MAP_FAILED, "mmap");
	if (verify(q, len, 7))
		return -1;
	during = free_kib();
	s1 = stats();
	CHECK(s1.pages_live - s0.pages_live == len / PG &&
	      s1.files_live - s0.files_live == 1,
	      "the file holds %llu pages, want %zu",
	      (unsigned long long)(s1.pages_live - s0.pages_live), len / PG);
	munmap(q, len);
	close(fd);
	close(sv[0]);
	close(sv[1]);
	after = free_kib();
	s1 = stats();
	printf("# writer_exits: free memory base %ld KiB, mapped %ld, after %ld (diff %ld KiB)\n",
	       base, during, after, base - after);
	CHECK(s1.files_live == s0.files_live && s1.pages_live == s0.pages_live,
	      "files_live %llu pages_live %llu after close",
	      (unsigned long long)s1.files_live,
	      (unsigned long long)s1.pages_live);
	/*
	 * The file's 4096 pages must all come back. What stays out is kernel
	 * bookkeeping that returns to slab caches rather than to the free
	 * lists (its xarray nodes, the socket): 20 to 76 KiB measured.
	 */
	CHECK(base - after <= 256, "free memory %ld KiB below its baseline",
	      base - after);
	return 0;
}

static int t_refusals(void)
{
	size_t len = 8 * PG;
	char *p = map_anon(len), *q;
	int fd = new_file(), mfd, r;
	struct quiver_kzero_deanon a;

	CHECK(p && fd >= 0, "setup");
	memset(p, 1, len);
#define WANT(expr, e) do { r = (expr); \
	CHECK(r == -(e), "%s: got %d (%s), want %s", #expr, r, \
	      strerror(-r), #e); } while (0)
	WANT(deanon(fd, p + 1, PG, 0, NULL), EINVAL);
	WANT(deanon(fd, p, PG + 1, 0, NULL), EINVAL);
	WANT(deanon(fd, p, 0, 0, NULL), EINVAL);
	WANT(deanon(fd, p, len, 1ULL << 40, NULL), EINVAL);
	WANT(deanon(fd, (void *)-PG, 2 * PG, 0, NULL), EOVERFLOW);
	WANT(deanon(fd, (void *)(1UL << 47), PG, 0, NULL), ENOMEM);
	WANT(deanon(-1, p, len, 0, NULL), EBADF);
	WANT(deanon(12345, p, len, 0, NULL), EBADF);
	mfd = memfd_create("foreign", MFD_CLOEXEC);
	WANT(deanon(mfd, p, len, 0, NULL), EINVAL);	/* not one of ours */
	WANT(deanon(dev, p, len, 0, NULL), EINVAL);	/* the device itself */
	/* A hole in the range. */
	CHECK(munmap(p + 2 * PG, PG) == 0, "munmap");
	WANT(deanon(fd, p, 4 * PG, 0, NULL), ENOMEM);
	/* Shared anonymous memory and a file mapping. */
	q = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
		 -1, 0);
	WANT(deanon(fd, q, len, 0, NULL), EINVAL);
	munmap(q, len);
	CHECK(ftruncate(mfd, len) == 0, "ftruncate");
	q = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE, mfd, 0);
	WANT(deanon(fd, q, len, 0, NULL), EINVAL);
	munmap(q, len);
	/* PROT_NONE and mlocked memory. */
	q = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	WANT(deanon(fd, q, len, 0, NULL), EFAULT);
	munmap(q, len);
	q = map_anon(len);
	CHECK(mlock(q, len) == 0, "mlock: %s", strerror(errno));
	WANT(deanon(fd, q, len, 0, NULL), EPERM);
	munlock(q, len);
	/* Pages already pinned by someone else (an io_uring fixed buffer). */
	{
		struct { uint32_t a[10]; uint64_t b[10]; } params;
		struct iovec iov = { .iov_base = q, .iov_len = len };
		int ring;

		memset(&params, 0, sizeof(params));
		memset(q, 2, len);
		ring = syscall(__NR_io_uring_setup, 4, &params);
		CHECK(ring >= 0, "io_uring_setup: %s", strerror(errno));
		CHECK(syscall(__NR_io_uring_register, ring, 0, &iov, 1) == 0,
		      "IORING_REGISTER_BUFFERS: %s", strerror(errno));
		WANT(deanon(fd, q, len, 0, NULL), EBUSY);
		close(ring);
	}
	munmap(q, len);
	/* The same range twice: it is a file mapping now. */
	q = map_anon(len);
	memset(q, 3, len);
	WANT(deanon(fd, q, len, 0, NULL), 0);
	WANT(deanon(fd, q, len, 0, NULL), EINVAL);
	/* Seals: that writable shared mapping blocks the write seal. */
	WANT(add_seals(fd, QUIVER_KZERO_SEAL_WRITE), EBUSY);
	munmap(q, len);
	q = map_anon(len);
	memset(q, 4, len);
	WANT(add_seals(fd, 1ULL << 10), EINVAL);
	WANT(add_seals(fd, QUIVER_KZERO_SEAL_GROW), 0);
	WANT(deanon(fd, q, len, 0, NULL), EPERM);
	CHECK(ftruncate(fd, 0) == -1 && errno == EPERM, "ftruncate allowed");
	CHECK(fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE) == -1 && errno == EINVAL,
	      "fcntl seals work on kzero files?");
	munmap(q, len);
	{
		struct quiver_kzero_seals s;
		int fd2 = new_file();
		char *w = map_anon(len);

		memset(w, 5, len);
		WANT(deanon(fd2, w, len, 0, NULL), 0);
		munmap(w, len);		/* the last writable mapping */
		WANT(add_seals(fd2, QUIVER_KZERO_SEAL_ALL), 0);
		WANT(get_seals(fd2, &s), 0);
		CHECK(s.seals == QUIVER_KZERO_SEAL_ALL && s.size == len,
		      "GET_SEALS %llx size %llu", (unsigned long long)s.seals,
		      (unsigned long long)s.size);
		w = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd2, 0);
		CHECK(w == MAP_FAILED && errno == EPERM,
		      "writable mapping of a sealed file allowed");
		w = mmap(NULL, len, PROT_READ, MAP_SHARED, fd2, 0);
		CHECK(w != MAP_FAILED && w[7] == 5, "read-only mapping refused");
		CHECK(mprotect(w, len, PROT_READ | PROT_WRITE) == -1,
		      "mprotect to writable allowed");
		munmap(w, len);
		WANT(add_seals(fd2, 0), EPERM);		/* F_SEAL_SEAL */
		close(fd2);
	}
	/* A file ioctl on the device and a device ioctl on a file. */
	CHECK(ioctl(dev, QUIVER_KZERO_IOC_GET_SEALS, &a) == -1 &&
	      errno == ENOTTY, "GET_SEALS on the device");
	CHECK(ioctl(fd, QUIVER_KZERO_IOC_DEANON, &a) == -1 && errno == ENOTTY,
	      "DEANON on a file");
	CHECK(ioctl(dev, QUIVER_KZERO_IOC_DEANON, (void *)8) == -1 &&
	      errno == EFAULT, "bad argument pointer");
	close(mfd);
	close(fd);
	return 0;
}

struct stress_arg {
	int cycles;
	int failed;
	char why[128];
};

struct reader_arg {
	int fd;
	size_t len;
	uint64_t seed;
	uint64_t frame0;
	int ok;
};

static void *stress_reader(void *v)
{
	struct reader_arg *r = v;
	char *q = mmap(NULL, r->len, PROT_READ, MAP_SHARED, r->fd, 0);
	const uint64_t *w = (const uint64_t *)q;
	size_t i;

	r->ok = 0;
	if (q == MAP_FAILED)
		return NULL;
	for (i = 0; i < r->len / 8; i++)
		if (w[i] != r->seed * 0x9E3779B97F4A7C15ULL + i)
			goto out;
	r->ok = pfn(q) == r->frame0;
out:
	munmap(q, r->len);
	return NULL;
}

static void *stress_writer(void *v)
{
	struct stress_arg *s = v;
	size_t len = 8 * PG;
	int c, i;

	for (c = 0; c < s->cycles && !s->failed; c++) {
		struct reader_arg ra[4];
		pthread_t th[4];
		char *p = map_anon(len);
		int fd = new_file();
		uint64_t f0;

		if (!p || fd < 0) {
			s->failed = 1;
			snprintf(s->why, sizeof(s->why), "setup at cycle %d", c);
			break;
		}
		fill(p, len, c + 100);
		f0 = pfn(p);
		if (deanon(fd, p, len, c & 1 ? QUIVER_KZERO_DEANON_PRIVATE : 0,
			   NULL)) {
			s->failed = 1;
			snprintf(s->why, sizeof(s->why), "DEANON at cycle %d", c);
		}
		munmap(p, len);
		for (i = 0; i < 4; i++) {
			ra[i] = (struct reader_arg){ fd, len, c + 100, f0, 0 };
			pthread_create(&th[i], NULL, stress_reader, &ra[i]);
		}
		for (i = 0; i < 4; i++) {
			pthread_join(th[i], NULL);
			if (!ra[i].ok && !s->failed) {
				s->failed = 1;
				snprintf(s->why, sizeof(s->why),
					 "reader %d at cycle %d", i, c);
			}
		}
		close(fd);
	}
	return NULL;
}

static int stress_threads(void)
{
	struct stress_arg a[4];
	pthread_t th[4];
	int i;

	for (i = 0; i < 4; i++) {
		a[i] = (struct stress_arg){ .cycles = 250 };
		pthread_create(&th[i], NULL, stress_writer, &a[i]);
	}
	for (i = 0; i < 4; i++)
		pthread_join(th[i], NULL);
	for (i = 0; i < 4; i++)
		CHECK(!a[i].failed, "writer %d: %s", i, a[i].why);
	return 0;
}

static int t_stress(void)
{
	struct quiver_kzero_stats s0 = stats(), s1;
	long base, after;
	pid_t pid;
	int st;

	/* In a child, so its thread stacks and malloc arenas go with it. */
	base = free_kib();
	pid = fork();
	if (pid == 0) {
		int r = stress_threads();

		if (r)
			printf("# stress: %s\n", failure);
		fflush(stdout);
		_exit(r ? 1 : 0);
	}
	CHECK(pid > 0 && waitpid(pid, &st, 0) == pid && WIFEXITED(st) &&
	      WEXITSTATUS(st) == 0, "stress process failed (%#x)", st);
	s1 = stats();
	after = free_kib();
	printf("# stress: 1000 cycles, %llu pages moved, free memory %ld -> %ld KiB\n",
	       (unsigned long long)(s1.pages_moved - s0.pages_moved), base,
	       after);
	CHECK(s1.deanon_calls - s0.deanon_calls == 1000, "%llu DEANON calls",
	      (unsigned long long)(s1.deanon_calls - s0.deanon_calls));
	CHECK(s1.files_live == s0.files_live && s1.pages_live == s0.pages_live,
	      "leak: files_live %llu pages_live %llu",
	      (unsigned long long)s1.files_live,
	      (unsigned long long)s1.pages_live);
	CHECK(base - after <= 1024, "free memory fell by %ld KiB", base - after);
	return 0;
}

static uint64_t rnd(void)
{
	static uint64_t x = 0x1234567;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return x;
}

struct racer {
	char *arena;
	size_t len;
	volatile int stop;
};

/* Remaps the fuzz arena under DEANON's feet: anonymous, shared memfd, or unmapped. */
static void *fuzz_racer(void *v)
{
	struct racer *r = v;
	int mfd = memfd_create("racer", MFD_CLOEXEC);
	unsigned int k = 0;

	if (mfd < 0 || ftruncate(mfd, r->len))
		return NULL;
	while (!r->stop) {
		size_t off = (k * 7 % 48) * PG;

		switch (k++ % 3) {
		case 0:
			mmap(r->arena + off, 16 * PG, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
			memset(r->arena + off, 1, 16 * PG);
			break;
		case 1:
			mmap(r->arena + off, 16 * PG, PROT_READ | PROT_WRITE,
			     MAP_SHARED | MAP_FIXED, mfd, 0);
			break;
		default:
			madvise(r->arena + off, 16 * PG, MADV_DONTNEED);
			break;
		}
	}
	close(mfd);
	return NULL;
}

static int t_fuzz(void)
{
	static const unsigned long cmds[] = {
		QUIVER_KZERO_IOC_NEW_FILE, QUIVER_KZERO_IOC_DEANON,
		QUIVER_KZERO_IOC_STATS, QUIVER_KZERO_IOC_ADD_SEALS,
		QUIVER_KZERO_IOC_GET_SEALS, 0, _IO(QUIVER_KZERO_IOC_MAGIC, 0x2),
	};
	struct quiver_kzero_stats s0 = stats(), s1;
	size_t arena_len = 64 * PG;
	char *arena = map_anon(arena_len);
	int files[8], nfiles = 0, it, i;
	uint64_t buf[8];

	struct racer rc = { .arena = arena, .len = arena_len };
	pthread_t racer;

	CHECK(arena, "setup");
	pthread_create(&racer, NULL, fuzz_racer, &rc);
	for (it = 0; it < 5000; it++) {
		unsigned long cmd = cmds[rnd() % 7];
		int target = dev;
		void *arg = buf;

		for (i = 0; i < 8; i++)
			buf[i] = rnd() % 4 ? rnd() : rnd() % 64;
		switch (rnd() % 6) {
		case 0:		/* a range inside the arena */
			if (rnd() % 2)
				cmd = QUIVER_KZERO_IOC_DEANON;
			buf[3] = rnd() % 8 ? rnd() % 4 : rnd();
			buf[1] = (uint64_t)(uintptr_t)arena + (rnd() % 70) * PG +
				 (rnd() % 8 ? 0 : rnd() % PG);
			buf[2] = (rnd() % 70) * PG + (rnd() % 8 ? 0 : 1);
			/* fallthrough */
		case 1:		/* one of our files */
			if (nfiles)
				buf[0] = files[rnd() % nfiles];
			break;
		case 2:		/* bad pointers */
			arg = (void *)(uintptr_t)(rnd() % 3 ? rnd() : 0);
			break;
		case 3:		/* the file ioctls on a file */
			if (nfiles)
				target = files[rnd() % nfiles];
			break;
		}
		if (ioctl(target, cmd, arg) == 0 &&
		    cmd == QUIVER_KZERO_IOC_NEW_FILE && arg == buf) {
			if (nfiles < 8)
				files[nfiles++] = (int)buf[1];
			else
				close((int)buf[1]);
		}
		if (nfiles && rnd() % 16 == 0)
			close(files[--nfiles]);
		if (rnd() % 8 == 0) {
			/* A fresh arena: what DEANON made a file mapping goes. */
			mmap(arena, arena_len, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
			if (rnd() % 2)
				memset(arena, (int)it, arena_len);
		}
	}
	rc.stop = 1;
	pthread_join(racer, NULL);
	while (nfiles)
		close(files[--nfiles]);
	munmap(arena, arena_len);
	s1 = stats();
	printf("# fuzz: 5000 ioctls racing a thread that remaps their memory, %llu successful DEANON\n",
	       (unsigned long long)(s1.deanon_calls - s0.deanon_calls));
	CHECK(s1.files_live == s0.files_live && s1.pages_live == s0.pages_live,
	      "leak: files_live %llu pages_live %llu",
	      (unsigned long long)s1.files_live,
	      (unsigned long long)s1.pages_live);
	return 0;
}

static double now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

/* DEANON versus memcpy into a memfd, per size; under emulation: ratios only. */
static int t_bench(void)
{
	size_t sz;

	for (sz = 64 << 10; sz <= (1UL << 30); sz *= 4) {
		double t0, t1, t2;
		char *p = map_anon(sz), *m;
		int fd = new_file(), mfd = memfd_create("bench", MFD_CLOEXEC);

		CHECK(p && fd >= 0 && mfd >= 0, "setup");
		memset(p, 7, sz);
		CHECK(ftruncate(mfd, sz) == 0, "ftruncate");
		m = mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
		CHECK(m != MAP_FAILED, "mmap memfd");
		t0 = now();
		memcpy(m, p, sz);
		t1 = now();
		CHECK(deanon(fd, p, sz, QUIVER_KZERO_DEANON_PRIVATE, NULL) == 0,
		      "DEANON %zu", sz);
		t2 = now();
		printf("# bench: %8zu KiB memcpy-to-memfd %9.3f ms, DEANON %9.3f ms, ratio %.2f\n",
		       sz >> 10, (t1 - t0) * 1e3, (t2 - t1) * 1e3,
		       (t1 - t0) / (t2 - t1));
		munmap(m, sz);
		munmap(p, sz);
		close(mfd);
		close(fd);
	}
	return 0;
}

static const struct {
	const char *name;
	int (*fn)(void);
} tests[] = {
	{ "kzero_zero_copy", t_zero_copy },
	{ "kzero_private", t_private },
	{ "kzero_untouched", t_untouched },
	{ "kzero_thp", t_thp },
	{ "kzero_fork_shared", t_fork_shared },
	{ "kzero_multi_vma", t_multi_vma },
	{ "kzero_swap", t_swap },
	{ "kzero_writer_exits", t_writer_exits },
	{ "kzero_refusals", t_refusals },
	{ "kzero_stress", t_stress },
	{ "kzero_fuzz", t_fuzz },
	{ "kzero_bench", t_bench },
};

static int run(int i)
{
	int pfd[2], st;
	pid_t pid;
	char why[512] = "";
	ssize_t n;

	if (pipe(pfd))
		return 1;
	fflush(stdout);
	pid = fork();
	if (pid == 0) {
		int r;

		close(pfd[0]);
		r = tests[i].fn();
		fflush(stdout);
		if (r && write(pfd[1], failure, strlen(failure)) < 0)
			_exit(2);
		_exit(r ? 1 : 0);
	}
	close(pfd[1]);
	n = read(pfd[0], why, sizeof(why) - 1);
	why[n > 0 ? n : 0] = 0;
	close(pfd[0]);
	waitpid(pid, &st, 0);
	if (WIFEXITED(st) && WEXITSTATUS(st) == 0) {
		printf("PASS %s\n", tests[i].name);
		return 0;
	}
	if (WIFSIGNALED(st))
		snprintf(why, sizeof(why), "killed by signal %d", WTERMSIG(st));
	printf("FAIL %s: %s\n", tests[i].name, why);
	return 1;
}

int main(int argc, char **argv)
{
	size_t i;
	int failed = 0, a;

	setvbuf(stdout, NULL, _IOLBF, 0);
	dev = open("/dev/quiver-kzero", O_RDWR | O_CLOEXEC);
	if (dev < 0) {
		printf("FAIL kzero_open: /dev/quiver-kzero: %s\n", strerror(errno));
		return 1;
	}
	for (i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
		int want = argc == 1;

		for (a = 1; a < argc; a++)
			want |= !strcmp(argv[a], tests[i].name);
		if (want)
			failed |= run(i);
	}
	return failed;
}

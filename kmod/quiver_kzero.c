// SPDX-License-Identifier: GPL-2.0
/*
 * quiver-kzero: de-anonymization without a copy.
 *
 * NEW_FILE gives an in-memory file of this module's own type. DEANON pins the
 * pages behind a private anonymous range of the caller (long-term pins, so
 * reclaim and migration leave them alone), appends them to the file's page
 * array and maps the file over the range with MAP_FIXED: the caller keeps
 * seeing the same bytes in the same frames, and any process that maps the
 * file sees them too. Mappings of the file insert the pinned frames as
 * special PTEs (VM_MIXEDMAP), because the kernel refuses to map anonymous
 * pages as page-cache pages and exports nothing that would turn one into the
 * other. The pages are unpinned, and so freed, when the last fd and the last
 * mapping of the file are gone. See docs/kmod.md.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/file.h>
#include <linux/fs.h>
#include <linux/fs_context.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/mman.h>
#include <linux/module.h>
#include <linux/mount.h>
#include <linux/mutex.h>
#include <linux/pseudo_fs.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/uaccess.h>
#include <linux/userfaultfd_k.h>
#include <linux/version.h>
#include <linux/xarray.h>

#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 17, 0)
#include <linux/pfn_t.h>
#endif

#include "include/uapi/linux/quiver_kzero.h"

static ushort mode = 0600;
module_param(mode, ushort, 0444);
MODULE_PARM_DESC(mode, "permission bits of /dev/quiver-kzero (default 0600)");

/* Pages pinned and checked per round, so no call allocates more than this. */
#define KZ_BATCH	256
/* VMAs one DEANON range may span. */
#define KZ_MAX_SEGS	16

static struct {
	atomic64_t pages_moved;
	atomic64_t pages_copied;
	atomic64_t pages_zeroed;
	atomic64_t pages_live;
	atomic64_t files_live;
	atomic64_t deanon_calls;
} kz_stats;

struct kz_file {
	struct mutex lock;	/* serialises DEANON and ADD_SEALS */
	spinlock_t seal_lock;	/* orders seals against ->mmap */
	struct xarray pages;	/* page index -> pinned page */
	pgoff_t npages;		/* published with release semantics */
	unsigned int seals;	/* QUIVER_KZERO_SEAL_* */
	struct task_struct *replacing;	/* DEANON's task while it remaps */
};

/*
 * vm_private_data of the private mapping DEANON puts over the caller's range.
 * It is populated in full when created, so a later fault there means the
 * caller zapped the PTE (MADV_DONTNEED): like anonymous memory, it then reads
 * zeros, never the file's bytes, which allocators that recycle memory with
 * MADV_DONTNEED rely on.
 */
#define KZ_VMA_ANON_LIKE	((void *)1UL)

struct kz_seg {
	unsigned long start;
	unsigned long end;
	unsigned long prot;
};

static struct vfsmount *kz_mnt;
static const struct file_operations kz_file_fops;

/*
 * Pins this module holds on each large folio (THP), by the folio's first
 * frame. A large folio's pin count covers all its subpages, so this is how a
 * pin by someone else is told from ours when a later DEANON meets another
 * part of the same huge page.
 */
static DEFINE_XARRAY(kz_large_pins);
static DEFINE_SPINLOCK(kz_large_lock);

static void kz_track(struct page *page, long delta)
{
	struct folio *folio = page_folio(page);
	unsigned long key = folio_pfn(folio);
	long n;

	if (!folio_test_large(folio))
		return;
	spin_lock(&kz_large_lock);
	n = xa_to_value(xa_load(&kz_large_pins, key) ?: xa_mk_value(0)) + delta;
	if (n > 0)
		/* GFP_ATOMIC under the spinlock; on failure the check below
		 * errs on the safe side (EBUSY). */
		xa_store(&kz_large_pins, key, xa_mk_value(n), GFP_ATOMIC);
	else
		xa_erase(&kz_large_pins, key);
	spin_unlock(&kz_large_lock);
}

/* Whether anyone but this module holds a pin on the page's folio. */
static bool kz_pinned_elsewhere(struct page *page)
{
	struct folio *folio = page_folio(page);
	long ours;

	if (!folio_maybe_dma_pinned(folio))
		return false;
	if (!folio_test_large(folio))
		return true;
	spin_lock(&kz_large_lock);
	ours = xa_to_value(xa_load(&kz_large_pins, folio_pfn(folio)) ?:
			   xa_mk_value(0));
	spin_unlock(&kz_large_lock);
	return atomic_read(&folio->_pincount) > ours;
}

static void kz_unpin(struct page *page)
{
	kz_track(page, -1);
	unpin_user_page(page);
}

static void kz_vma_flags(struct vm_area_struct *vma, vm_flags_t set,
			 vm_flags_t clear)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	vm_flags_mod(vma, set, clear);
#else
	vma->vm_flags = (vma->vm_flags | set) & ~clear;
#endif
}

static vm_fault_t kz_fault(struct vm_fault *vmf)
{
	struct kz_file *kz = vmf->vma->vm_file->private_data;
	struct page *page;

	if (vmf->pgoff >= smp_load_acquire(&kz->npages))
		return VM_FAULT_SIGBUS;
	if (vmf->vma->vm_private_data == KZ_VMA_ANON_LIKE)
		/* A write to it then gets a fresh zeroed page (wp_page_copy). */
		return vmf_insert_mixed(vmf->vma, vmf->address,
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 17, 0)
					my_zero_pfn(vmf->address));
#else
					pfn_to_pfn_t(my_zero_pfn(vmf->address)));
#endif
	page = xa_load(&kz->pages, vmf->pgoff);
	if (!page)
		return VM_FAULT_SIGBUS;
	/*
	 * A special PTE: no refcount and no rmap, the file's pin keeps the
	 * frame alive for as long as any VMA maps the file. A write fault in
	 * a private mapping copies the frame (do_wp_page -> wp_page_copy), so
	 * the file never changes through one.
	 */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 17, 0)
	return vmf_insert_mixed(vmf->vma, vmf->address, page_to_pfn(page));
#else
	return vmf_insert_mixed(vmf->vma, vmf->address, page_to_pfn_t(page));
#endif
}

static const struct vm_operations_struct kz_vm_ops = {
	.fault = kz_fault,
};

/* Maps every page of the file that the new VMA covers. */
static int kz_populate(struct kz_file *kz, struct vm_area_struct *vma)
{
	unsigned long addr;
	pgoff_t pgoff = vma->vm_pgoff;
	struct page *page;
	vm_fault_t r;

	for (addr = vma->vm_start; addr < vma->vm_end; addr += PAGE_SIZE) {
		page = xa_load(&kz->pages, pgoff++);
		if (!page)
			return -EINVAL;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 17, 0)
		r = vmf_insert_mixed(vma, addr, page_to_pfn(page));
#else
		r = vmf_insert_mixed(vma, addr, page_to_pfn_t(page));
#endif
		if (r & VM_FAULT_ERROR)
			return r & VM_FAULT_OOM ? -ENOMEM : -EFAULT;
	}
	return 0;
}

static int kz_mmap(struct file *f, struct vm_area_struct *vma)
{
	struct kz_file *kz = f->private_data;
	int ret = 0;

	/*
	 * mmap_region() counted a shared may-write mapping in i_mmap_writable
	 * before calling us; ADD_SEALS refuses F_SEAL_WRITE while that count is
	 * positive, so checking the seal here under seal_lock closes the race.
	 */
	spin_lock(&kz->seal_lock);
	if ((vma->vm_flags & VM_SHARED) &&
	    (kz->seals & QUIVER_KZERO_SEAL_WRITE)) {
		if (vma->vm_flags & VM_WRITE)
			ret = -EPERM;
		else
			kz_vma_flags(vma, 0, VM_MAYWRITE);
	}
	spin_unlock(&kz->seal_lock);
	if (ret)
		return ret;
	kz_vma_flags(vma, VM_MIXEDMAP | VM_DONTEXPAND | VM_DONTDUMP, 0);
	vma->vm_ops = &kz_vm_ops;
	/* DEANON's own remap: the frames are there, map them now. */
	if (READ_ONCE(kz->replacing) == current) {
		if (!(vma->vm_flags & VM_SHARED))
			vma->vm_private_data = KZ_VMA_ANON_LIKE;
		return kz_populate(kz, vma);
	}
	return 0;
}

static int kz_release(struct inode *inode, struct file *f)
{
	struct kz_file *kz = f->private_data;
	struct page *page;
	unsigned long idx;
	u64 n = 0;

	/* No VMA maps the file any more: each holds a reference to it. */
	xa_for_each(&kz->pages, idx, page) {
		kz_unpin(page);
		if (!(++n % KZ_BATCH))
			cond_resched();
	}
	xa_destroy(&kz->pages);
	atomic64_sub(n, &kz_stats.pages_live);
	atomic64_dec(&kz_stats.files_live);
	kfree(kz);
	return 0;
}

static long kz_add_seals(struct file *f, struct quiver_kzero_seals __user *u)
{
	struct kz_file *kz = f->private_data;
	struct quiver_kzero_seals s;
	long ret = 0;

	if (copy_from_user(&s, u, sizeof(s)))
		return -EFAULT;
	if (s.seals & ~QUIVER_KZERO_SEAL_ALL)
		return -EINVAL;
	if (!(f->f_mode & FMODE_WRITE))
		return -EPERM;
	mutex_lock(&kz->lock);
	spin_lock(&kz->seal_lock);
	if (kz->seals & QUIVER_KZERO_SEAL_SEAL)
		ret = -EPERM;
	else if ((s.seals & QUIVER_KZERO_SEAL_WRITE) &&
		 !(kz->seals & QUIVER_KZERO_SEAL_WRITE) &&
		 mapping_writably_mapped(f->f_mapping))
		ret = -EBUSY;
	else
		kz->seals |= s.seals;
	spin_unlock(&kz->seal_lock);
	mutex_unlock(&kz->lock);
	return ret;
}

static long kz_get_seals(struct file *f, struct quiver_kzero_seals __user *u)
{
	struct kz_file *kz = f->private_data;
	struct quiver_kzero_seals s = {};

	spin_lock(&kz->seal_lock);
	s.seals = kz->seals;
	spin_unlock(&kz->seal_lock);
	s.size = (u64)smp_load_acquire(&kz->npages) << PAGE_SHIFT;
	if (copy_to_user(u, &s, sizeof(s)))
		return -EFAULT;
	return 0;
}

static long kz_file_ioctl(struct file *f, unsigned int cmd, unsigned long arg)
{
	void __user *u = (void __user *)arg;

	switch (cmd) {
	case QUIVER_KZERO_IOC_ADD_SEALS:
		return kz_add_seals(f, u);
	case QUIVER_KZERO_IOC_GET_SEALS:
		return kz_get_seals(f, u);
	default:
		return -ENOTTY;
	}
}

static const struct file_operations kz_file_fops = {
	.owner = THIS_MODULE,
	.mmap = kz_mmap,
	.release = kz_release,
	.unlocked_ioctl = kz_file_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = noop_llseek,
};

/* The size is the module's to change (DEANON only), never ftruncate's. */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
static int kz_setattr(struct mnt_idmap *idmap, struct dentry *d,
		      struct iattr *attr)
#else
static int kz_setattr(struct user_namespace *ns, struct dentry *d,
		      struct iattr *attr)
#endif
{
	return -EPERM;
}

static const struct inode_operations kz_inode_ops = {
	.setattr = kz_setattr,
};

static long kz_new_file(struct quiver_kzero_new_file __user *u)
{
	struct quiver_kzero_new_file a;
	struct kz_file *kz;
	struct inode *inode;
	struct file *f;
	int fd, ret;

	if (copy_from_user(&a, u, sizeof(a)))
		return -EFAULT;
	if (a.flags & ~QUIVER_KZERO_CLOEXEC)
		return -EINVAL;

	kz = kzalloc(sizeof(*kz), GFP_KERNEL_ACCOUNT);
	if (!kz)
		return -ENOMEM;
	mutex_init(&kz->lock);
	spin_lock_init(&kz->seal_lock);
	xa_init(&kz->pages);

	/* One inode per file: size, seals and i_mmap_writable are per file. */
	inode = alloc_anon_inode(kz_mnt->mnt_sb);
	if (IS_ERR(inode)) {
		ret = PTR_ERR(inode);
		goto err_free;
	}
	inode->i_mode = S_IFREG | 0600;
	inode->i_op = &kz_inode_ops;
	inode->i_size = 0;

	/* alloc_file_pseudo() takes no module reference but __fput drops one. */
	if (!try_module_get(THIS_MODULE)) {
		ret = -ENODEV;
		goto err_iput;
	}
	f = alloc_file_pseudo(inode, kz_mnt, "quiver-kzero", O_RDWR,
			      &kz_file_fops);
	if (IS_ERR(f)) {
		module_put(THIS_MODULE);
		ret = PTR_ERR(f);
		goto err_iput;
	}
	f->private_data = kz;
	atomic64_inc(&kz_stats.files_live);

	fd = get_unused_fd_flags(O_RDWR |
		((a.flags & QUIVER_KZERO_CLOEXEC) ? O_CLOEXEC : 0));
	if (fd < 0) {
		fput(f);
		return fd;
	}
	a.fd = fd;
	if (copy_to_user(u, &a, sizeof(a))) {
		put_unused_fd(fd);
		fput(f);
		return -EFAULT;
	}
	fd_install(fd, f);
	return 0;

err_iput:
	iput(inode);
err_free:
	kfree(kz);
	return ret;
}

/* The VMAs covering [addr, end): private anonymous data memory only. */
static int kz_check_range(unsigned long addr, unsigned long end,
			  struct kz_seg *segs, int *nsegs)
{
	struct mm_struct *mm = current->mm;
	struct vm_area_struct *vma;
	unsigned long at = addr;
	int n = 0, ret = 0;

	mmap_read_lock(mm);
	while (at < end) {
		vma = find_vma(mm, at);
		if (!vma || vma->vm_start > at) {
			ret = -ENOMEM;
			break;
		}
		if (!vma_is_anonymous(vma) || userfaultfd_armed(vma) ||
		    (vma->vm_flags & (VM_SHARED | VM_IO | VM_PFNMAP |
				      VM_MIXEDMAP | VM_HUGETLB | VM_EXEC))) {
			ret = -EINVAL;
			break;
		}
		if (vma->vm_flags & VM_LOCKED) {
			ret = -EPERM;
			break;
		}
		if (!(vma->vm_flags & VM_READ)) {
			ret = -EFAULT;
			break;
		}
		if (n == KZ_MAX_SEGS) {
			ret = -E2BIG;
			break;
		}
		segs[n].start = at;
		segs[n].end = min(end, vma->vm_end);
		segs[n].prot = PROT_READ |
			((vma->vm_flags & VM_WRITE) ? PROT_WRITE : 0);
		at = segs[n].end;
		n++;
	}
	mmap_read_unlock(mm);
	*nsegs = n;
	return ret;
}

/* Drops pages stored by a DEANON that failed before publishing them. */
static void kz_unwind(struct kz_file *kz, pgoff_t from, pgoff_t to)
{
	struct page *page;
	pgoff_t i;

	for (i = from; i < to; i++) {
		page = xa_erase(&kz->pages, i);
		if (page)
			kz_unpin(page);
	}
}

struct kz_counts {
	u64 moved;
	u64 copied;
	u64 zeroed;
};

/*
 * Pins npages at addr into kz at index base. A first, non-writing GUP shows
 * which frames the range has now, so the pin's result tells moved pages from
 * ones the write pin had to allocate (never touched) or unshare (shared
 * after fork, copied).
 */
static int kz_pin_range(struct kz_file *kz, unsigned long addr,
			unsigned long npages, pgoff_t base, u64 flags,
			struct kz_counts *c)
{
	struct page **before, **pinned;
	unsigned long done, nr, i;
	int got, ret = 0;

	before = kmalloc_array(KZ_BATCH, sizeof(*before), GFP_KERNEL);
	pinned = kmalloc_array(KZ_BATCH, sizeof(*pinned), GFP_KERNEL);
	if (!before || !pinned) {
		ret = -ENOMEM;
		goto out;
	}
	for (done = 0; done < npages; done += nr) {
		unsigned long start = addr + (done << PAGE_SHIFT);

		nr = min_t(unsigned long, npages - done, KZ_BATCH);
		got = get_user_pages_fast(start, nr, 0, before);
		if (got < 0) {
			ret = got;
			goto out;
		}
		for (i = 0; i < got && !ret; i++) {
			struct page *p = before[i];

			if (!PageAnon(p))
				continue;
			if (kz_pinned_elsewhere(p))
				ret = -EBUSY;
			else if ((flags & QUIVER_KZERO_DEANON_NO_COPY) &&
				 !PageAnonExclusive(p))
				ret = -EBUSY;
		}
		if (!ret && got < nr)
			ret = -EFAULT;
		if (ret) {
			for (i = 0; i < got; i++)
				put_page(before[i]);
			goto out;
		}

		got = pin_user_pages_fast(start, nr, FOLL_WRITE | FOLL_FORCE |
					  FOLL_LONGTERM, pinned);
		if (got != nr) {
			if (got > 0)
				unpin_user_pages(pinned, got);
			for (i = 0; i < nr; i++)
				put_page(before[i]);
			ret = got < 0 ? got : -EFAULT;
			goto out;
		}
		/*
		 * The range was checked before, not under the same lock: if
		 * another thread remapped it meanwhile, what got pinned may
		 * not be anonymous memory any more.
		 */
		for (i = 0; i < nr && PageAnon(pinned[i]); i++)
			;
		if (i < nr) {
			unpin_user_pages(pinned, nr);
			for (i = 0; i < nr; i++)
				put_page(before[i]);
			ret = -EINVAL;
			goto out;
		}
		for (i = 0; i < nr; i++) {
			kz_track(pinned[i], 1);
			if (pinned[i] == before[i])
				c->moved++;
			else if (PageAnon(before[i]))
				c->copied++;
			else
				c->zeroed++;
			put_page(before[i]);
		}
		for (i = 0; i < nr; i++) {
			ret = xa_err(xa_store(&kz->pages, base + done + i,
					      pinned[i], GFP_KERNEL_ACCOUNT));
			if (ret) {
				for (; i < nr; i++)
					kz_unpin(pinned[i]);
				goto out;
			}
		}
		cond_resched();
	}
out:
	kfree(pinned);
	kfree(before);
	return ret;
}

static long kz_deanon(struct quiver_kzero_deanon __user *u)
{
	struct quiver_kzero_deanon a;
	struct kz_seg segs[KZ_MAX_SEGS];
	struct kz_counts c = {};
	unsigned long npages, mflags, r;
	struct kz_file *kz;
	struct file *f;
	pgoff_t base;
	int nsegs, i;
	long ret;

	if (copy_from_user(&a, u, sizeof(a)))
		return -EFAULT;
	if (a.flags & ~(QUIVER_KZERO_DEANON_PRIVATE |
			QUIVER_KZERO_DEANON_NO_COPY))
		return -EINVAL;
	if (!a.len || !PAGE_ALIGNED(a.addr) || !PAGE_ALIGNED(a.len))
		return -EINVAL;
	if (a.addr + a.len < a.addr)
		return -EOVERFLOW;
	if (a.addr + a.len > TASK_SIZE)
		return -ENOMEM;
	if (a.fd > INT_MAX)
		return -EBADF;

	f = fget(a.fd);
	if (!f)
		return -EBADF;
	if (f->f_op != &kz_file_fops) {
		ret = -EINVAL;
		goto out_fput;
	}
	kz = f->private_data;
	npages = a.len >> PAGE_SHIFT;

	mutex_lock(&kz->lock);
	if (kz->seals & QUIVER_KZERO_SEAL_GROW) {
		ret = -EPERM;
		goto out_unlock;
	}
	base = kz->npages;
	if (npages > (MAX_LFS_FILESIZE >> PAGE_SHIFT) - base) {
		ret = -EFBIG;
		goto out_unlock;
	}
	ret = kz_check_range(a.addr, a.addr + a.len, segs, &nsegs);
	if (ret)
		goto out_unlock;
	if ((kz->seals & QUIVER_KZERO_SEAL_WRITE) &&
	    !(a.flags & QUIVER_KZERO_DEANON_PRIVATE)) {
		for (i = 0; i < nsegs; i++)
			if (segs[i].prot & PROT_WRITE)
				ret = -EPERM;
		if (ret)
			goto out_unlock;
	}
	ret = kz_pin_range(kz, a.addr, npages, base, a.flags, &c);
	if (ret) {
		kz_unwind(kz, base, base + npages);
		goto out_unlock;
	}

	/*
	 * Published: from here on the pages belong to the file for good, even
	 * if the remap below fails (the caller's range then still maps them
	 * as its own anonymous pages, so it reads the same bytes either way).
	 */
	i_size_write(file_inode(f), (loff_t)(base + npages) << PAGE_SHIFT);
	smp_store_release(&kz->npages, base + npages);
	atomic64_add(npages, &kz_stats.pages_live);
	atomic64_add(c.moved, &kz_stats.pages_moved);
	atomic64_add(c.copied, &kz_stats.pages_copied);
	atomic64_add(c.zeroed, &kz_stats.pages_zeroed);

	/*
	 * Still under kz->lock (lock order: kz->lock, then mmap_lock; ->mmap
	 * and ->fault never take kz->lock), so ->mmap can tell this remap
	 * from anyone else's mapping and populate it.
	 */
	WRITE_ONCE(kz->replacing, current);
	mflags = MAP_FIXED | ((a.flags & QUIVER_KZERO_DEANON_PRIVATE) ?
			      MAP_PRIVATE : MAP_SHARED);
	for (i = 0; i < nsegs; i++) {
		r = vm_mmap(f, segs[i].start, segs[i].end - segs[i].start,
			    segs[i].prot, mflags,
			    ((loff_t)base << PAGE_SHIFT) +
			    (segs[i].start - a.addr));
		if (IS_ERR_VALUE(r)) {
			ret = (long)r;
			break;
		}
	}
	WRITE_ONCE(kz->replacing, NULL);
	if (ret)
		goto out_unlock;
	mutex_unlock(&kz->lock);
	atomic64_inc(&kz_stats.deanon_calls);

	a.offset = (u64)base << PAGE_SHIFT;
	a.pages_moved = c.moved;
	a.pages_copied = c.copied;
	a.pages_zeroed = c.zeroed;
	if (copy_to_user(u, &a, sizeof(a)))
		ret = -EFAULT;
	goto out_fput;

out_unlock:
	mutex_unlock(&kz->lock);
out_fput:
	fput(f);
	return ret;
}

static long kz_stats_ioctl(struct quiver_kzero_stats __user *u)
{
	struct quiver_kzero_stats s = {
		.pages_moved = atomic64_read(&kz_stats.pages_moved),
		.pages_copied = atomic64_read(&kz_stats.pages_copied),
		.pages_zeroed = atomic64_read(&kz_stats.pages_zeroed),
		.pages_live = atomic64_read(&kz_stats.pages_live),
		.files_live = atomic64_read(&kz_stats.files_live),
		.deanon_calls = atomic64_read(&kz_stats.deanon_calls),
	};

	if (copy_to_user(u, &s, sizeof(s)))
		return -EFAULT;
	return 0;
}

static long kz_dev_ioctl(struct file *f, unsigned int cmd, unsigned long arg)
{
	void __user *u = (void __user *)arg;

	switch (cmd) {
	case QUIVER_KZERO_IOC_NEW_FILE:
		return kz_new_file(u);
	case QUIVER_KZERO_IOC_DEANON:
		return kz_deanon(u);
	case QUIVER_KZERO_IOC_STATS:
		return kz_stats_ioctl(u);
	default:
		return -ENOTTY;
	}
}

static const struct file_operations kz_dev_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = kz_dev_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = noop_llseek,
};

#define KZ_COUNTER_ATTR(name)						\
static ssize_t name##_show(struct device *dev,				\
			   struct device_attribute *attr, char *buf)	\
{									\
	return sysfs_emit(buf, "%lld\n",				\
			  (long long)atomic64_read(&kz_stats.name));	\
}									\
static DEVICE_ATTR_RO(name)

KZ_COUNTER_ATTR(pages_moved);
KZ_COUNTER_ATTR(pages_copied);
KZ_COUNTER_ATTR(pages_zeroed);
KZ_COUNTER_ATTR(pages_live);
KZ_COUNTER_ATTR(files_live);
KZ_COUNTER_ATTR(deanon_calls);

static struct attribute *kz_attrs[] = {
	&dev_attr_pages_moved.attr,
	&dev_attr_pages_copied.attr,
	&dev_attr_pages_zeroed.attr,
	&dev_attr_pages_live.attr,
	&dev_attr_files_live.attr,
	&dev_attr_deanon_calls.attr,
	NULL,
};
ATTRIBUTE_GROUPS(kz);

static struct miscdevice kz_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "quiver-kzero",
	.fops = &kz_dev_fops,
	.groups = kz_groups,
};

static int kz_init_fs_context(struct fs_context *fc)
{
	return init_pseudo(fc, QUIVER_KZERO_MAGIC) ? 0 : -ENOMEM;
}

static struct file_system_type kz_fs_type = {
	.name = "quiver_kzero",
	.init_fs_context = kz_init_fs_context,
	.kill_sb = kill_anon_super,
};

static int __init kz_init(void)
{
	int ret;

	kz_mnt = kern_mount(&kz_fs_type);
	if (IS_ERR(kz_mnt))
		return PTR_ERR(kz_mnt);
	kz_misc.mode = mode;
	ret = misc_register(&kz_misc);
	if (ret) {
		kern_unmount(kz_mnt);
		return ret;
	}
	return 0;
}

static void __exit kz_exit(void)
{
	misc_deregister(&kz_misc);
	kern_unmount(kz_mnt);
}

module_init(kz_init);
module_exit(kz_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("quiver: move anonymous pages into a shareable file without copying");
MODULE_VERSION("0.1.0");

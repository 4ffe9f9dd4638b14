//! Segments: space reserved before any write (a full pool is an error, not a SIGBUS), sealing
//! only once no writable mapping is left, sealed bytes immutable, holes read as zeros.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;

use quiver_shm::{MapOptions, Segment, SealedSegment, ShmError};

#[test]
fn a_reservation_that_cannot_be_met_is_an_error_not_a_sigbus() {
    // The kernel's pool of 2 MiB pages is bounded and usually empty: ask for one page more
    // than it has free. fallocate must refuse with ENOSPC at creation, before any write.
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
    let free: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .map(|v| v.trim().parse().expect("number"))
        .expect("the kernel reports HugePages_Free (hugetlbfs support)");
    let opts = MapOptions { hugetlb: true, ..Default::default() };
    match Segment::create("too-big", (free + 1) * (2 << 20), opts) {
        Err(ShmError::Reserve { source, size, .. }) => {
            assert_eq!(source.raw_os_error(), Some(libc::ENOSPC), "{source}");
            assert_eq!(size, (free + 1) * (2 << 20));
        }
        other => panic!("expected ENOSPC from the reservation, got {other:?}"),
    }
}

#[test]
fn sealing_waits_for_the_last_writable_mapping() {
    let seg = Segment::create("seal", 10_000, MapOptions::default()).expect("create");
    assert_eq!(seg.size(), 12_288, "rounded up to pages");
    let map = seg.map_mut(MapOptions::default()).expect("map");
    // SAFETY: the mapping is writable and at least 5 bytes long.
    unsafe { std::ptr::copy_nonoverlapping(b"hello".as_ptr(), map.as_mut_ptr(), 5) };
    let fd = seg.as_fd().try_clone_to_owned().expect("dup");
    let err = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_ADD_SEALS(quiver_shm::SHARED_SEALS)).expect_err("busy");
    assert_eq!(err, nix::errno::Errno::EBUSY);
    drop(map);
    let sealed = seg.seal().expect("no writable mapping left");
    let ro = sealed.map(MapOptions::default()).expect("map ro");
    assert_eq!(&ro.as_slice()[..5], b"hello");
    // Neither write() nor growing nor shrinking gets through the seals.
    let mut f = std::fs::File::from(sealed.try_clone().expect("dup").into_fd());
    assert!(f.write_all(b"x").is_err());
    assert!(f.set_len(1 << 20).is_err());
    assert!(f.set_len(4096).is_err());
    let mut buf = [0u8; 5];
    f.seek(SeekFrom::Start(0)).expect("seek");
    f.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"hello");
    SealedSegment::from_fd(sealed.into_fd()).expect("admitted as sealed");
}

#[test]
fn punched_holes_read_as_zeros_and_free_memory() {
    let seg = Segment::create("holes", 1 << 20, MapOptions::default()).expect("create");
    let map = seg.map_mut(MapOptions::default()).expect("map");
    // SAFETY: writable mapping of 1 MiB.
    unsafe { std::ptr::write_bytes(map.as_mut_ptr(), 0xAB, 1 << 20) };
    let blocks = |s: &Segment| nix::sys::stat::fstat(s.as_fd()).expect("fstat").st_blocks;
    let before = blocks(&seg);
    seg.punch_hole(4096, 512 << 10).expect("punch");
    assert!(blocks(&seg) < before, "punching gives memory back");
    assert_eq!(map.as_slice()[4096], 0);
    assert_eq!(map.as_slice()[4095], 0xAB);
    assert_eq!(map.as_slice()[4096 + (512 << 10)], 0xAB);
}

#[test]
fn huge_aligned_mappings_sit_on_2mib_boundaries() {
    let opts = MapOptions { huge_align: true, hugepage: true, ..Default::default() };
    let seg = Segment::create("aligned", 3 << 20, opts).expect("create");
    assert_eq!(seg.size(), 4 << 20, "rounded up to 2 MiB");
    let map = seg.map_mut(opts).expect("map");
    assert_eq!(map.as_ptr() as usize % (2 << 20), 0);
    let prefaulted = seg.map_mut(MapOptions { prefault: true, ..Default::default() }).expect("prefault");
    assert_eq!(prefaulted.len(), 4 << 20);
}

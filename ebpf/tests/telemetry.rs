//! Page faults and bytes copied are charged to the cgroup that took or made them, as measured
//! by the kernel: a child touching N fresh pages, and a child copying K bytes in known calls.

mod common;

use std::ffi::c_void;

use common::{TestCgroup, await_signal, pipe, run_in, signal, spawn_in, telemetry, wait};
use quiver_ebpf::Counters;

const PAGE: usize = 4096;
/// Faults the child may take besides its touches: returning from write(2) onto its stack, _exit.
const FAULT_SLACK: u64 = 32;

#[test]
fn fresh_pages_are_charged_as_faults() {
    let Some(t) = telemetry("fresh_pages_are_charged_as_faults") else {
        return;
    };
    let n: usize = 3000;
    // SAFETY: a fresh private anonymous mapping, unmapped below; nothing else uses it.
    let region = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            n * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(region, libc::MAP_FAILED);
    // One fault per page: no transparent huge pages (nor multi-size THP) for this range.
    // SAFETY: region is the mapping above.
    let advised = unsafe { libc::madvise(region, n * PAGE, libc::MADV_NOHUGEPAGE) };
    assert_eq!(advised, 0);

    let cg = TestCgroup::new();
    let watch = t.watch(&cg.path, false).expect("watch");
    let base = region as usize;
    let code = run_in(&cg, || {
        for i in 0..n {
            // SAFETY: inside the child's copy of the mapping; the parent never touched it, so
            // every page is fresh.
            unsafe { std::ptr::write_volatile((base + i * PAGE) as *mut u8, 1) };
        }
        0
    });
    assert_eq!(code, 0);
    let c = watch.take().expect("take");
    eprintln!(
        "{n} pages touched: {} faults, by pid {:?}",
        c.page_faults, c.page_faults_by_pid
    );
    assert!(
        c.page_faults >= n as u64,
        "charged {} faults for {n} fresh pages",
        c.page_faults
    );
    assert!(
        c.page_faults <= n as u64 + FAULT_SLACK,
        "charged {} faults for {n} pages",
        c.page_faults
    );
    assert_eq!(
        c.page_faults_by_pid.len(),
        1,
        "one process ran: {:?}",
        c.page_faults_by_pid
    );
    assert_eq!(c.page_faults_by_pid.values().sum::<u64>(), c.page_faults);
    // SAFETY: the parent's mapping, no longer used.
    unsafe { libc::munmap(region, n * PAGE) };

    // An idle cgroup is charged nothing, and a taken watch can be registered again.
    let again = t.watch(&cg.path, false).expect("watch again");
    assert_eq!(again.take().expect("take").page_faults, 0);
}

type Copy3 = unsafe extern "C" fn(*mut c_void, *const c_void, usize) -> *mut c_void;
type CopyChk = unsafe extern "C" fn(*mut c_void, *const c_void, usize, usize) -> *mut c_void;

unsafe extern "C" {
    fn __memcpy_chk(dst: *mut c_void, src: *const c_void, n: usize, dst_len: usize) -> *mut c_void;
    fn mempcpy(dst: *mut c_void, src: *const c_void, n: usize) -> *mut c_void;
}

#[test]
fn memcpy_bytes_are_charged() {
    let Some(t) = telemetry("memcpy_bytes_are_charged") else {
        return;
    };
    const BUF: usize = 4 << 20;
    let src = vec![7u8; BUF];
    let mut dst = vec![0u8; BUF];
    // (function, size, calls); read through volatile pointers so no call is inlined or merged.
    let memcpy: Copy3 = libc::memcpy;
    let memmove: Copy3 = libc::memmove;
    let mempcpy_: Copy3 = mempcpy;
    let chk: CopyChk = __memcpy_chk;
    let plan: [(u8, usize, usize); 6] = [
        (0, 4096, 1000),
        (0, 1 << 20, 3),
        (0, 3 << 20, 1),
        (1, 1000, 10),
        (2, 777, 5),
        (3, 333, 7),
    ];
    let expected_bytes: u64 = plan.iter().map(|&(_, s, c)| (s * c) as u64).sum();
    let expected_calls: u64 = plan.iter().map(|&(_, _, c)| c as u64).sum();

    let cg = TestCgroup::new();
    let watch = t.watch(&cg.path, false).expect("watch");
    let (s, d) = (src.as_ptr() as usize, dst.as_mut_ptr() as usize);
    let (go_r, go_w) = pipe();
    let child = spawn_in(&cg, || {
        if !await_signal(go_r) {
            return 10;
        }
        for &(f, size, calls) in &plan {
            for _ in 0..calls {
                let (dp, sp) = (d as *mut c_void, s as *const c_void);
                // SAFETY: both buffers hold BUF >= size + 1 bytes; memmove may overlap.
                unsafe {
                    match f {
                        0 => std::ptr::read_volatile(&memcpy)(dp, sp, size),
                        1 => std::ptr::read_volatile(&memmove)(dp, (d + 1) as *const c_void, size),
                        2 => std::ptr::read_volatile(&chk)(dp, sp, size, BUF),
                        _ => std::ptr::read_volatile(&mempcpy_)(dp, sp, size),
                    };
                }
            }
        }
        0
    });
    let meter = t.meter_copies(child as u32).expect("meter the child");
    assert!(signal(go_w));
    let code = wait(child);
    drop(meter);
    assert_eq!(code, 0);
    let c = watch.take().expect("take");
    eprintln!(
        "expected {expected_bytes} bytes in {expected_calls} calls; charged {} bytes in {} calls",
        c.memcpy_bytes, c.memcpy_calls
    );
    // The child makes no other copies between entering the cgroup and _exit; a few small ones
    // are tolerated in case a libc internal path copies.
    assert!(
        c.memcpy_bytes >= expected_bytes,
        "charged {} < {expected_bytes}",
        c.memcpy_bytes
    );
    assert!(
        c.memcpy_bytes <= expected_bytes + 4096,
        "charged {} bytes",
        c.memcpy_bytes
    );
    assert!(c.memcpy_calls >= expected_calls && c.memcpy_calls <= expected_calls + 8);
    assert_eq!(c.memcpy_hist.iter().sum::<u64>(), c.memcpy_calls);
    for &(_, size, calls) in &plan {
        let b = Counters::bucket(size as u64);
        assert!(
            c.memcpy_hist[b] >= calls as u64,
            "bucket {b} of {size} bytes: {:?}",
            c.memcpy_hist
        );
    }
    assert_eq!(
        c.memcpy_hist[Counters::bucket(3 << 20)],
        1,
        "one 3 MiB copy"
    );
    drop(dst);
}

#[test]
fn copies_are_charged_only_to_metered_processes_of_their_cgroup() {
    let Some(t) = telemetry("copies_are_charged_only_to_metered_processes_of_their_cgroup") else {
        return;
    };
    let watched = TestCgroup::new();
    let other = TestCgroup::new();
    let watch = t.watch(&watched.path, false).expect("watch");
    let other_watch = t.watch(&other.path, false).expect("watch");
    let src = vec![1u8; 1 << 20];
    let mut dst = vec![0u8; 1 << 20];
    let (s, d) = (src.as_ptr() as usize, dst.as_mut_ptr() as usize);
    let memcpy: Copy3 = libc::memcpy;
    let copy = move || {
        // SAFETY: both buffers hold 1 MiB.
        unsafe { std::ptr::read_volatile(&memcpy)(d as *mut c_void, s as *const c_void, 1 << 20) };
    };
    // A metered process in another cgroup is charged there, not here.
    let (go_r, go_w) = pipe();
    let child = spawn_in(&other, || {
        if !await_signal(go_r) {
            return 10;
        }
        copy();
        0
    });
    let meter = t.meter_copies(child as u32).expect("meter");
    assert!(signal(go_w));
    assert_eq!(wait(child), 0);
    drop(meter);
    // A process in the watched cgroup that is not metered is charged no copies.
    assert_eq!(
        run_in(&watched, || {
            copy();
            0
        }),
        0
    );
    let elsewhere = other_watch.take().expect("take");
    assert!(elsewhere.memcpy_bytes >= 1 << 20, "{elsewhere:?}");
    let c = watch.take().expect("take");
    assert_eq!(c.memcpy_bytes, 0, "{c:?}");
    drop(dst);
}

#[test]
fn mmap_and_munmap_are_counted() {
    let Some(t) = telemetry("mmap_and_munmap_are_counted") else {
        return;
    };
    let cg = TestCgroup::new();
    let watch = t.watch(&cg.path, false).expect("watch");
    let (n, len) = (5usize, 3 * PAGE);
    let code = run_in(&cg, || {
        for _ in 0..n {
            // SAFETY: a fresh anonymous mapping, unmapped right away.
            unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if p == libc::MAP_FAILED || libc::munmap(p, len) != 0 {
                    return 1;
                }
            }
        }
        0
    });
    assert_eq!(code, 0);
    let c = watch.take().expect("take");
    assert_eq!(
        (c.mmaps, c.mmap_bytes),
        (n as u64, (n * len) as u64),
        "{c:?}"
    );
    assert_eq!(
        (c.munmaps, c.munmap_bytes),
        (n as u64, (n * len) as u64),
        "{c:?}"
    );
}

#[test]
fn bad_cgroup_paths_are_refused() {
    let Some(t) = telemetry("bad_cgroup_paths_are_refused") else {
        return;
    };
    let e = t
        .watch(std::path::Path::new("/tmp"), false)
        .expect_err("not a cgroup");
    assert!(e.to_string().contains("not a cgroup v2"), "{e}");
    let e = t
        .watch(std::path::Path::new("/nonexistent/cg"), true)
        .expect_err("missing");
    assert!(e.to_string().contains("/nonexistent/cg"), "{e}");
    let cg = TestCgroup::new();
    let w = t.watch(&cg.path, false).expect("watch");
    let e = t.watch(&cg.path, false).expect_err("twice");
    assert!(e.to_string().contains("already watched"), "{e}");
    drop(w);
}

#[test]
fn a_dropped_meter_counts_nothing() {
    let Some(t) = telemetry("a_dropped_meter_counts_nothing") else {
        return;
    };
    let e = t.meter_copies(0).expect_err("pid 0");
    assert!(e.to_string().contains("process 0"), "{e}");
    let e = t
        .meter_copies(i32::MAX as u32)
        .expect_err("no such process");
    assert!(
        e.to_string().contains(&(i32::MAX as u32).to_string()),
        "{e}"
    );

    let cg = TestCgroup::new();
    let watch = t.watch(&cg.path, false).expect("watch");
    let src = vec![1u8; 1 << 16];
    let mut dst = vec![0u8; 1 << 16];
    let (s, d) = (src.as_ptr() as usize, dst.as_mut_ptr() as usize);
    let memcpy: Copy3 = libc::memcpy;
    let (go_r, go_w) = pipe();
    let child = spawn_in(&cg, || {
        if !await_signal(go_r) {
            return 10;
        }
        // SAFETY: both buffers hold 64 KiB.
        unsafe { std::ptr::read_volatile(&memcpy)(d as *mut c_void, s as *const c_void, 1 << 16) };
        0
    });
    drop(t.meter_copies(child as u32).expect("meter"));
    assert!(signal(go_w));
    assert_eq!(wait(child), 0);
    assert_eq!(watch.take().expect("take").memcpy_calls, 0);
    drop(dst);
}

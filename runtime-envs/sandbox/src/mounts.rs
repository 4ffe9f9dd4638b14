//! The new root: a small tmpfs holding the read-only binds, a private `/tmp`, a fresh `/proc`
//! and the harmless devices, then `pivot_root` into it and the old root detached.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::error::{Result, SandboxError};
use crate::spec::Spec;

const DEVICES: [&str; 5] = ["null", "zero", "full", "random", "urandom"];

fn sys(what: String) -> impl FnOnce(nix::errno::Errno) -> SandboxError {
    move |e| SandboxError::sys(what, e)
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> SandboxError {
    move |e| SandboxError::sys(what, nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
}

fn inside(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

pub(crate) fn build_root(spec: &Spec) -> Result<()> {
    let root = &spec.root;
    let none: Option<&str> = None;
    // Nothing done here may propagate back to the host's mounts.
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none).map_err(sys("making / private".into()))?;
    mount(Some("tmpfs"), root, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755,size=4m"))
        .map_err(sys(format!("tmpfs on {}", root.display())))?;

    // The private /tmp first: a bind below /tmp (a project in a temporary folder) then lands
    // inside it.
    let tmp = root.join("tmp");
    fs::create_dir_all(&tmp).map_err(io("creating /tmp".into()))?;
    let opts = format!("mode=1777,size={}", spec.tmp_bytes.max(1 << 20));
    mount(Some("tmpfs"), &tmp, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some(opts.as_str()))
        .map_err(sys("tmpfs on /tmp".into()))?;
    for b in &spec.binds {
        let dst = inside(root, b.target());
        let meta = fs::symlink_metadata(&b.src).map_err(io(format!("bind source {}", b.src.display())))?;
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
        }
        if meta.file_type().is_symlink() {
            // Merged-/usr systems have /lib -> usr/lib: keep the link, the target is bound too.
            let to = fs::read_link(&b.src).map_err(io(format!("reading link {}", b.src.display())))?;
            if fs::symlink_metadata(&dst).is_err() {
                symlink(&to, &dst).map_err(io(format!("link {}", dst.display())))?;
            }
            continue;
        }
        if meta.is_dir() {
            fs::create_dir_all(&dst).map_err(io(format!("creating {}", dst.display())))?;
        } else if fs::symlink_metadata(&dst).is_err() {
            fs::File::create(&dst).map_err(io(format!("creating {}", dst.display())))?;
        }
        bind(&b.src, &dst, !b.writable, MsFlags::MS_NOSUID | MsFlags::MS_NODEV)?;
    }

    let dev = root.join("dev");
    fs::create_dir_all(&dev).map_err(io("creating /dev".into()))?;
    for d in DEVICES {
        let host = Path::new("/dev").join(d);
        if !host.exists() {
            continue;
        }
        let p = dev.join(d);
        fs::File::create(&p).map_err(io(format!("creating {}", p.display())))?;
        bind(&host, &p, false, MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC)?;
    }
    symlink("/proc/self/fd", dev.join("fd")).map_err(io("linking /dev/fd".into()))?;

    // A /proc of the new pid namespace: it shows only the function's own processes.
    let proc_ = root.join("proc");
    fs::create_dir_all(&proc_).map_err(io("creating /proc".into()))?;
    mount(Some("proc"), &proc_, Some("proc"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC, none)
        .map_err(sys("mounting /proc".into()))?;

    let old = root.join(".old-root");
    fs::create_dir_all(&old).map_err(io("creating the old root's mount point".into()))?;
    nix::unistd::pivot_root(root, &old).map_err(sys("pivot_root".into()))?;
    nix::unistd::chdir("/").map_err(sys("chdir /".into()))?;
    umount2("/.old-root", MntFlags::MNT_DETACH).map_err(sys("detaching the old root".into()))?;
    fs::remove_dir("/.old-root").map_err(io("removing the old root's mount point".into()))?;
    // The root itself turns read-only: only /tmp (and writable binds) take writes.
    mount(none, "/", none, MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV, none)
        .map_err(sys("making / read-only".into()))?;
    nix::unistd::chdir(&spec.workdir).map_err(sys(format!("chdir {}", spec.workdir.display())))?;
    Ok(())
}

fn bind(src: &Path, dst: &Path, read_only: bool, extra: MsFlags) -> Result<()> {
    let none: Option<&str> = None;
    mount(Some(src), dst, none, MsFlags::MS_BIND | MsFlags::MS_REC, none).map_err(sys(format!("binding {}", src.display())))?;
    // A bind mount takes its flags only on a remount.
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(none, dst, none, flags, none).map_err(sys(format!("restricting {}", dst.display())))
}

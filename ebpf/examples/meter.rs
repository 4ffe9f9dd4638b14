//! Runs a command in a fresh cgroup v2 with telemetry watching it and its copies metered, then
//! prints what it was charged: `cargo run -p quiver-ebpf --example meter -- CMD [ARGS...]`
//! (as root). The command's own forks are counted for faults and mmaps, not for copies.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

fn main() {
    if let Err(e) = run() {
        eprintln!("meter: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        return Err("usage: meter CMD [ARGS...]".into());
    };
    let telemetry = quiver_ebpf::Telemetry::start()?;
    let root = std::path::Path::new("/sys/fs/cgroup/unified");
    let root = if root.join("cgroup.procs").exists() {
        root
    } else {
        std::path::Path::new("/sys/fs/cgroup")
    };
    let dir = root.join(format!("quiver-meter-{}", std::process::id()));
    std::fs::create_dir(&dir)?;
    let result = (|| -> Result<(), Box<dyn std::error::Error>> {
        let watch = telemetry.watch(&dir, false)?;
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))?;
        let procs_fd = procs.as_raw_fd();
        let (go_r, mut go_w) = std::io::pipe()?;
        let go_fd = go_r.as_raw_fd();
        // The shell waits on fd 3 until the meter is attached, then execs the command under the
        // same pid (the meter follows exec).
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg("read _ <&3; exec 3<&-; exec \"$@\"")
            .arg("sh")
            .arg(cmd)
            .args(rest);
        // SAFETY: write and dup2 are async-signal-safe: the child enters the cgroup and gets the
        // pipe as fd 3 before it execs the shell.
        unsafe {
            command.pre_exec(move || {
                if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 || libc::dup2(go_fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let mut child = command.spawn()?;
        drop(procs);
        let meter = telemetry.meter_copies(child.id())?;
        go_w.write_all(b"g\n")?;
        drop(go_w);
        let status = child.wait()?;
        drop(go_r);
        drop(meter);
        let c = watch.take()?;
        eprintln!("{status}");
        println!("page_faults   {}", c.page_faults);
        println!("memcpy_bytes  {}", c.memcpy_bytes);
        println!("memcpy_calls  {}", c.memcpy_calls);
        println!("mmaps         {} ({} bytes)", c.mmaps, c.mmap_bytes);
        println!("munmaps       {} ({} bytes)", c.munmaps, c.munmap_bytes);
        let hist: Vec<String> = c
            .memcpy_hist
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(b, n)| format!("<2^{b}:{n}"))
            .collect();
        println!("memcpy sizes  {}", hist.join(" "));
        Ok(())
    })();
    let _ = std::fs::remove_dir(&dir);
    result
}

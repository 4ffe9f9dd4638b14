//! Zygotes end to end, as root: a call forked from a warm zygote enters the sandbox, reads its
//! input without a copy, hands its output on by reference; the sandbox refuses what a function
//! must not do; a killed zygote is replaced. The environment is the test venv scripts/setup
//! makes (/var/tmp/quiver-py), standing in for a store-built one.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use quiver_envs::{Env, EnvSpec, ForkRequest, ZygoteOptions, ZygotePool};
use quiver_sandbox::cgroup::{CgroupLimits, CgroupRoot};
use quiver_sandbox::{Limits, Spec};
use quiver_shm::sipc::{ReadOptions, SipcRead, TableWriter, read_table};
use quiver_shm::transport::{RecvLimits, recv, send, send_table, socketpair};
use serde_json::{Value, json};

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn venv() -> PathBuf {
    PathBuf::from(std::env::var("QUIVER_TEST_VENV").unwrap_or_else(|_| "/var/tmp/quiver-py".into()))
}

/// The tests of this file run one at a time: they count the process's fds and segments.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Root and the test venv, or a skip (a failure under CI).
fn ready() -> bool {
    let mut why = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        why.push("needs root (namespaces, cgroups)".to_owned());
    }
    if !venv().join("bin/python").exists() {
        why.push(format!("{} missing (run scripts/setup)", venv().display()));
    }
    if why.is_empty() {
        return true;
    }
    assert!(!in_ci(), "zygote tests: {}", why.join("; "));
    eprintln!("skipped: {}", why.join("; "));
    false
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().expect("repo")
}

/// The two cdylibs, built when missing (`cargo test` builds no cdylib for integration tests).
fn libs() -> (PathBuf, PathBuf) {
    let exe = std::env::current_exe().expect("exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir").to_owned();
    let (pre, sb) = (dir.join("libquiver_preload.so"), dir.join("libquiver_sandbox.so"));
    if !pre.exists() || !sb.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo).args(["build", "-p", "quiver-preload", "-p", "quiver-sandbox"]).current_dir(repo()).status().expect("cargo");
        assert!(st.success(), "building the cdylibs");
    }
    (pre, sb)
}

fn env() -> Env {
    let python = venv().join("bin/python");
    let out = Command::new(&python).args(["-c", "import sys, site; print(sys.base_prefix); print(site.getsitepackages()[0])"]).output().expect("python");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    Env {
        key: "test-venv".into(),
        path: venv(),
        python,
        python_version: "3.11".into(),
        base_prefix: PathBuf::from(lines.next().expect("base_prefix")),
        site_packages: PathBuf::from(lines.next().expect("site")),
        spec: EnvSpec::new("3.11", [("pandas", "")]),
        lock: String::new(),
    }
}

struct Fixture {
    pool: ZygotePool,
    env: Env,
    cgroups: CgroupRoot,
    dir: tempfile::TempDir,
    preload: PathBuf,
}

fn fixture() -> Fixture {
    let (preload, sandbox_lib) = libs();
    let netns = quiver_sandbox::netns::empty().expect("netns");
    let opts = ZygoteOptions {
        harness_dir: repo().join("runtime-envs/python"),
        preload: preload.clone(),
        sandbox_lib,
        max: 2,
        start_timeout: Duration::from_secs(120),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::create_dir_all("/run/quiver/sandbox").expect("sandbox root");
    Fixture { pool: ZygotePool::new(opts, Some(Arc::new(netns))), env: env(), cgroups: CgroupRoot::discover("quiver-test").expect("cgroups"), dir, preload }
}

fn input(n: usize) -> quiver_shm::sipc::SipcTable {
    let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false), Field::new("x", DataType::Float64, false), Field::new("c", DataType::Utf8, false)]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(0..n as i64)),
        Arc::new(Float64Array::from_iter_values((0..n).map(|i| i as f64))),
        Arc::new(StringArray::from_iter_values((0..n).map(|i| if i % 2 == 0 { "a" } else { "b" }))),
    ];
    let b = RecordBatch::try_new(schema.clone(), cols).expect("batch");
    let mut w = TableWriter::new(schema);
    w.write(&b).expect("write");
    w.finish().expect("finish")
}

struct Outcome {
    forked: quiver_envs::Forked,
    reply: Value,
    table: Option<SipcRead>,
    log: String,
}

impl Fixture {
    fn spec(&self, network: bool) -> Spec {
        let binds = quiver_envs::binds(&self.env, &repo().join("runtime-envs/python"), &self.preload, &[self.dir.path()]);
        Spec {
            root: "/run/quiver/sandbox".into(),
            binds,
            tmp_bytes: 64 << 20,
            uid: 65534,
            gid: 65534,
            hostname: "quiver".into(),
            limits: Limits::default(),
            keep_fds: vec![],
            network,
            workdir: "/tmp".into(),
        }
    }

    /// Calls `function` of `source` on one input table `data`.
    fn call(&self, source: &str, function: &str, limits: CgroupLimits, timeout: Duration) -> Outcome {
        let module = self.dir.path().join(format!("{function}.py"));
        std::fs::write(&module, source).expect("module");
        std::fs::set_permissions(&module, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let log_path = self.dir.path().join(format!("{function}.log"));
        let log = std::fs::File::create(&log_path).expect("log");
        let mut cg = self.cgroups.create(&format!("t-{}-{function}", std::process::id()), &limits).expect("cgroup");
        let procs = cg.procs_files().expect("procs");
        let (ours, theirs): (OwnedFd, OwnedFd) = socketpair().expect("socketpair");
        let req = ForkRequest {
            conn: theirs.as_fd(),
            log: log.as_fd(),
            cgroup_procs: procs.iter().map(|f| f.as_fd()).collect(),
            network: false,
            sandbox: serde_json::to_value(self.spec(false)).expect("spec"),
        };
        let forked = self.pool.fork(&self.env, &req).expect("fork");
        drop(req);
        drop(theirs);
        let request = json!({
            "run": "t", "node": function,
            "task": {"Python": {"module": module, "function": function, "env": {"python": "3.11", "pip": {}},
                                "params": [{"arg": "data", "parent": "p", "columns": null, "filter": null}], "expectation": false}},
            "inputs": ["p"], "staging": null, "edges": "arena",
        });
        let s = ours.as_fd();
        // A function that died early (the sandbox refused it) closes its socket: its log says why.
        let _ = send(s, &serde_json::to_vec(&request).expect("json"), &[]).and_then(|_| send_table(s, &input(100_000)));
        let t0 = Instant::now();
        // A reply, or nothing when the function was killed (its socket closes).
        let msg = || recv(s, &RecvLimits::default()).ok().and_then(|(b, _)| serde_json::from_slice::<Value>(&b).ok());
        let _hello = msg();
        let reply = std::thread::scope(|sc| {
            let h = sc.spawn(msg);
            while !h.is_finished() && t0.elapsed() < timeout {
                std::thread::sleep(Duration::from_millis(10));
            }
            if !h.is_finished() {
                cg.kill(Duration::from_secs(5));
            }
            h.join().expect("reply thread")
        })
        .unwrap_or(Value::Null);
        let table = reply.get("Table").map(|_| {
            let (b, fds) = recv(s, &RecvLimits::default()).expect("table");
            read_table(&b, fds, &ReadOptions::default()).expect("valid table")
        });
        let oom = cg.oom_kills();
        cg.remove();
        let mut log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if oom > 0 {
            log.push_str("\n[oom-killed]");
        }
        Outcome { forked, reply, table, log }
    }
}

const NO_LIMITS: CgroupLimits = CgroupLimits { memory: Some(1 << 30), pids: Some(64), cpus: None };

#[test]
fn a_forked_function_reads_and_writes_without_copies() {
    let _serial = serial();
    if !ready() {
        return;
    }
    let f = fixture();
    let src = "import pyarrow.compute as pc\ndef double(data):\n    return data.append_column('y', pc.multiply(data['x'], 2))\n";
    let first = f.call(src, "double", NO_LIMITS, Duration::from_secs(120));
    assert!(first.forked.cold, "the first call starts the zygote");
    let o = f.call(src, "double", NO_LIMITS, Duration::from_secs(60));
    assert!(!o.forked.cold, "the second call forks from the warm zygote");
    let t = o.table.unwrap_or_else(|| panic!("no table: {} / {}", o.reply, o.log));
    let b = &t.batches[0];
    let y = b.column_by_name("y").expect("y").as_any().downcast_ref::<Float64Array>().expect("f64").clone();
    assert_eq!(y.len(), 100_000);
    assert_eq!(y.value(4), 8.0);
    let bytes = &o.reply["Table"]["bytes"];
    assert_eq!(bytes["copied"], 0, "{}", o.reply);
    assert!(bytes["referenced"].as_u64().unwrap_or(0) >= 800_000, "{}", o.reply);
}

#[test]
fn the_sandbox_refuses_what_a_function_must_not_do() {
    let _serial = serial();
    if !ready() {
        return;
    }
    let f = fixture();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let agent = std::process::id();
    let src = format!(
        r#"
import ctypes, os, socket, pyarrow as pa
libc = ctypes.CDLL(None, use_errno=True)
def attempt(f):
    try:
        return "allowed: " + repr(f())
    except Exception as e:
        return "refused: " + type(e).__name__ + ": " + str(e)
def rc(r):
    if r != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return r
def probes(data):
    out = {{
        "shadow": attempt(lambda: open("/etc/shadow").read()),
        "write_usr": attempt(lambda: open("/usr/quiver-probe", "w")),
        "write_input": attempt(lambda: memoryview(data.column("x").chunk(0).buffers()[1]).__setitem__(0, 1)),
        "connect": attempt(lambda: socket.create_connection(("127.0.0.1", {port}), timeout=2)),
        "ptrace": attempt(lambda: rc(libc.ptrace(16, {agent}, 0, 0))),
        "mount": attempt(lambda: rc(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))),
        "uid": str(os.getuid()),
        "pid": str(os.getpid()),
    }}
    return pa.table({{"probe": list(out), "result": list(out.values())}})
"#
    );
    let o = f.call(&src, "probes", NO_LIMITS, Duration::from_secs(120));
    let t = o.table.unwrap_or_else(|| panic!("no table: {} / {}", o.reply, o.log));
    let b = &t.batches[0];
    let col = |n: &str| b.column_by_name(n).expect(n).as_any().downcast_ref::<StringArray>().expect("utf8").clone();
    let (names, results) = (col("probe"), col("result"));
    let get = |k: &str| (0..names.len()).find(|&i| names.value(i) == k).map(|i| results.value(i).to_owned()).expect(k);
    for k in ["shadow", "write_usr", "write_input", "connect", "ptrace", "mount"] {
        assert!(get(k).starts_with("refused"), "{k}: {}", get(k));
    }
    assert_eq!(get("uid"), "65534");
    assert_eq!(get("pid"), "1", "the function is the first process of its own pid namespace");
}

#[test]
fn limits_kill_fork_bombs_hogs_and_endless_loops() {
    let _serial = serial();
    if !ready() {
        return;
    }
    let f = fixture();
    let bomb = "import os\ndef bomb(data):\n    while True:\n        os.fork()\n";
    let o = f.call(bomb, "bomb", NO_LIMITS, Duration::from_secs(20));
    assert!(o.table.is_none(), "a fork bomb produces no table: {}", o.reply);
    let hog = "def hog(data):\n    x = bytearray(900 << 20)\n    return data\n";
    let o = f.call(hog, "hog", CgroupLimits { memory: Some(200 << 20), pids: Some(64), cpus: None }, Duration::from_secs(60));
    assert!(o.table.is_none(), "{}", o.reply);
    assert!(o.log.contains("[oom-killed]") || o.reply.get("Failed").is_some(), "{} / {}", o.reply, o.log);
    let spin = "def spin(data):\n    while True:\n        pass\n";
    let t0 = Instant::now();
    let o = f.call(spin, "spin", NO_LIMITS, Duration::from_secs(2));
    assert!(o.table.is_none());
    assert!(t0.elapsed() < Duration::from_secs(30), "the timeout killed the loop");
}

#[test]
fn a_killed_zygote_is_replaced() {
    let _serial = serial();
    if !ready() {
        return;
    }
    let f = fixture();
    let src = "def same(data):\n    return data\n";
    assert!(f.call(src, "same", NO_LIMITS, Duration::from_secs(120)).table.is_some());
    let live = f.pool.live();
    assert_eq!(live.len(), 1);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(live[0].1 as i32), nix::sys::signal::Signal::SIGKILL).expect("kill");
    std::thread::sleep(Duration::from_millis(100));
    let o = f.call(src, "same", NO_LIMITS, Duration::from_secs(120));
    assert!(o.forked.cold, "the replacement is a cold start");
    assert!(o.table.is_some(), "{} / {}", o.reply, o.log);
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn children_of(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default().split_whitespace().map(str::to_owned).collect()
}

#[test]
fn two_hundred_calls_leave_no_zombie_fd_or_segment_behind() {
    let _serial = serial();
    if !ready() {
        return;
    }
    let f = fixture();
    let src = "import pyarrow.compute as pc\ndef inc(data):\n    return data.append_column('y', pc.add(data['x'], 1))\n";
    assert!(f.call(src, "inc", NO_LIMITS, Duration::from_secs(120)).table.is_some());
    let zygote = f.pool.live()[0].1;
    let (fds0, ours0) = (fd_count(zygote), fd_count(std::process::id()));
    let segments0 = quiver_shm::live_chunks();
    for i in 0..200 {
        let o = f.call(src, "inc", NO_LIMITS, Duration::from_secs(60));
        assert!(o.table.is_some(), "call {i}: {} / {}", o.reply, o.log);
        assert!(!o.forked.cold, "call {i} was forked from the warm zygote");
    }
    // Children exit right after answering; the zygote reaps them as they go.
    let t0 = Instant::now();
    while !children_of(zygote).is_empty() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(children_of(zygote), Vec::<String>::new(), "no child (zombie or alive) left");
    assert_eq!(f.pool.live()[0].1, zygote, "the same zygote served every call");
    assert_eq!(fd_count(zygote), fds0, "the zygote's fds are back to their count");
    assert_eq!(fd_count(std::process::id()), ours0, "the caller's fds are back to their count");
    assert_eq!(quiver_shm::live_chunks(), segments0, "no segment of ours is left");
}

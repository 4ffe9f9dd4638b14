//! A test agent on a temporary socket, and a small blocking HTTP client for it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_quiver");

/// A `quiver agent` process on a temporary socket and warehouse.
pub struct TestAgent {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
}

impl TestAgent {
    pub fn start(extra: &[&str]) -> TestAgent {
        Self::start_with_env(extra, &[])
    }

    /// An agent with extra flags and environment variables.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> TestAgent {
        Self::start_as(extra, env, None)
    }

    /// An agent running as user and group `uid` (the test must be root to ask for one).
    pub fn start_as(extra: &[&str], env: &[(&str, &str)], uid: Option<u32>) -> TestAgent {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("agent.sock");
        let mut cmd = Command::new(BIN);
        if let Some(id) = uid {
            // Its socket and warehouse go in the temporary folder: it must be able to write there.
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
            cmd.uid(id).gid(id);
        }
        let child = cmd
            .args(["agent", "--socket"])
            .arg(&sock)
            .arg("--warehouse")
            .arg(dir.path().join("warehouse"))
            .args(extra)
            .env("QUIVER_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start quiver agent");
        let t0 = Instant::now();
        while UnixStream::connect(&sock).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(20), "agent did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        TestAgent { dir, child: Some(child) }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    pub fn warehouse(&self) -> PathBuf {
        self.dir.path().join("warehouse")
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// One request; returns (status, body).
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        request(&self.socket(), method, path, body.map(str::as_bytes))
    }

    pub fn json(&self, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        let (s, b) = self.call(method, path, body);
        (s, serde_json::from_str(&b).unwrap_or_else(|e| panic!("{method} {path}: {e}: {b}")))
    }

    /// Submits a plan and waits for the run to finish; returns its status.
    pub fn run(&self, plan: &serde_json::Value) -> serde_json::Value {
        let (s, v) = self.json("POST", "/v1/runs", Some(&plan.to_string()));
        assert_eq!(s, 201, "{v}");
        let id = v["id"].as_str().expect("id").to_owned();
        self.wait(&id)
    }

    pub fn wait(&self, id: &str) -> serde_json::Value {
        let t0 = Instant::now();
        loop {
            let (_, v) = self.json("GET", &format!("/v1/runs/{id}"), None);
            if v["status"] != "running" {
                return v;
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "run {id} did not finish: {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the agent's pool of waiting workers is full again (it refills in the
    /// background after each launch); returns how many wait.
    pub fn settle(&self) -> u64 {
        let t0 = Instant::now();
        loop {
            let (_, m) = self.call("GET", "/metrics", None);
            let idle = m.lines().find_map(|l| l.strip_prefix("quiver_workers_idle ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
            if idle >= 2 || t0.elapsed() > Duration::from_secs(20) {
                return idle;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The agent's open fds once they have not changed for 200 ms: a refill of the waiting
    /// workers that lost its race holds a few while it starts and stops its extra worker.
    pub fn steady_fds(&self) -> usize {
        let t0 = Instant::now();
        let mut last = (self.fds(), Instant::now());
        while t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
            let n = self.fds();
            if n != last.0 {
                last = (n, Instant::now());
            } else if last.1.elapsed() >= Duration::from_millis(200) {
                break;
            }
        }
        last.0
    }

    /// The agent's open fds.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map(|d| d.count()).unwrap_or(0)
    }

    /// memfd bytes the agent holds (fds), from /proc.
    pub fn memfd_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("/memfd:")))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Children of the agent process running a node (named `quiver:NODE` once they have their
    /// request; waiting ones are `quiver:idle`, just started ones still `quiver`).
    pub fn children(&self) -> Vec<i32> {
        self.all_children()
            .into_iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim().starts_with("quiver:") && c.trim() != "quiver:idle")
            })
            .collect()
    }

    /// The worker running node `node`, once it has its request.
    pub fn worker(&self, node: &str) -> Option<i32> {
        let want = format!("quiver:{node}");
        // comm holds at most 15 bytes.
        let want = &want[..want.len().min(15)];
        self.children().into_iter().find(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == want))
    }

    /// Every descendant of the agent process, waiting workers included (a sandboxed worker does
    /// its work in a child it forks into its pid namespace).
    pub fn all_children(&self) -> Vec<i32> {
        let parents: Vec<(i32, i32)> = std::fs::read_dir("/proc")
            .expect("/proc")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter_map(|p| {
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
                let ppid = stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()?;
                Some((p, ppid))
            })
            .collect();
        let mut found = vec![self.pid()];
        let mut i = 0;
        while i < found.len() {
            let parent = found[i];
            found.extend(parents.iter().filter(|&&(_, pp)| pp == parent).map(|&(p, _)| p));
            i += 1;
        }
        found.remove(0);
        found
    }

    /// Sends SIGTERM and waits; returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().expect("wait")
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A blocking HTTP/1.1 request over a Unix socket (Connection: close), chunked bodies decoded.
pub fn request(sock: &Path, method: &str, path: &str, body: Option<&[u8]>) -> (u16, String) {
    let mut s = UnixStream::connect(sock).expect("connect");
    let body = body.unwrap_or(b"");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: quiver\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write");
    let _ = s.write_all(body);
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).expect("status line");
    let code: u16 = status.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("bad status {status:?}"));
    let mut chunked = false;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).expect("header");
        if h == "\r\n" || h.is_empty() {
            break;
        }
        if h.to_ascii_lowercase().starts_with("transfer-encoding: chunked") {
            chunked = true;
        }
    }
    let mut out = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).expect("chunk size");
            let n = usize::from_str_radix(size.trim(), 16).expect("hex size");
            if n == 0 {
                break;
            }
            let mut buf = vec![0; n + 2];
            r.read_exact(&mut buf).expect("chunk");
            out.extend_from_slice(&buf[..n]);
        }
    } else {
        r.read_to_end(&mut out).expect("body");
    }
    (code, String::from_utf8_lossy(&out).into_owned())
}

/// Generates `rows` taxi trips into `dir`.
pub fn taxi(dir: &Path, rows: u64) {
    let st = Command::new(BIN).args(["gen-taxi", "--out"]).arg(dir).args(["--size", &format!("{rows}rows")]).status().expect("gen-taxi");
    assert!(st.success());
}

/// Whether tests that need root or a kernel feature must fail rather than skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The wheel folder scripts/setup fills, from which the Python tests' environments are built
/// offline.
pub const WHEELS: &str = "/var/tmp/quiver-wheels";

/// Whether the Python tests can run here (root, the wheels); skips with the reason, or fails
/// under CI.
pub fn python_ready() -> bool {
    let mut why = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        why.push("needs root (sandbox, cgroups)".to_owned());
    }
    if !std::path::Path::new(WHEELS).join(".complete").exists() && std::fs::read_dir(WHEELS).map_or(true, |d| d.count() == 0) {
        why.push(format!("{WHEELS} is empty (run scripts/setup)"));
    }
    if why.is_empty() {
        return true;
    }
    assert!(!in_ci(), "python tests: {}", why.join("; "));
    eprintln!("skipped: {}", why.join("; "));
    false
}

/// An agent whose environments are built offline into a store shared by the Python tests.
pub fn python_agent(dir: &Path) -> TestAgent {
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[python]\nenvs = \"/var/tmp/quiver-test-envs\"\nuv_cache = \"/var/tmp/quiver-test-uv\"\nwheels = \"{WHEELS}\"\nlogs = \"{}\"\n",
            dir.join("logs").display()
        ),
    )
    .expect("config");
    TestAgent::start(&["--config", cfg.to_str().expect("utf8")])
}

/// Whether `pid` is a worker waiting after its output (QUIVER_DEBUG_STOP_NODE): stopped, or, as
/// a sandboxed worker, the first process of its pid namespace, which cannot stop itself and
/// waits with a SIGCONT handler instead.
#[allow(dead_code)]
pub fn debug_stopped(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    if stat.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('T') || r.starts_with('t')) {
        return true;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let caught = status.lines().find_map(|l| l.strip_prefix("SigCgt:")).and_then(|m| u64::from_str_radix(m.trim(), 16).ok());
    caught.is_some_and(|m| m & (1 << (libc::SIGCONT - 1)) != 0)
}

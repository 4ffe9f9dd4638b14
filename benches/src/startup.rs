//! Function start: from the moment the agent asks for a call to the first line of user code,
//! with the full sandbox (namespaces, cgroup, uid, seccomp, landlock) every time.
//!
//! * `cold`: no zygote: one is started for the call (Python plus the harness and pyarrow).
//! * `cold-imports`: the same, with pandas imported as well.
//! * `zygote`: forked from a warm zygote that has pyarrow and pandas imported.
//! * `preforked`: forked the same way *before* the clock starts, as the agent does for a run's
//!   Python nodes while their parents run (`[python] prefork`): the request to a call waiting
//!   in its cgroup and sandbox, to its first line.
//!
//! The environment is the venv `--venv` (scripts/setup makes /var/tmp/quiver-py), standing in
//! for a store-built one. Needs root.

use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use arrow_array::{Array, Int64Array};
use quiver_envs::{Env, EnvSpec, ForkRequest, ZygoteOptions, ZygotePool};
use quiver_sandbox::cgroup::{CgroupLimits, CgroupRoot};
use quiver_sandbox::{Limits, Spec};
use quiver_shm::sipc::{ReadOptions, read_table};
use quiver_shm::transport::{RecvLimits, recv, send, socketpair};
use serde_json::json;

/// Options of `startup`.
#[derive(clap::Args)]
pub struct Args {
    /// Warm starts to time.
    #[arg(long, default_value_t = 200)]
    n: usize,
    /// Cold starts to time per cold variant (each imports pyarrow, and pandas, afresh).
    #[arg(long, default_value_t = 20)]
    cold_n: usize,
    /// The Python environment (a venv with pyarrow and pandas).
    #[arg(long, default_value = "/var/tmp/quiver-py")]
    venv: PathBuf,
    /// One JSON object per variant.
    #[arg(long)]
    json: bool,
}

fn target_dir() -> PathBuf {
    std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_owned)).unwrap_or_default()
}

fn env(venv: &Path, pandas: bool) -> Result<Env> {
    let python = venv.join("bin/python");
    let out = Command::new(&python).args(["-c", "import sys, site; print(sys.base_prefix); print(site.getsitepackages()[0])"]).output().context("python")?;
    let text = String::from_utf8(out.stdout)?;
    let mut l = text.lines();
    let pip: Vec<(&str, &str)> = if pandas { vec![("pandas", "")] } else { vec![] };
    Ok(Env {
        key: format!("bench-{pandas}"),
        path: venv.to_owned(),
        python,
        python_version: "3.11".into(),
        base_prefix: l.next().context("base_prefix")?.into(),
        site_packages: l.next().context("site")?.into(),
        spec: EnvSpec::new("3.11", pip),
        lock: String::new(),
    })
}

struct Bench {
    pool: ZygotePool,
    cgroups: CgroupRoot,
    dir: tempfile::TempDir,
    harness: PathBuf,
    preload: PathBuf,
    calls: usize,
}

impl Bench {
    fn spec(&self, env: &Env) -> Spec {
        let binds = quiver_envs::binds(env, &self.harness, &self.preload, &[self.dir.path()]);
        Spec { root: "/run/quiver/sandbox".into(), binds, tmp_bytes: 64 << 20, uid: 65534, gid: 65534, hostname: "quiver".into(), limits: Limits::default(), keep_fds: vec![], network: false, workdir: "/tmp".into() }
    }

    /// One call; returns ms from the request to the function's first line. With `ahead`, the
    /// call is forked (into its cgroup and sandbox) before the clock starts.
    fn start(&mut self, env: &Env, ahead: bool) -> Result<f64> {
        self.calls += 1;
        let module = self.dir.path().join("first_line.py");
        let log = std::fs::File::create(self.dir.path().join("log"))?;
        let mut cg = self.cgroups.create(&format!("bench-{}-{}", std::process::id(), self.calls), &CgroupLimits { memory: Some(2 << 30), pids: Some(64), cpus: None })?;
        let procs = cg.procs_files()?;
        let (ours, theirs) = socketpair()?;
        let mut t0 = quiver_envs_clock();
        let req = ForkRequest { conn: theirs.as_fd(), log: log.as_fd(), cgroup_procs: procs.iter().map(|f| f.as_fd()).collect(), network: false, sandbox: serde_json::to_value(self.spec(env))? };
        self.pool.fork(env, &req)?;
        drop(req);
        drop(theirs);
        if ahead {
            // Long enough for the call to be in its sandbox, waiting, as a node's parents take.
            std::thread::sleep(Duration::from_millis(50));
            t0 = quiver_envs_clock();
        }
        let request = json!({"run": "bench", "node": "first_line", "task": {"Python": {"module": module, "function": "first_line",
            "env": {"python": "3.11", "pip": {}}, "params": [], "expectation": false}}, "inputs": [], "staging": null, "edges": "arena"});
        let s = ours.as_fd();
        send(s, &serde_json::to_vec(&request)?, &[])?;
        let (hello, _) = recv(s, &RecvLimits::default())?;
        if std::env::var_os("QUIVER_BENCH_DEBUG").is_some() {
            let h: serde_json::Value = serde_json::from_slice(&hello)?;
            eprintln!("hello after {:.2} ms", (h["started_ns"].as_u64().unwrap_or(0).saturating_sub(t0)) as f64 / 1e6);
        }
        let (reply, _) = recv(s, &RecvLimits::default())?;
        let reply: serde_json::Value = serde_json::from_slice(&reply)?;
        if reply.get("Table").is_none() {
            bail!("the call failed: {reply}: {}", std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default());
        }
        let (b, fds) = recv(s, &RecvLimits::default())?;
        let t = read_table(&b, fds, &ReadOptions::default())?;
        let first = t.batches[0].column(0).as_any().downcast_ref::<Int64Array>().context("t")?.value(0) as u64;
        cg.remove();
        Ok(first.saturating_sub(t0) as f64 / 1e6)
    }
}

fn quiver_envs_clock() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap_or(nix::sys::time::TimeSpec::new(0, 0));
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Runs the benchmark.
pub fn run(a: Args) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("startup needs root (namespaces, cgroups)");
    }
    let dir = target_dir();
    let (preload, sandbox_lib) = (dir.join("libquiver_preload.so"), dir.join("libquiver_sandbox.so"));
    if !preload.exists() || !sandbox_lib.exists() {
        bail!("build the libraries first: cargo build --release -p quiver-preload -p quiver-sandbox");
    }
    let harness = Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime-envs/python").canonicalize()?;
    let tmp = tempfile::tempdir()?;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))?;
    let module = tmp.path().join("first_line.py");
    std::fs::write(&module, "import time\nimport pyarrow as pa\ndef first_line():\n    t = time.monotonic_ns()\n    return pa.table({'t': [t]})\n")?;
    std::fs::set_permissions(&module, std::fs::Permissions::from_mode(0o644))?;
    std::fs::create_dir_all("/run/quiver/sandbox")?;
    let opts = ZygoteOptions { harness_dir: harness.clone(), preload: preload.clone(), sandbox_lib, max: 2, start_timeout: Duration::from_secs(120) };
    let netns = Arc::new(quiver_sandbox::netns::empty()?);
    let mut b = Bench { pool: ZygotePool::new(opts, Some(netns)), cgroups: CgroupRoot::discover("quiver-bench")?, dir: tmp, harness, preload, calls: 0 };
    let plain = env(&a.venv, false)?;
    let pandas = env(&a.venv, true)?;
    let mut results = Vec::new();
    let variants = [
        ("cold", &plain, a.cold_n, true, false),
        ("cold-imports", &pandas, a.cold_n, true, false),
        ("zygote", &pandas, a.n, false, false),
        ("preforked", &pandas, a.n, false, true),
    ];
    for (variant, e, n, cold, ahead) in variants {
        if !cold {
            b.pool.prestart(e)?;
            b.start(e, false)?;
        }
        let mut ms = Vec::with_capacity(n);
        for _ in 0..n {
            if cold {
                b.pool.shutdown();
            }
            ms.push(b.start(e, ahead)?);
        }
        let (p50, p99) = (pct(&mut ms, 0.5), pct(&mut ms, 0.99));
        results.push(json!({"variant": variant, "n": n, "p50_ms": p50, "p99_ms": p99}));
    }
    for r in &results {
        if a.json {
            println!("{r}");
        } else {
            println!("{:<14} n={:<4} p50 {:>8.2} ms   p99 {:>8.2} ms", r["variant"].as_str().unwrap_or(""), r["n"], r["p50_ms"].as_f64().unwrap_or(0.0), r["p99_ms"].as_f64().unwrap_or(0.0));
        }
    }
    Ok(())
}

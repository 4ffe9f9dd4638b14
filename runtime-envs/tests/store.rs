//! The environment store against real uv, offline, with wheels built by the tests.

mod common;

use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{Scratch, run_python, write_wheel};
use quiver_envs::{EnvSpec, GcPolicy, Progress, StoreError};

/// Records the phases a build went through.
#[derive(Default)]
struct Phases(Mutex<Vec<Progress>>);

impl Phases {
    fn callback(&self) -> impl Fn(Progress) + '_ {
        |p| self.0.lock().unwrap().push(p)
    }
    fn built(&self) -> usize {
        self.0.lock().unwrap().iter().filter(|p| matches!(p, Progress::Installing { .. })).count()
    }
    fn is_empty(&self) -> bool {
        self.0.lock().unwrap().is_empty()
    }
}

#[test]
fn a_known_spec_is_a_lookup() {
    let Some(s) = Scratch::new("a_known_spec_is_a_lookup") else { return };
    let store = s.store();
    let spec = EnvSpec::new(&s.python, [("alpha", "1.0")]);

    let phases = Phases::default();
    let env = store.ensure(&spec, &phases.callback()).expect("build");
    assert_eq!(phases.built(), 1);
    assert_eq!(env.lock, "alpha==1.0\n");
    assert!(env.path.join("env.json").is_file());
    assert!(env.site_packages.join("alpha").is_dir());
    assert!(env.base_prefix.is_dir());
    assert_eq!(run_python(&env.python, "import alpha, sys; print(alpha.VERSION, sys.prefix)"), format!("1.0 {}", env.path.display()));
    let before = s.entries();

    let again = Phases::default();
    let start = Instant::now();
    let env2 = store.ensure(&spec, &again.callback()).expect("lookup");
    let took = start.elapsed();
    assert!(again.is_empty(), "a lookup reports no build phases");
    assert_eq!(env2, env);
    assert_eq!(s.entries(), before, "no new folder");
    assert!(took < Duration::from_millis(100), "lookup took {took:?}");
    eprintln!("lookup of a known spec: {took:?}");

    // Another store on the same root (another process) finds it too, without building.
    let other = s.store();
    let third = Phases::default();
    assert_eq!(other.ensure(&spec, &third.callback()).expect("lookup").key, env.key);
    assert_eq!(third.built(), 0);
    assert_eq!(store.get(&env.key).expect("get").lock, env.lock);
    assert_eq!(store.list().expect("list").len(), 1);
}

#[test]
fn adding_a_package_reuses_the_others() {
    let Some(s) = Scratch::new("adding_a_package_reuses_the_others") else { return };
    write_wheel(&s.wheels, "gamma", "0.3", &[]);
    let store = s.store();
    let first = store.ensure(&EnvSpec::new(&s.python, [("beta", "")]), &|_| {}).expect("beta");
    assert_eq!(first.lock, "alpha==2.0\nbeta==1.0\n", "the dependency resolves to its newest allowed version");
    let second = store.ensure(&EnvSpec::new(&s.python, [("beta", ""), ("gamma", "")]), &|_| {}).expect("beta+gamma");
    assert_ne!(first.key, second.key);
    assert_eq!(second.lock, "alpha==2.0\nbeta==1.0\ngamma==0.3\n");
    assert_eq!(run_python(&second.python, "import alpha, beta, gamma; print(gamma.VERSION)"), "0.3");

    // Both environments' copies of alpha are one file, linked from the uv cache.
    let a = std::fs::metadata(first.site_packages.join("alpha/__init__.py")).unwrap();
    let b = std::fs::metadata(second.site_packages.join("alpha/__init__.py")).unwrap();
    assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()), "alpha is hard-linked, not copied");
    assert!(a.nlink() >= 3, "cache + two environments link one inode, nlink {}", a.nlink());

    // A different spelling of a known spec resolves to the same lock, so the same environment.
    let phases = Phases::default();
    let third = store.ensure(&EnvSpec::new(&s.python, [("Beta", ">=1"), ("GAMMA", "0.3")]), &phases.callback()).unwrap();
    assert_eq!(third.key, second.key);
    assert_eq!(phases.built(), 0);
}

#[test]
fn concurrent_ensure_builds_once() {
    let Some(s) = Scratch::new("concurrent_ensure_builds_once") else { return };
    let spec = EnvSpec::new(&s.python, [("beta", "1.0")]);
    // Two stores on one root stand for two processes: their in-process locks are separate, so
    // only the flock keeps them apart.
    let stores = [s.store(), s.store()];
    let phases = Phases::default();
    let keys: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let store = &stores[i % 2];
                let (spec, phases) = (&spec, &phases);
                scope.spawn(move || store.ensure(spec, &phases.callback()).expect("ensure").key)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
    assert_eq!(phases.built(), 1, "one build for four callers: {:?}", phases.0.lock().unwrap());
    assert_eq!(s.envs(), [keys[0].clone()]);
    assert!(s.leftovers().is_empty());
}

#[test]
fn failures_leave_nothing_and_are_retried() {
    let Some(s) = Scratch::new("failures_leave_nothing_and_are_retried") else { return };
    let store = s.store();

    let unknown = EnvSpec::new(&s.python, [("gamma", "")]);
    let err = store.ensure(&unknown, &|_| {}).unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, StoreError::Resolve(_)), "{err:?}");
    assert!(msg.contains("gamma") && msg.contains("not found"), "uv's reason: {msg}");
    assert!(!msg.contains("Using CPython"), "chatter trimmed: {msg}");

    let impossible = EnvSpec::new(&s.python, [("alpha", "3.0")]);
    let msg = store.ensure(&impossible, &|_| {}).unwrap_err().to_string();
    assert!(msg.contains("alpha==3.0"), "uv's reason: {msg}");
    let msg = store.ensure(&EnvSpec::new(&s.python, [("alpha", "1.0"), ("beta", "")]), &|_| {}).unwrap_err().to_string();
    assert!(msg.contains("beta") && msg.contains("alpha"), "the conflict is explained: {msg}");

    // A wheel that is not a zip passes the resolver's file-name look but fails the build.
    std::fs::write(s.wheels.join("delta-1.0-py3-none-any.whl"), b"not a zip").unwrap();
    let err = store.ensure(&EnvSpec::new(&s.python, [("delta", "")]), &|_| {}).unwrap_err();
    eprintln!("{err}");
    assert!(err.to_string().contains("delta"), "{err}");

    assert!(s.envs().is_empty(), "no environment: {:?}", s.entries());
    assert!(s.leftovers().is_empty(), "no staging folder: {:?}", s.entries());
    assert_eq!(std::fs::read_dir(s.root().join(".resolved")).unwrap().count(), 0);

    // The next request retries, and succeeds once the package exists.
    write_wheel(&s.wheels, "gamma", "1.1", &[]);
    let env = store.ensure(&unknown, &|_| {}).expect("retry");
    assert_eq!(run_python(&env.python, "import gamma; print(gamma.VERSION)"), "1.1");
}

#[test]
fn a_cached_resolution_does_not_hide_a_failing_build() {
    let Some(s) = Scratch::new("a_cached_resolution_does_not_hide_a_failing_build") else { return };
    let store = s.store();
    let spec = EnvSpec::new(&s.python, [("alpha", "1.0")]);
    let env = store.ensure(&spec, &|_| {}).expect("build");
    store.remove(&env.key).expect("remove");
    std::fs::remove_file(s.wheels.join("alpha-1.0-py3-none-any.whl")).unwrap();
    let err = store.ensure(&spec, &|_| {}).unwrap_err();
    assert!(err.to_string().contains("alpha"), "{err}");
    assert!(s.envs().is_empty() && s.leftovers().is_empty(), "{:?}", s.entries());
}

#[test]
fn bad_specs_are_refused() {
    let Some(s) = Scratch::new("bad_specs_are_refused") else { return };
    let store = s.store();
    for name in ["-r", "--index-url=http://evil", "a b", "x;rm -rf /", "pkg@https://evil/p.whl", "https://evil/p.whl", "../pkg"] {
        let err = store.ensure(&EnvSpec::new(&s.python, [(name, "")]), &|_| {}).unwrap_err();
        assert!(matches!(err, StoreError::InvalidSpec(_)), "{name:?}: {err:?}");
    }
    for version in ["1.0; sys_platform=='linux'", "1.0 --pre", "@ file:///etc"] {
        let err = store.ensure(&EnvSpec::new(&s.python, [("alpha", version)]), &|_| {}).unwrap_err();
        assert!(matches!(err, StoreError::InvalidSpec(_)), "{version:?}: {err:?}");
    }
    let err = store.ensure(&EnvSpec::new("3.99", [("alpha", "")]), &|_| {}).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::PythonNotFound { .. }), "{err:?}");
    assert!(msg.contains("3.99") && msg.contains(&s.python), "names what exists: {msg}");
    assert!(matches!(store.ensure(&EnvSpec::new("", []), &|_| {}), Err(StoreError::InvalidSpec(_))));
    assert!(matches!(store.get("../../etc"), Err(StoreError::NotFound(_))));
    assert!(matches!(store.remove("../../etc"), Err(StoreError::NotFound(_))));
    assert!(s.envs().is_empty());
}

#[test]
fn remove_and_gc() {
    let Some(s) = Scratch::new("remove_and_gc") else { return };
    let store = s.store();
    let specs = [
        EnvSpec::new(&s.python, [("alpha", "1.0")]),
        EnvSpec::new(&s.python, [("alpha", "2.0")]),
        EnvSpec::new(&s.python, [("beta", "")]),
    ];
    let mut keys = Vec::new();
    for spec in &specs {
        keys.push(store.ensure(spec, &|_| {}).expect("build").key);
        // Distinct last-use times, oldest first.
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(store.list().unwrap().iter().map(|e| e.key.clone()).collect::<Vec<_>>(), [keys[2].clone(), keys[1].clone(), keys[0].clone()]);

    store.remove(&keys[0]).expect("remove");
    assert!(matches!(store.get(&keys[0]), Err(StoreError::NotFound(_))));
    assert!(matches!(store.remove(&keys[0]), Err(StoreError::NotFound(_))));
    assert!(!s.root().join(&keys[0]).exists());
    // A removed environment is rebuilt on the next request.
    let phases = Phases::default();
    assert_eq!(store.ensure(&specs[0], &phases.callback()).unwrap().key, keys[0]);
    assert_eq!(phases.built(), 1);
    // Now alpha 1.0 is the most recent. A crashed build left its staging folder two hours
    // ago; a live build's is fresh, and gc leaves it alone.
    let crashed = s.root().join(".staging-crashed");
    std::fs::create_dir(&crashed).unwrap();
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    std::fs::File::open(&crashed).unwrap().set_modified(two_hours_ago).unwrap();
    let live = s.root().join(".staging-live");
    std::fs::create_dir(&live).unwrap();

    let removed = store.gc(GcPolicy { keep: Some(1), older_than: Some(Duration::from_secs(3600)) }).unwrap();
    assert!(removed.is_empty(), "nothing is an hour old: {removed:?}");
    let mut removed = store.gc(GcPolicy { keep: Some(1), older_than: None }).unwrap();
    removed.sort();
    let mut expect = vec![keys[1].clone(), keys[2].clone()];
    expect.sort();
    assert_eq!(removed, expect);
    assert_eq!(s.envs(), [keys[0].clone()]);
    assert_eq!(s.leftovers(), [".staging-live"], "{:?}", s.entries());
    assert_eq!(std::fs::read_dir(s.root().join(".resolved")).unwrap().count(), 1, "stale resolutions pruned");
    assert_eq!(store.gc(GcPolicy::default()).unwrap(), [keys[0].clone()]);
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn a_failed_install_leaves_nothing_and_is_retried() {
    let Some(s) = Scratch::new("a_failed_install_leaves_nothing_and_is_retried") else { return };
    let store = s.store();
    // The resolver reads only the wheel's METADATA; a module whose bytes no longer match the
    // zip's CRC fails when uv extracts it, in the install step.
    let wheel = write_wheel(&s.wheels, "crc", "1.0", &[]);
    let good = std::fs::read(&wheel).unwrap();
    let mut bad = good.clone();
    let at = bad.windows(4).position(|w| w == b"xxxx").expect("payload");
    bad[at] = b'y';
    std::fs::write(&wheel, &bad).unwrap();
    let spec = EnvSpec::new(&s.python, [("crc", "1.0"), ("alpha", "2.0")]);
    let phases = Phases::default();
    let err = store.ensure(&spec, &phases.callback()).unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, StoreError::Build { step: "installing packages", .. }), "{err:?}");
    assert!(err.to_string().contains("CRC"), "uv's reason: {err}");
    assert_eq!(phases.built(), 1, "the failure came after resolution");
    assert!(s.envs().is_empty() && s.leftovers().is_empty(), "{:?}", s.entries());
    assert_eq!(std::fs::read_dir(s.root().join(".resolved")).unwrap().count(), 0);

    std::fs::write(&wheel, &good).unwrap();
    let env = store.ensure(&spec, &|_| {}).expect("retry");
    assert_eq!(run_python(&env.python, "import crc, alpha; print(crc.VERSION, alpha.VERSION)"), "1.0 2.0");
}

/// The child side of `concurrent_processes_build_once`: with `QUIVER_ENVS_CHILD` set (to
/// `ROOT|CACHE|WHEELS|PYTHON`), ensures one spec and prints `built` or `found`, then the key.
#[test]
fn child_ensure() {
    let Ok(args) = std::env::var("QUIVER_ENVS_CHILD") else { return };
    let parts: Vec<&str> = args.split('|').collect();
    let opts = quiver_envs::StoreOptions {
        root: parts[0].into(),
        cache: parts[1].into(),
        wheels: Some(parts[2].into()),
        base: Default::default(),
        ..Default::default()
    };
    let store = quiver_envs::Store::open(opts).expect("open");
    let phases = Phases::default();
    let env = store.ensure(&EnvSpec::new(parts[3], [("beta", "1.0")]), &phases.callback()).expect("ensure");
    println!("QUIVER-CHILD {} {}", if phases.built() > 0 { "built" } else { "found" }, env.key);
}

#[test]
fn concurrent_processes_build_once() {
    let Some(s) = Scratch::new("concurrent_processes_build_once") else { return };
    let opts = s.options();
    let arg = format!(
        "{}|{}|{}|{}",
        opts.root.display(),
        opts.cache.display(),
        s.wheels.display(),
        s.python
    );
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..3)
        .map(|_| {
            std::process::Command::new(&exe)
                .args(["--exact", "child_ensure", "--nocapture", "--test-threads=1"])
                .env("QUIVER_ENVS_CHILD", &arg)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("spawn child")
        })
        .collect();
    let mut results = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text.lines().find_map(|l| l.split_once("QUIVER-CHILD ").map(|(_, r)| r)).expect("child reports").to_string();
        results.push(line);
    }
    let built = results.iter().filter(|r| r.starts_with("built")).count();
    assert_eq!(built, 1, "one of three processes builds: {results:?}");
    let keys: Vec<&str> = results.iter().map(|r| r.split(' ').nth(1).unwrap()).collect();
    assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
    assert_eq!(s.envs(), [keys[0].to_string()]);
}

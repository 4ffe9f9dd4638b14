//! The Python function harness end to end: a real Python (`QUIVER_TEST_PYTHON`, default
//! `/var/tmp/quiver-py/bin/python`) with `libquiver_preload.so` preloaded runs
//! `python -m quiver._harness --fd 3` against this test playing the agent: it sends a Request
//! and SIPC input tables over a socketpair and checks the Hello, the Reply and the output.
//!
//! Without that Python (and pyarrow, pandas) the tests skip with the reason, or fail when
//! `CI=true`.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use quiver_shm::sipc::{ReadOptions, SipcRead, TableWriter, read_table};
use quiver_shm::transport::{RecvLimits, recv, send, send_table, socketpair};
use serde_json::{Value, json};

const ROWS: usize = 200_000;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn python() -> String {
    std::env::var("QUIVER_TEST_PYTHON").unwrap_or_else(|_| "/var/tmp/quiver-py/bin/python".into())
}

/// Whether the test Python has `modules`; skips (prints why) or fails under CI when not.
fn have(modules: &str) -> bool {
    let ok = Command::new(python())
        .args(["-c", &format!("import {modules}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let why = format!("{} cannot import {modules} (run scripts/setup, or set QUIVER_TEST_PYTHON)", python());
        assert!(!in_ci(), "{why}");
        eprintln!("skipped: {why}");
    }
    ok
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root")
}

/// Newest modification time of the files under `dir`.
fn newest(dir: &Path) -> std::time::SystemTime {
    let mut t = std::time::SystemTime::UNIX_EPOCH;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let m = if p.is_dir() { newest(&p) } else { e.metadata().and_then(|m| m.modified()).unwrap_or(t) };
        t = t.max(m);
    }
    t
}

/// The cdylib, beside the test executable's `deps` folder. `cargo test` does not build a
/// cdylib for integration tests (`cargo build --workspace` does): when it is missing or older
/// than its sources it is built here.
fn cdylib() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("test exe");
            let dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
            let lib = dir.join("libquiver_preload.so");
            let sources = newest(&repo().join("runtime-envs/preload/src")).max(newest(&repo().join("shm/src")));
            let fresh = std::fs::metadata(&lib).and_then(|m| m.modified()).is_ok_and(|t| t >= sources);
            if !fresh {
                let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
                let mut cmd = Command::new(cargo);
                cmd.args(["build", "-p", "quiver-preload"]).current_dir(repo());
                if dir.file_name().is_some_and(|n| n == "release") {
                    cmd.arg("--release");
                }
                let st = cmd.status().expect("cargo build");
                assert!(st.success(), "cargo build -p quiver-preload failed");
            }
            assert!(lib.exists(), "{} is missing", lib.display());
            lib
        })
        .clone()
}

/// An input table `id: int64, x: float64, country: utf8` of `n` rows, in sealed segments.
fn input(n: usize) -> quiver_shm::sipc::SipcTable {
    let countries = ["IT", "FR", "DE", "ES"];
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("x", DataType::Float64, false),
        Field::new("country", DataType::Utf8, false),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(0..n as i64)),
        Arc::new(Float64Array::from_iter_values((0..n).map(|i| i as f64 * 0.5))),
        Arc::new(StringArray::from_iter_values((0..n).map(|i| countries[i % 4]))),
    ];
    let b = RecordBatch::try_new(schema.clone(), cols).expect("batch");
    let mut w = TableWriter::new(schema);
    w.write(&b).expect("write");
    w.finish().expect("finish")
}

/// One harness process and our end of its socket.
struct Run {
    child: Child,
    sock: OwnedFd,
    dir: tempfile::TempDir,
}

/// What the harness answered.
struct Outcome {
    hello: Value,
    reply: Value,
    table: Option<SipcRead>,
    /// Inode of every segment fd of the output, in descriptor order.
    inodes: Vec<u64>,
    stderr: String,
}

/// Inodes of a table's segments: the same memfd has the same inode in every process.
fn inodes(t: &quiver_shm::sipc::SipcTable) -> Vec<u64> {
    t.segments.iter().map(inode).collect()
}

fn inode(fd: impl AsFd) -> u64 {
    nix::sys::stat::fstat(fd.as_fd()).map(|s| s.st_ino).unwrap_or(0)
}

impl Run {
    /// Starts the harness on a module with `source` in a fresh folder.
    fn start(source: &str) -> Run {
        Run::start_with(source, &["-m", "quiver._harness", "--fd", "3"], true)
    }

    /// A cold start that only loads the library through `QUIVER_PRELOAD` (no `LD_PRELOAD`).
    fn start_unpreloaded(source: &str) -> Run {
        Run::start_with(source, &["-m", "quiver._harness", "--fd", "3"], false)
    }

    /// As a zygote does: a process that imported pyarrow and pandas (the library preloaded,
    /// the arena never enabled) forks, and the child serves the request.
    fn start_forked(source: &str) -> Run {
        let code = "import os, pyarrow, pandas\n\
                    from quiver import _harness\n\
                    pid = os.fork()\n\
                    if pid == 0:\n    os._exit(_harness.serve(3))\n\
                    _, st = os.waitpid(pid, 0)\n\
                    os._exit(os.waitstatus_to_exitcode(st))\n";
        Run::start_with(source, &["-c", code], true)
    }

    fn start_with(source: &str, args: &[&str], preload: bool) -> Run {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("models.py"), source).expect("module");
        let (ours, theirs) = socketpair().expect("socketpair");
        let raw = theirs.as_raw_fd();
        let mut cmd = Command::new(python());
        cmd.args(args)
            .env("ARROW_DEFAULT_MEMORY_POOL", "system")
            .env("PYTHONPATH", repo().join("runtime-envs/python"))
            .current_dir(dir.path())
            .stderr(Stdio::piped());
        if preload {
            cmd.env("LD_PRELOAD", cdylib()).env_remove("QUIVER_PRELOAD");
        } else {
            cmd.env("QUIVER_PRELOAD", cdylib()).env_remove("LD_PRELOAD");
        }
        // SAFETY: dup2 is async-signal-safe; it runs between fork and exec and gives the
        // harness its socket as fd 3 without CLOEXEC.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(raw, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let child = cmd.spawn().expect("spawn python");
        drop(theirs);
        Run { child, sock: ours, dir }
    }

    fn module(&self) -> String {
        self.dir.path().join("models.py").to_string_lossy().into_owned()
    }

    /// Sends the request for `function` with `params` and the inputs, and collects the answer.
    fn call(self, function: &str, params: Value, expectation: bool, inputs: &[(&str, &quiver_shm::sipc::SipcTable)]) -> Outcome {
        let req = json!({
            "run": "r1",
            "node": function,
            "task": {"Python": {
                "module": self.module(),
                "function": function,
                "env": {"python": "3.11", "pip": {"pyarrow": "26"}},
                "params": params,
                "expectation": expectation,
            }},
            "inputs": inputs.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            "staging": null,
            "edges": "arena",
        });
        let s = self.sock.as_fd();
        send(s, &serde_json::to_vec(&req).expect("json"), &[]).expect("send request");
        for (_, t) in inputs {
            send_table(s, t).expect("send input");
        }
        let msg = |what: &str| -> Value {
            let (b, fds) = recv(s, &RecvLimits::default()).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(fds.is_empty(), "{what} carries fds");
            serde_json::from_slice(&b).unwrap_or_else(|e| panic!("{what} is not JSON: {e}"))
        };
        let hello = msg("hello");
        let reply = msg("reply");
        let (table, inodes) = if reply.get("Table").is_some() {
            let (b, fds) = recv(s, &RecvLimits::default()).expect("output table");
            let inodes = fds.iter().map(inode).collect();
            (Some(read_table(&b, fds, &ReadOptions::default()).expect("valid output")), inodes)
        } else {
            (None, Vec::new())
        };
        let out = self.child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "harness exited with {}: {stderr}", out.status);
        Outcome { hello, reply, table, inodes, stderr }
    }
}

fn param(arg: &str, parent: &str) -> Value {
    json!([{"arg": arg, "parent": parent, "columns": null, "filter": null}])
}

fn column<'a, T: 'static>(t: &'a SipcRead, name: &str) -> Vec<&'a T> {
    let i = t.schema.index_of(name).unwrap_or_else(|_| panic!("no column {name} in {:?}", t.schema));
    t.batches.iter().map(|b| b.column(i).as_any().downcast_ref::<T>().expect("type")).collect()
}

fn f64s(t: &SipcRead, name: &str) -> Vec<f64> {
    column::<Float64Array>(t, name).into_iter().flat_map(|a| a.values().iter().copied().collect::<Vec<_>>()).collect()
}

fn i64s(t: &SipcRead, name: &str) -> Vec<i64> {
    column::<Int64Array>(t, name).into_iter().flat_map(|a| a.values().iter().copied().collect::<Vec<_>>()).collect()
}

fn bytes(o: &Outcome) -> (u64, u64) {
    let b = &o.reply["Table"]["bytes"];
    (b["referenced"].as_u64().expect("referenced"), b["copied"].as_u64().expect("copied"))
}

/// Inode of the segment holding column `name`'s values buffer in the output.
fn segment_of(o: &Outcome, name: &str) -> u64 {
    let t = o.table.as_ref().expect("table");
    let i = t.schema.index_of(name).expect("column");
    let data = t.batches[0].column(i).to_data();
    let buf = &data.buffers()[0];
    let k = t
        .mappings
        .iter()
        .position(|m| m.mapping().offset_of(buf.as_ptr(), buf.len()).is_some())
        .expect("buffer lies in a received segment");
    o.inodes[k]
}

fn memfd_name(fd: impl AsFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd()))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Name of the memfd that holds column `name`'s values in the output.
fn segment_name(o: &Outcome, name: &str) -> String {
    let t = o.table.as_ref().expect("table");
    let i = t.schema.index_of(name).expect("column");
    let data = t.batches[0].column(i).to_data();
    let buf = &data.buffers()[0];
    let m = t
        .mappings
        .iter()
        .find(|m| m.mapping().offset_of(buf.as_ptr(), buf.len()).is_some())
        .expect("buffer lies in a received segment");
    memfd_name(m.segment())
}

#[test]
fn pyarrow_computed_column_is_referenced_not_copied() {
    if !have("pyarrow") {
        return;
    }
    let inp = input(ROWS);
    let ins = inodes(&inp);
    let o = Run::start(
        "import pyarrow.compute as pc\n\
         def f(data):\n    return data.append_column('y', pc.multiply(data['x'], 2.0))\n",
    )
    .call("f", param("data", "src"), false, &[("src", &inp)]);
    assert!(o.hello["started_ns"].as_u64().is_some_and(|n| n > 0), "hello: {}", o.hello);
    let (r, c) = bytes(&o);
    eprintln!("pyarrow: referenced {r} copied {c}");
    assert_eq!(c, 0, "reply {}, stderr {}", o.reply, o.stderr);
    assert!(r >= (ROWS * 8 * 2) as u64, "referenced {r}");
    assert_eq!(o.reply["Table"]["rows"], ROWS as u64);
    let t = o.table.as_ref().expect("table");
    let x = f64s(t, "x");
    let y = f64s(t, "y");
    assert_eq!(y.len(), ROWS);
    assert!(x.iter().zip(&y).all(|(x, y)| *y == x * 2.0));
    // The passed-on column is the input's own file; the new one lies in the function's arena.
    assert!(ins.contains(&segment_of(&o, "x")));
    assert!(!ins.contains(&segment_of(&o, "y")));
    let name = segment_name(&o, "y");
    assert!(name.contains("memfd:quiver-fn-"), "y lies in {name}");
}

#[test]
fn pandas_numeric_columns_are_referenced_not_copied() {
    if !have("pyarrow, pandas") {
        return;
    }
    let inp = input(ROWS);
    let o = Run::start(
        "def f(data):\n    df = data.select(['id', 'x']).to_pandas()\n    df['y'] = df['x'] * 3 + df['id']\n    return df\n",
    )
    .call("f", param("data", "src"), false, &[("src", &inp)]);
    let (r, c) = bytes(&o);
    eprintln!("pandas numeric: referenced {r} copied {c}");
    assert_eq!(c, 0, "reply {}, stderr {}", o.reply, o.stderr);
    let t = o.table.as_ref().expect("table");
    let (id, x, y) = (i64s(t, "id"), f64s(t, "x"), f64s(t, "y"));
    assert_eq!(y.len(), ROWS);
    assert!(id.iter().zip(&x).zip(&y).all(|((i, x), y)| *y == x * 3.0 + *i as f64));
    assert!(segment_name(&o, "y").contains("memfd:quiver-fn-"));
}

#[test]
fn pandas_strings_are_reported_as_copied_or_referenced() {
    if !have("pyarrow, pandas") {
        return;
    }
    let inp = input(ROWS);
    let o = Run::start(
        "def f(data):\n    df = data.to_pandas()\n    df['loud'] = df['country'].str.lower()\n    return df\n",
    )
    .call("f", param("data", "src"), false, &[("src", &inp)]);
    let (r, c) = bytes(&o);
    eprintln!("pandas with strings: referenced {r} copied {c}");
    let t = o.table.as_ref().expect("table");
    let i = t.schema.index_of("loud").expect("loud");
    let rows: usize = t.batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, ROWS);
    let col = arrow_array::cast::AsArray::as_string_opt::<i32>(t.batches[0].column(i).as_ref())
        .map(|a| a.value(1).to_owned())
        .or_else(|| {
            arrow_array::cast::AsArray::as_string_opt::<i64>(t.batches[0].column(i).as_ref()).map(|a| a.value(1).to_owned())
        })
        .or_else(|| arrow_array::cast::AsArray::as_string_view_opt(t.batches[0].column(i).as_ref()).map(|a| a.value(1).to_owned()));
    assert_eq!(col.as_deref(), Some("fr"), "type {:?}", t.schema.field(i).data_type());
    // The numeric columns alone are larger than whatever is copied: they are referenced.
    assert!(r >= (ROWS * 16) as u64, "referenced {r}");
}

#[test]
fn passthrough_references_the_input_segment() {
    if !have("pyarrow") {
        return;
    }
    let inp = input(ROWS);
    let ins = inodes(&inp);
    let o = Run::start("def f(data):\n    return data\n").call("f", param("data", "src"), false, &[("src", &inp)]);
    let (r, c) = bytes(&o);
    assert_eq!(c, 0);
    assert_eq!(r, inp.stats.bytes_referenced + inp.stats.bytes_copied, "every input byte is referenced");
    assert!(o.inodes.iter().all(|i| ins.contains(i)), "output segments {:?} vs input {ins:?}", o.inodes);
}

#[test]
fn columns_and_filter_are_applied() {
    if !have("pyarrow") {
        return;
    }
    let inp = input(1000);
    let params = json!([{
        "arg": "data", "parent": "src", "columns": ["id", "x"],
        "filter": [
            {"Cmp": {"column": "x", "op": "Gt", "value": {"Int": 100}}},
            {"In": {"column": "country", "values": [{"Str": "IT"}, {"Str": "FR"}]}},
        ],
    }]);
    let o = Run::start("def f(data):\n    assert data.column_names == ['id', 'x'], data.column_names\n    return data\n")
        .call("f", params, false, &[("src", &inp)]);
    let t = o.table.as_ref().unwrap_or_else(|| panic!("reply {}", o.reply));
    assert_eq!(t.schema.fields().len(), 2);
    let want: Vec<i64> = (0..1000i64).filter(|i| *i as f64 * 0.5 > 100.0 && (i % 4 == 0 || i % 4 == 1)).collect();
    assert_eq!(i64s(t, "id"), want);
    assert_eq!(o.reply["Table"]["rows"], want.len() as u64);
}

#[test]
fn two_inputs_are_matched_by_name() {
    if !have("pyarrow") {
        return;
    }
    let (a, b) = (input(10), input(20));
    let params = json!([
        {"arg": "small", "parent": "a", "columns": ["id"], "filter": null},
        {"arg": "big", "parent": "b", "columns": null, "filter": [{"Cmp": {"column": "id", "op": "Ge", "value": {"Int": 15}}}]},
    ]);
    let o = Run::start("import pyarrow as pa\ndef f(big, small):\n    return pa.table({'n': [small.num_rows, big.num_rows]})\n")
        .call("f", params, false, &[("b", &b), ("a", &a)]);
    let t = o.table.as_ref().unwrap_or_else(|| panic!("reply {}", o.reply));
    assert_eq!(i64s(t, "n"), vec![10, 5]);
}

fn failed(o: &Outcome) -> (bool, String) {
    let f = &o.reply["Failed"];
    assert!(f.is_object(), "expected a failure, got {}", o.reply);
    (f["user"].as_bool().expect("user"), f["message"].as_str().expect("message").to_owned())
}

#[test]
fn an_exception_is_a_user_error_with_message_and_line() {
    if !have("pyarrow") {
        return;
    }
    let inp = input(10);
    let o = Run::start("def helper():\n    raise ValueError('boom 42')\n\ndef f(data):\n    helper()\n")
        .call("f", param("data", "src"), false, &[("src", &inp)]);
    let (user, msg) = failed(&o);
    assert!(user);
    assert!(msg.contains("ValueError: boom 42"), "{msg}");
    assert!(msg.contains("models.py\", line 2"), "{msg}");
    assert!(!msg.contains("_harness.py"), "harness frames leak: {msg}");
}

#[test]
fn writing_an_input_says_inputs_are_read_only() {
    if !have("pyarrow") {
        return;
    }
    let inp = input(1000);
    let o = Run::start("def f(data):\n    a = data.column('x').chunk(0).to_numpy()\n    a[0] = 1.0\n    return data\n")
        .call("f", param("data", "src"), false, &[("src", &inp)]);
    let (user, msg) = failed(&o);
    assert!(user);
    assert!(msg.contains("inputs are read-only") && msg.contains("copy"), "{msg}");
}

#[test]
fn a_wrong_return_type_is_a_user_error() {
    if !have("pyarrow") {
        return;
    }
    let inp = input(10);
    let o = Run::start("def f(data):\n    return {'a': 1}\n").call("f", param("data", "src"), false, &[("src", &inp)]);
    let (user, msg) = failed(&o);
    assert!(user);
    assert!(msg.contains("builtins.dict") && msg.contains("pyarrow Table"), "{msg}");
}

#[test]
fn a_missing_column_is_a_user_error() {
    if !have("pyarrow") {
        return;
    }
    let inp = input(10);
    let params = json!([{"arg": "data", "parent": "src", "columns": ["nope"], "filter": null}]);
    let o = Run::start("def f(data):\n    return data\n").call("f", params, false, &[("src", &inp)]);
    let (user, msg) = failed(&o);
    assert!(user);
    assert!(msg.contains("'nope'") && msg.contains("country"), "{msg}");
}

#[test]
fn expectations_pass_and_fail() {
    if !have("pyarrow") {
        return;
    }
    let inp = input(100);
    let src = "import pyarrow.compute as pc\n\
               def positive(data):\n    return pc.min(data['x']).as_py() >= 0\n\
               def small(data):\n    return data.num_rows < 50\n";
    let o = Run::start(src).call("positive", param("data", "src"), true, &[("src", &inp)]);
    assert_eq!(o.reply, json!("Passed"));
    assert!(o.table.is_none());
    let o = Run::start(src).call("small", param("data", "src"), true, &[("src", &inp)]);
    let (user, msg) = failed(&o);
    assert!(user);
    assert_eq!(msg, "expectation small returned False");
}

#[test]
fn polars_result_is_accepted() {
    if !have("pyarrow, polars") {
        return;
    }
    let inp = input(ROWS);
    let o = Run::start(
        "import polars as pl\ndef f(data):\n    return pl.from_arrow(data).with_columns((pl.col('x') * 2).alias('y'))\n",
    )
    .call("f", param("data", "src"), false, &[("src", &inp)]);
    let (r, c) = bytes(&o);
    eprintln!("polars: referenced {r} copied {c}");
    let t = o.table.as_ref().unwrap_or_else(|| panic!("reply {}", o.reply));
    let y = f64s(t, "y");
    assert_eq!(y.len(), ROWS);
    assert!(f64s(t, "x").iter().zip(&y).all(|(x, y)| *y == x * 2.0));
}

#[test]
fn a_child_forked_from_a_zygote_serves_with_its_own_arena() {
    if !have("pyarrow, pandas") {
        return;
    }
    let inp = input(ROWS);
    let o = Run::start_forked(
        "import pyarrow.compute as pc\n\
         def f(data):\n    return data.append_column('y', pc.add(data['id'], 1))\n",
    )
    .call("f", param("data", "src"), false, &[("src", &inp)]);
    let (r, c) = bytes(&o);
    assert_eq!(c, 0, "reply {}, stderr {}", o.reply, o.stderr);
    assert!(r > 0);
    let t = o.table.as_ref().expect("table");
    assert!(i64s(t, "id").iter().zip(i64s(t, "y")).all(|(i, y)| y == i + 1));
    assert!(segment_name(&o, "y").contains("memfd:quiver-fn-"));
}

#[test]
fn without_the_preload_outputs_are_copied_and_counted() {
    if !have("pyarrow") {
        return;
    }
    let inp = input(ROWS);
    let o = Run::start_unpreloaded(
        "import pyarrow.compute as pc\n\
         def f(data):\n    return data.append_column('y', pc.multiply(data['x'], 2.0))\n",
    )
    .call("f", param("data", "src"), false, &[("src", &inp)]);
    let (r, c) = bytes(&o);
    assert!(c >= (ROWS * 8) as u64, "the new column is copied: {c}");
    assert!(r > 0, "the input's columns are still referenced");
    assert!(o.stderr.contains("arena off"), "{}", o.stderr);
    assert!(f64s(o.table.as_ref().expect("table"), "y").iter().zip(0..).all(|(y, i)| *y == i as f64));
}

/// The function records the physical frames behind its new column (from its own
/// `/proc/self/pagemap`, in the schema metadata); the test finds the very same frames behind
/// the column it received: the bytes were never copied. Frame numbers need root.
#[test]
fn the_received_column_maps_the_functions_own_frames() {
    if !have("pyarrow") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(!in_ci(), "frame numbers need root, and CI runs as root");
        eprintln!("skipped: frame numbers from pagemap need root");
        return;
    }
    let inp = input(ROWS);
    let o = Run::start(
        "import struct\n\
         import pyarrow.compute as pc\n\
         def frames(addr, size):\n    out = []\n    with open('/proc/self/pagemap', 'rb') as f:\n        for a in range(addr // 4096 * 4096, addr + size, 4096):\n            f.seek(a // 4096 * 8)\n            out.append(struct.unpack('<Q', f.read(8))[0] & ((1 << 55) - 1))\n    return out\n\
         def f(data):\n    y = pc.multiply(data['x'], 2.0).chunk(0)\n    b = y.buffers()[1]\n    fr = frames(b.address, b.size)\n    t = data.append_column('y', y)\n    return t.replace_schema_metadata({'frames': ','.join(map(str, fr))})\n",
    )
    .call("f", param("data", "src"), false, &[("src", &inp)]);
    assert_eq!(bytes(&o).1, 0, "reply {}", o.reply);
    let t = o.table.as_ref().expect("table");
    let theirs: Vec<u64> = t.schema.metadata()["frames"].split(',').map(|s| s.parse().expect("frame")).collect();
    assert!(theirs.iter().all(|&f| f != 0), "the function saw frame numbers");
    let i = t.schema.index_of("y").expect("y");
    let data = t.batches[0].column(i).to_data();
    let buf = &data.buffers()[0];
    let ours = quiver_shm::pagemap::frames(buf.as_ptr(), buf.len()).expect("frames");
    assert_eq!(ours, theirs, "the received column is the function's memory");
}

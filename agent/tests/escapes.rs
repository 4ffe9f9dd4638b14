//! Python functions trying to get out of their sandbox, through the agent, as root: each
//! attempt fails its own node with a clear error, the agent stays up, and an ordinary run
//! completes afterwards. (The same attempts at the zygote level: runtime-envs/tests/zygote.rs.)

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{python_agent, python_ready, taxi};
use serde_json::{Value, json};

/// Each function tries one thing and returns a table only if it got through.
const ATTEMPTS: &str = r#"
import ctypes, os, socket, subprocess
import pyarrow as pa

OK = pa.table({"escaped": [True]})
libc = ctypes.CDLL(None, use_errno=True)

def check(ret, what):
    if ret != 0:
        e = ctypes.get_errno()
        raise PermissionError(e, f"{what} refused: {os.strerror(e)}")

def read_shadow():
    open("/etc/shadow").read()
    return OK

def read_other_table(warehouse="", agent=0):
    # Another run's materialized table, and the tables the agent holds as memfds.
    os.listdir(warehouse)
    for fd in os.listdir(f"/proc/{agent}/fd"):
        open(f"/proc/{agent}/fd/{fd}", "rb").read()
    return OK

def write_parent(t):
    memoryview(t.column(0).chunk(0).buffers()[1])[0] = 1
    return OK

def connect(port=0):
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    return OK

def trace(pid=0):
    check(libc.ptrace(16, pid, None, None), "ptrace")
    return OK

def mount():
    check(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, None), "mount")
    return OK

def fork_bomb():
    while True:
        os.fork()

def hog():
    chunks = []
    while True:
        chunks.append(bytearray(64 << 20))

def spin():
    while True:
        pass

def setuid():
    r = subprocess.run(["/usr/bin/passwd", "-S", "root"], capture_output=True, text=True)
    if r.returncode != 0:
        raise PermissionError(f"setuid passwd ran without privileges: {r.stderr.strip()}")
    return OK
"#;

fn python(name: &str, module: &Path, function: &str, params: Value, extra: Value) -> Value {
    let mut n = json!({"name": name, "kind": "python", "python": {
        "module": module, "function": function, "env": {"python": "3.11", "pip": {"pandas": ""}}, "params": params}});
    if let (Some(n), Some(extra)) = (n.as_object_mut(), extra.as_object()) {
        n.extend(extra.clone());
    }
    n
}

#[test]
fn every_escape_fails_its_node_and_the_agent_carries_on() {
    if !python_ready() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let module = dir.path().join("attempts.py");
    std::fs::write(&module, ATTEMPTS).expect("module");
    std::fs::set_permissions(&module, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let trips = dir.path().join("trips");
    taxi(&trips, 10_000);
    for e in std::fs::read_dir(&trips).expect("trips").flatten() {
        std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    std::fs::set_permissions(&trips, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let a = python_agent(dir.path());
    // Another tenant's table: one the agent keeps for another run.
    let kept = a.run(&json!({"nodes": [{"name": "secret", "kind": "scan", "path": trips, "columns": ["fare_amount"], "pin": true},
                                        {"name": "m", "kind": "materialize", "parents": ["secret"], "table": "secret"}]}));
    assert_eq!(kept["status"], "succeeded", "{kept}");
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();

    let scan = json!({"name": "t", "kind": "scan", "path": trips, "columns": ["trip_id"]});
    let param = json!([{"arg": "t", "parent": "t"}]);
    let none = json!({});
    // (function, its parameters, extra node fields, what the node's error must say)
    let cases: Vec<(&str, Value, Value, &str)> = vec![
        ("read_shadow", json!([]), none.clone(), "No such file"),
        ("read_other_table", json!([]), none.clone(), "No such file"),
        ("write_parent", param.clone(), json!({"parents": ["t"]}), "read-only"),
        ("connect", json!([]), none.clone(), "Permission"),
        ("trace", json!([]), none.clone(), "ptrace refused"),
        ("mount", json!([]), none.clone(), "mount refused"),
        ("fork_bomb", json!([]), json!({"resources": {"timeout_s": 60}}), "Resource temporarily unavailable"),
        ("hog", json!([]), json!({"resources": {"memory": 268435456}}), "memory limit"),
        ("spin", json!([]), json!({"resources": {"timeout_s": 2}}), "timed out"),
        ("setuid", json!([]), none.clone(), "without privileges"),
    ];
    for (function, params, extra, says) in cases {
        let mut nodes = vec![python(function, &module, function, params.clone(), extra)];
        if !params.as_array().is_none_or(Vec::is_empty) {
            nodes.insert(0, scan.clone());
        }
        // The targets (a port, the agent's pid, the warehouse) are defaults written into the
        // module.
        let body = ATTEMPTS
            .replace("def connect(port=0):", &format!("def connect(port={port}):"))
            .replace("def trace(pid=0):", &format!("def trace(pid={}):", a.pid()))
            .replace(
                "def read_other_table(warehouse=\"\", agent=0):",
                &format!("def read_other_table(warehouse={:?}, agent={}):", a.warehouse().join("secret").display().to_string(), a.pid()),
            );
        std::fs::write(&module, body).expect("module");
        let v = a.run(&json!({ "nodes": nodes }));
        let n = v["nodes"].as_array().expect("nodes").iter().find(|n| n["name"] == function).expect("node").clone();
        assert_eq!(v["status"], "failed", "{function} got through: {v}");
        let error = n["error"].as_str().unwrap_or("");
        assert!(error.contains(says), "{function}: the node's error should say {says:?}: {n}");
        assert!(n["state"] == "failed" || n["state"] == "timed_out", "{function}: {n}");
    }
    // Nobody connected to the listener.
    let mut accepted = listener.accept();
    if let Ok((s, _)) = &mut accepted {
        let mut b = Vec::new();
        let _ = s.read_to_end(&mut b);
        panic!("a function reached 127.0.0.1:{port}");
    }
    // The agent is up, holds the other tenant's table intact, and runs an ordinary DAG.
    let (s, t) = a.json("GET", &format!("/v1/tables/{}.secret", kept["id"].as_str().expect("id")), None);
    assert_eq!(s, 200, "{t}");
    assert_eq!(t["rows"], 10_000);
    let ok = a.run(&json!({"nodes": [scan, {"name": "q", "kind": "sql", "parents": ["t"], "sql": "SELECT count(*) AS n FROM t"}]}));
    assert_eq!(ok["status"], "succeeded", "{ok}");
}

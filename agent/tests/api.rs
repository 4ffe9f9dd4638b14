//! The planner API: malformed requests get a 4xx that says what is wrong, and the agent keeps
//! serving.

mod common;

use common::TestAgent;

#[test]
fn malformed_requests_get_a_4xx_and_the_agent_stays_up() {
    let a = TestAgent::start(&["--max-body", "4096"]);
    let cases: &[(&str, &str, &str, u16, &str)] = &[
        ("POST", "/v1/runs", "{not json", 400, "invalid plan JSON"),
        ("POST", "/v1/runs", r#"{"nodes":[{"name":"a","kind":"scan","path":"/x","bogus":1}]}"#, 400, "unknown field `bogus`"),
        ("POST", "/v1/runs", r#"{"nodes":[{"name":"a","kind":"rust"}]}"#, 400, "unknown variant `rust`"),
        ("POST", "/v1/runs", r#"{"nodes":[{"name":"a","kind":"python"}]}"#, 422, "needs `python`"),
        ("POST", "/v1/runs", r#"{"nodes":[{"name":"a","kind":"python","python":{"module":"m.py","function":"f","env":{"python":"3.11"}}}]}"#, 422, "absolute path"),
        ("POST", "/v1/runs", r#"{"nodes":[{"name":"a","kind":"python","python":{"module":"/m.py","function":"f; x","env":{"python":"3.11"}}}]}"#, 422, "not a Python identifier"),
        ("POST", "/v1/runs", r#"{"nodes":[{"name":"a","kind":"python","python":{"module":"/m.py","function":"f","env":{"python":"3.11","pip":{"-e x":""}}}}]}"#, 422, "env"),
        ("POST", "/v1/runs", r#"{"nodes":[]}"#, 422, "no nodes"),
        ("POST", "/v1/runs", r#"{"nodes":[{"name":"a","kind":"sql","sql":"x","parents":["b"]},{"name":"b","kind":"sql","sql":"x","parents":["a"]}]}"#, 422, "cycle"),
        ("POST", "/v1/runs", r#"{"nodes":[{"name":"a","kind":"sql","sql":"x","parents":["zz"]}]}"#, 422, "not in the plan"),
        ("POST", "/v1/runs", r#"{"nodes":[{"name":"a","kind":"scan","path":"/x"},{"name":"a","kind":"scan","path":"/y"}]}"#, 422, "two nodes are named"),
        ("POST", "/v1/runs", r#"{"nodes":[{"name":"a","kind":"scan","path":"/x","filter":"x ="}]}"#, 422, "filter"),
        ("POST", "/v1/runs", r#"{"nodes":[{"name":"a","kind":"scan","path":"/x","sql":"select 1"}]}"#, 422, "not valid for a scan"),
        ("POST", "/v1/runs", r#"{"nodes":[{"name":"a","kind":"scan","path":"data/trips"}]}"#, 422, "must be absolute"),
        ("POST", "/v1/runs", r#"{"nodes":[{"name":"a","kind":"scan","path":"/x","resources":{"cpus":-1}}]}"#, 422, "cpus"),
        ("POST", "/v1/runs?dry_run=maybe", r#"{"nodes":[{"name":"a","kind":"scan","path":"/x"}]}"#, 400, "bad query string"),
        ("GET", "/v1/runs/r999999", "", 404, "no run"),
        ("POST", "/v1/runs/nonsense/cancel", "", 404, "no run"),
        ("GET", "/v1/tables/nothing", "", 404, "no table"),
        ("DELETE", "/v1/tables/nothing", "", 404, "no table"),
        ("GET", "/v2/whatever", "", 404, "no such endpoint"),
    ];
    for (method, path, body, status, needle) in cases {
        let (s, b) = a.call(method, path, Some(body));
        assert_eq!(s, *status, "{method} {path} {body}: {b}");
        assert!(b.contains(needle), "{method} {path}: {b:?} lacks {needle:?}");
        let v: serde_json::Value = serde_json::from_str(&b).expect("errors are JSON");
        assert!(v["error"].is_string());
    }
    let big = format!(r#"{{"nodes":[{{"name":"a","kind":"sql","sql":"{}"}}]}}"#, "x".repeat(8000));
    let (s, _) = a.call("POST", "/v1/runs", Some(&big));
    assert_eq!(s, 413, "oversize body");
    let (s, v) = a.json("GET", "/healthz", None);
    assert_eq!((s, v["status"].as_str()), (200, Some("ok")), "still serving");
    let (_, m) = a.call("GET", "/metrics", None);
    let counted = m.lines().find_map(|l| l.strip_prefix("quiver_bad_requests_total ")).expect("metric");
    assert_eq!(counted, (cases.len() - 1 + 1).to_string(), "every refusal is counted but the unknown route (the oversize body is): {m}");
}

#[test]
fn a_dry_run_validates_and_orders_without_running() {
    let a = TestAgent::start(&[]);
    let plan = r#"{"nodes":[{"name":"m","kind":"materialize","parents":["t"]},{"name":"t","kind":"scan","path":"/nowhere"}]}"#;
    let (s, v) = a.json("POST", "/v1/runs?dry_run=true", Some(plan));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["order"][0]["name"], "t");
    assert_eq!(v["order"][1]["parents"][0], "t");
    let (_, runs) = a.json("GET", "/v1/runs", None);
    assert_eq!(runs["runs"].as_array().map(Vec::len), Some(0), "nothing ran");
}

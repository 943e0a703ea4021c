//! The API document at `/v1/openapi.json` against the live server, checked by schemathesis
//! (PyPI; tests/run.sh installs it): generated requests get no 5xx, and every response matches
//! the document (status codes, content types, headers, bodies); schema-violating requests are
//! rejected. And the API as another tool reads it: a real Prometheus (Debian's package) finds
//! its scrape targets through `GET /v1/sd/prometheus`.

#[path = "util/mod.rs"]
mod util;

use std::process::Command;

use util::*;

#[test]
fn openapi_document_lists_every_route() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServeProc::start(&dir.path().join("data"), dir.path(), &["--max-wait", "1s"]);
    let doc: serde_json::Value = http()
        .get(format!("{}/v1/openapi.json", server.api()))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    // The document's paths are exactly the API's: a path documented but not routed (or one
    // dropped from the document) fails here. Deliberately left out: `/` (the status page, HTML
    // for people) and `/v1/openapi.json` itself; both are checked to exist below.
    let documented: std::collections::BTreeSet<&str> = paths.keys().map(String::as_str).collect();
    let expected: std::collections::BTreeSet<&str> = [
        "/v1/roles/{role}/nodes/{node}",
        "/v1/roles/{role}/nodes/{node}/session",
        "/v1/roles/{role}",
        "/v1/roles",
        "/v1/sd/prometheus",
        "/healthz",
        "/readyz",
        "/metrics",
    ]
    .into_iter()
    .collect();
    assert_eq!(documented, expected);
    for undocumented in ["/", "/v1/openapi.json"] {
        let r = http()
            .get(format!("{}{undocumented}", server.api()))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{undocumented} is served");
    }
    // Every documented operation is routed: in this order, none answers 404 or 405.
    for (method, path) in [
        (reqwest::Method::PUT, "/v1/roles/app/nodes/n1"),
        (reqwest::Method::GET, "/v1/roles/app/nodes/n1"),
        (reqwest::Method::GET, "/v1/roles/app"),
        (reqwest::Method::GET, "/v1/roles"),
        (reqwest::Method::GET, "/v1/sd/prometheus"),
        (reqwest::Method::DELETE, "/v1/roles/app/nodes/n1"),
        (reqwest::Method::GET, "/healthz"),
        (reqwest::Method::GET, "/readyz"),
        (reqwest::Method::GET, "/metrics"),
    ] {
        let mut req = http().request(method.clone(), format!("{}{path}", server.api()));
        if method == reqwest::Method::PUT {
            req = req
                .header("content-type", "application/json")
                .body(r#"{"addr":"10.0.0.1"}"#);
        }
        let code = req.send().unwrap().status().as_u16();
        assert!(code < 400, "{method} {path}: {code}");
    }
    for (path, method) in [
        ("/v1/roles/{role}/nodes/{node}", "put"),
        ("/v1/roles/{role}/nodes/{node}", "delete"),
        ("/v1/roles/{role}/nodes/{node}", "get"),
        ("/v1/roles/{role}", "get"),
        ("/v1/roles", "get"),
        ("/v1/sd/prometheus", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/v1/roles/{role}/nodes/{node}/session", "get"),
    ] {
        let op = paths.get(path).and_then(|p| p.get(method));
        assert!(op.is_some(), "{method} {path} is not documented");
        assert!(
            op.unwrap()["summary"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "{method} {path} has no summary"
        );
    }
    // The token is a declared bearer scheme, optional (it depends on --token / --token-reads)
    // everywhere but the health checks.
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let put = &paths["/v1/roles/{role}/nodes/{node}"]["put"];
    assert_eq!(put["security"], serde_json::json!([{}, {"bearer": []}]));
    assert!(paths["/healthz"]["get"].get("security").is_none());
    // Indexes are integers.
    let index = paths["/v1/roles/{role}"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "index")
        .unwrap();
    assert_eq!(index["schema"]["type"], "integer");
    let sess = &paths["/v1/roles/{role}/nodes/{node}/session"]["get"]["responses"];
    assert!(
        sess.get("101").is_some(),
        "the WebSocket upgrade is documented"
    );
}

#[test]
fn schemathesis_finds_no_server_error_and_no_undocumented_response() {
    let st = require("st");
    let dir = tempfile::tempdir().unwrap();
    let server = ServeProc::start(&dir.path().join("data"), dir.path(), &["--max-wait", "1s"]);
    let out = Command::new(st)
        .args(["run", &format!("{}/v1/openapi.json", server.api())])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection",
            "--max-examples",
            "40",
            "--seed",
            "20261125",
            "--no-color",
        ])
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .output()
        .expect("running schemathesis");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{report}"
    );
    assert!(report.contains("generated"), "{report}");
}

/// `GET /v1/sd/prometheus` in Prometheus's http_sd format, read by a real Prometheus: the
/// registered nodes of the role asked for become its targets (scraped: they are this server's
/// own API port), with the `__meta_rollcall_*` labels usable in relabelling; a deregistered
/// node leaves the target list.
#[test]
fn prometheus_scrapes_the_registered_nodes_it_discovers() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServeProc::start(&dir.path().join("data"), dir.path(), &[]);
    let api = server.api();
    let port = server.http.port();
    // Empty: `[]`, not null or an error.
    let empty: serde_json::Value = http()
        .get(format!("{api}/v1/sd/prometheus"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(empty, serde_json::json!([]));
    let put = |role: &str, node: &str, body: String| {
        let r = http()
            .put(format!("{api}/v1/roles/{role}/nodes/{node}"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    };
    // Two nodes of `metrics` are this server's own API (it has /metrics); `db` is another role.
    put(
        "metrics",
        "m1",
        format!(r#"{{"addr":"127.0.0.1","port":{port},"ttl":600,"meta":{{"zone-name":"a"}}}}"#),
    );
    put(
        "metrics",
        "m2",
        format!(r#"{{"addr":"127.0.0.1","port":{port},"ttl":600}}"#),
    );
    put(
        "db",
        "d1",
        r#"{"addr":"10.0.0.9","port":5432,"ttl":600,"service":"pg"}"#.into(),
    );
    let all: serde_json::Value = http()
        .get(format!("{api}/v1/sd/prometheus"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(all.as_array().unwrap().len(), 3);
    let one: serde_json::Value = http()
        .get(format!("{api}/v1/sd/prometheus?role=db"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        one,
        serde_json::json!([{"targets": ["10.0.0.9:5432"], "labels": {
            "__meta_rollcall_role": "db", "__meta_rollcall_node": "d1",
            "__meta_rollcall_service": "pg", "__meta_rollcall_weight": "1",
            "__meta_rollcall_session": "false"}}])
    );
    let bad = http()
        .get(format!("{api}/v1/sd/prometheus?role=no_such"))
        .send()
        .unwrap();
    assert_eq!(bad.status(), 400);

    // A real Prometheus, discovering `metrics` every second.
    let prom_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: rollcall\n    http_sd_configs:\n      - url: {api}/v1/sd/prometheus?role=metrics\n        refresh_interval: 1s\n    relabel_configs:\n      - source_labels: [__meta_rollcall_node]\n        target_label: node\n      - source_labels: [__meta_rollcall_meta_zone_name]\n        target_label: zone_name\n"
        ),
    )
    .unwrap();
    let mut prom = ChildGuard(
        Command::new(require("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting prometheus"),
    );
    let targets = |want_up: usize| -> Vec<serde_json::Value> {
        let mut last = Vec::new();
        let ok = eventually(std::time::Duration::from_secs(30), || {
            let Ok(r) = http()
                .get(format!("http://127.0.0.1:{prom_port}/api/v1/targets"))
                .send()
            else {
                return false;
            };
            let Ok(v) = r.json::<serde_json::Value>() else {
                return false;
            };
            last = v["data"]["activeTargets"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            last.len() == want_up && last.iter().all(|t| t["health"] == "up")
        });
        assert!(ok, "prometheus targets: {last:#?}");
        last
    };
    let up = targets(2);
    let mut nodes: Vec<String> = up
        .iter()
        .map(|t| t["labels"]["node"].as_str().unwrap().to_string())
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["m1", "m2"]);
    let m1 = up.iter().find(|t| t["labels"]["node"] == "m1").unwrap();
    assert_eq!(m1["labels"]["zone_name"], "a", "meta keys are labels");
    assert_eq!(m1["scrapeUrl"], format!("http://127.0.0.1:{port}/metrics"));
    // Deregistered: gone from Prometheus's targets.
    let r = http()
        .delete(format!("{api}/v1/roles/metrics/nodes/m2"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 204);
    let left = targets(1);
    assert_eq!(left[0]["labels"]["node"], "m1");
    let _ = prom.0.kill();
}

/// Kills the child when dropped.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

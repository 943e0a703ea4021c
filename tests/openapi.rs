//! The API document at `/v1/openapi.json` against the live server, checked by schemathesis
//! (PyPI; tests/run.sh installs it): generated requests get no 5xx, and every response matches
//! the document (status codes, content types, headers, bodies); schema-violating requests are
//! rejected.

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

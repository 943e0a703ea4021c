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

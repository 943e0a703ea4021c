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
        ("/metrics", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} is not documented"
        );
    }
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

//! Handler tests: the router driven with `oneshot`, no socket; the peer address comes from
//! `MockConnectInfo`.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::*;
use crate::journal::{Loaded, MemoryJournal};
use crate::registry::Limits;

struct NoDns;
impl crate::registry::Publish for NoDns {
    fn publish(&mut self, _: u64, _: &[crate::registry::RoleView<'_>]) {}
}

fn app_with(access: Access) -> (Router, Registry) {
    let token = tokio_util::sync::CancellationToken::new();
    let (registry, _) = Registry::start(
        Box::new(MemoryJournal),
        Loaded::default(),
        Box::new(NoDns),
        Limits::default(),
        token.clone(),
    );
    let state = AppState::new(registry.clone(), access, token);
    let peer: SocketAddr = "10.1.2.3:40000".parse().unwrap();
    (router(state).layer(MockConnectInfo(peer)), registry)
}

fn app() -> (Router, Registry) {
    app_with(Access::default())
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    body: impl Into<Body>,
    auth: Option<&str>,
) -> (StatusCode, serde_json::Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = auth {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = app
        .clone()
        .oneshot(req.body(body.into()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let json = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)
    };
    (status, json)
}

#[tokio::test]
async fn register_defaults_and_peer_address() {
    let (app, _) = app();
    let (status, body) = call(&app, "PUT", "/v1/roles/AppServer/nodes/app1", "", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["role"], "appserver", "labels are folded to lower case");
    assert_eq!(body["addr"], "10.1.2.3", "addr defaults to the peer");
    assert_eq!(body["ttl"], 5);
    assert_eq!(body["service"], "http");
    assert_eq!(body["expires_in"], 5.0);
    let (status, body) = call(&app, "GET", "/v1/roles", "", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["roles"]["appserver"], 1);
    assert_eq!(body["index"], 1);
}

#[tokio::test]
async fn register_full_body_and_read_back() {
    let (app, _) = app();
    let b = r#"{"addr":"fd00::7","port":8080,"service":"web","ttl":30,"weight":3,"meta":{"version":"1.2"}}"#;
    let (status, body) = call(&app, "PUT", "/v1/roles/app/nodes/n1", b, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = call(&app, "GET", "/v1/roles/app", "", None).await;
    assert_eq!(status, StatusCode::OK);
    let n = &body["nodes"][0];
    assert_eq!(
        (
            n["addr"].as_str(),
            n["port"].as_u64(),
            n["service"].as_str()
        ),
        (Some("fd00::7"), Some(8080), Some("web"))
    );
    assert_eq!(
        (n["weight"].as_u64(), n["meta"]["version"].as_str()),
        (Some(3), Some("1.2"))
    );
}

#[tokio::test]
async fn every_bad_input_gets_a_4xx_in_words_and_changes_nothing() {
    let (app, registry) = app();
    let big = format!(r#"{{"meta":{{"x":"{}"}}}}"#, "a".repeat(70 * 1024));
    let cases: Vec<(&str, String, StatusCode, &str)> = vec![
        (
            "/v1/roles/bad_role/nodes/n1",
            "{}".into(),
            StatusCode::BAD_REQUEST,
            "role name",
        ),
        (
            "/v1/roles/-app/nodes/n1",
            "{}".into(),
            StatusCode::BAD_REQUEST,
            "starts or ends with '-'",
        ),
        (
            "/v1/roles/app/nodes/n1234567890123456789012345678901234567890123456789012345678901234",
            "{}".into(),
            StatusCode::BAD_REQUEST,
            "63",
        ),
        (
            "/v1/roles/app/nodes/n.1",
            "{}".into(),
            StatusCode::BAD_REQUEST,
            "node name",
        ),
        (
            "/v1/roles/app/nodes/n1",
            r#"{"addr":"10.0.0.300"}"#.into(),
            StatusCode::BAD_REQUEST,
            "not an IPv4 or IPv6 address",
        ),
        (
            "/v1/roles/app/nodes/n1",
            r#"{"addr":"0.0.0.0"}"#.into(),
            StatusCode::BAD_REQUEST,
            "unicast",
        ),
        (
            "/v1/roles/app/nodes/n1",
            r#"{"ttl":0}"#.into(),
            StatusCode::BAD_REQUEST,
            "ttl 0 is out of range",
        ),
        (
            "/v1/roles/app/nodes/n1",
            r#"{"ttl":86401}"#.into(),
            StatusCode::BAD_REQUEST,
            "ttl 86401 is out of range",
        ),
        (
            "/v1/roles/app/nodes/n1",
            r#"{"ttl":-1}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid value",
        ),
        (
            "/v1/roles/app/nodes/n1",
            r#"{"port":0}"#.into(),
            StatusCode::BAD_REQUEST,
            "port 0",
        ),
        (
            "/v1/roles/app/nodes/n1",
            r#"{"port":70000}"#.into(),
            StatusCode::BAD_REQUEST,
            "port 70000",
        ),
        (
            "/v1/roles/app/nodes/n1",
            r#"{"weight":70000}"#.into(),
            StatusCode::BAD_REQUEST,
            "weight",
        ),
        (
            "/v1/roles/app/nodes/n1",
            r#"{"service":"_http"}"#.into(),
            StatusCode::BAD_REQUEST,
            "service",
        ),
        (
            "/v1/roles/app/nodes/n1",
            r#"{"meta":{"a":1}}"#.into(),
            StatusCode::BAD_REQUEST,
            "meta.a must be a string",
        ),
        (
            "/v1/roles/app/nodes/n1",
            r#"{"adr":"10.0.0.1"}"#.into(),
            StatusCode::BAD_REQUEST,
            "unknown field `adr`",
        ),
        (
            "/v1/roles/app/nodes/n1",
            r#"{"addr": "10.0.0.1""#.into(),
            StatusCode::BAD_REQUEST,
            "not a valid register request",
        ),
        (
            "/v1/roles/app/nodes/n1",
            "[1,2]".into(),
            StatusCode::BAD_REQUEST,
            "not a valid register request",
        ),
        (
            "/v1/roles/app/nodes/n1",
            big,
            StatusCode::PAYLOAD_TOO_LARGE,
            "larger than 64 KiB",
        ),
    ];
    for (uri, body, want, words) in cases {
        let (status, json) = call(&app, "PUT", uri, body, None).await;
        assert_eq!(status, want, "{uri}: {json}");
        let msg = json["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{uri}: no JSON error: {json}"));
        assert!(
            msg.contains(words),
            "{uri}: {msg:?} does not mention {words:?}"
        );
    }
    assert_eq!(registry.index(), 0, "bad input changed the registry");
    assert!(registry.roles().unwrap().1.is_empty());
}

#[tokio::test]
async fn bad_blocking_query_parameters() {
    let (app, _) = app();
    let (status, json) = call(&app, "GET", "/v1/roles/app?index=abc", "", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(json["error"].as_str().unwrap().contains("index"));
    let (status, json) = call(&app, "GET", "/v1/roles/app?index=0&wait=soon", "", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(json["error"].as_str().unwrap().contains("wait"));
    let (status, _) = call(&app, "GET", "/v1/roles/no_such", "", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn unknown_role_is_empty_and_delete_of_unknown_is_404() {
    let (app, _) = app();
    let (status, body) = call(&app, "GET", "/v1/roles/ghost", "", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["nodes"].as_array().unwrap().len(), 0);
    let (status, body) = call(&app, "DELETE", "/v1/roles/ghost/nodes/n1", "", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].as_str().unwrap().contains("not registered"));
    let (status, body) = call(&app, "GET", "/v2/nothing", "", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());
}

#[tokio::test]
async fn register_then_delete() {
    let (app, _) = app();
    assert_eq!(
        call(&app, "PUT", "/v1/roles/app/nodes/n1", "{}", None)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        call(&app, "DELETE", "/v1/roles/app/nodes/n1", "", None)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        call(&app, "DELETE", "/v1/roles/app/nodes/n1", "", None)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn token_protects_writes_only_unless_token_reads() {
    let (app, registry) = app_with(Access {
        tokens: tokens::Tokens::single("s3cret").shared(),
        ..Access::default()
    });
    let (status, body) = call(&app, "PUT", "/v1/roles/app/nodes/n1", "{}", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"].as_str().unwrap().contains("Bearer"));
    assert_eq!(
        call(&app, "PUT", "/v1/roles/app/nodes/n1", "{}", Some("wrong"))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&app, "DELETE", "/v1/roles/app/nodes/n1", "", None)
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(registry.index(), 0);
    assert_eq!(
        call(&app, "PUT", "/v1/roles/app/nodes/n1", "{}", Some("s3cret"))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        call(&app, "GET", "/v1/roles/app", "", None).await.0,
        StatusCode::OK
    );

    let (app, _) = app_with(Access {
        tokens: tokens::Tokens::single("s3cret").shared(),
        token_reads: true,
        ..Access::default()
    });
    assert_eq!(
        call(&app, "GET", "/v1/roles/app", "", None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&app, "GET", "/v1/roles/app", "", Some("s3cret"))
            .await
            .0,
        StatusCode::OK
    );
    // The scheme is case-insensitive (RFC 9110); the token is not. /readyz, like /healthz,
    // is for load balancers: no token.
    for (value, want) in [
        ("bearer s3cret", StatusCode::OK),
        ("BEARER  s3cret", StatusCode::OK),
        ("Bearer S3CRET", StatusCode::UNAUTHORIZED),
        ("Basic s3cret", StatusCode::UNAUTHORIZED),
    ] {
        let req = Request::builder()
            .uri("/v1/roles/app")
            .header("authorization", value)
            .body(Body::empty())
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), want, "Authorization: {value}");
    }
    assert_eq!(
        call(&app, "GET", "/readyz", "", None).await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(&app, "GET", "/healthz", "", None).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn allow_register_checks_peer_and_address() {
    let nets = vec!["10.1.0.0/16".parse().unwrap()];
    let (app, registry) = app_with(Access {
        allow_register: nets,
        ..Access::default()
    });
    assert_eq!(
        call(&app, "PUT", "/v1/roles/app/nodes/n1", "{}", None)
            .await
            .0,
        StatusCode::OK
    );
    let (status, body) = call(
        &app,
        "PUT",
        "/v1/roles/app/nodes/n2",
        r#"{"addr":"192.168.1.1"}"#,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body["error"].as_str().unwrap().contains("192.168.1.1"));
    assert_eq!(registry.roles().unwrap().1[0].1, 1);

    let (app, _) = app_with(Access {
        allow_register: vec!["172.16.0.0/12".parse().unwrap()],
        ..Access::default()
    });
    let (status, body) = call(
        &app,
        "PUT",
        "/v1/roles/app/nodes/n1",
        r#"{"addr":"172.16.0.1"}"#,
        None,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "the peer 10.1.2.3 is outside"
    );
    assert!(body["error"].as_str().unwrap().contains("your address"));
}

#[test]
fn wait_durations() {
    assert_eq!(parse_wait("30s").unwrap(), Duration::from_secs(30));
    assert_eq!(parse_wait("500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(parse_wait("2m").unwrap(), Duration::from_secs(120));
    assert_eq!(parse_wait("7").unwrap(), Duration::from_secs(7));
    // One duration syntax everywhere (hours and days too); too long is cut by the
    // server's --max-wait, not refused; a bad unit is a 400.
    assert_eq!(parse_wait("1h").unwrap(), Duration::from_secs(3600));
    assert!(parse_wait("99999m").unwrap() >= MAX_WAIT);
    assert_eq!(
        parse_wait("1x").unwrap_err().status,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn allow_register_covers_delete_and_sessions() {
    let (app, registry) = app();
    let (status, _) = call(&app, "PUT", "/v1/roles/app/nodes/n1", "{}", None).await;
    assert_eq!(status, StatusCode::OK);
    // The same registry behind a router that only lets 172.16.0.0/12 write.
    let state = AppState::new(
        registry.clone(),
        Access {
            allow_register: vec!["172.16.0.0/12".parse().unwrap()],
            ..Access::default()
        },
        tokio_util::sync::CancellationToken::new(),
    );
    let peer: SocketAddr = "10.1.2.3:40000".parse().unwrap();
    let strict = router(state).layer(MockConnectInfo(peer));
    let (status, body) = call(&strict, "DELETE", "/v1/roles/app/nodes/n1", "", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body["error"].as_str().unwrap().contains("--allow-register"));
    let (status, _) = call(&strict, "GET", "/v1/roles/app/nodes/n1/session", "", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(registry.roles().unwrap().1.len(), 1, "nothing was removed");
}

#[tokio::test]
async fn special_addresses_are_refused_unless_allowed() {
    let (app, registry) = app();
    for addr in [
        "169.254.169.254",
        "fe80::1",
        "127.0.0.1",
        "::1",
        "::ffff:169.254.169.254",
    ] {
        let (status, body) = call(
            &app,
            "PUT",
            "/v1/roles/app/nodes/n1",
            format!(r#"{{"addr":"{addr}"}}"#),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{addr}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("--allow-any-addr"),
            "{body}"
        );
    }
    assert_eq!(registry.index(), 0);
    let (app, _) = app_with(Access {
        any_addr: true,
        ..Access::default()
    });
    let (status, body) = call(
        &app,
        "PUT",
        "/v1/roles/app/nodes/n1",
        r#"{"addr":"169.254.169.254"}"#,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn blocking_queries_are_capped_per_client() {
    let token = tokio_util::sync::CancellationToken::new();
    let (registry, _) = Registry::start(
        Box::new(MemoryJournal),
        Loaded::default(),
        Box::new(NoDns),
        Limits::default(),
        token.clone(),
    );
    let state = AppState::new(registry, Access::default(), token).with_max_waiters_per_client(2);
    let peer: SocketAddr = "10.1.2.3:40000".parse().unwrap();
    let app = router(state).layer(MockConnectInfo(peer));
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let app = app.clone();
        waiting.push(tokio::spawn(async move {
            call(&app, "GET", "/v1/roles/app?index=0&wait=30s", "", None).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, body) = call(&app, "GET", "/v1/roles/app?index=0&wait=30s", "", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("per client"),
        "{body}"
    );
    // A plain read is not a blocking query.
    let (status, _) = call(&app, "GET", "/v1/roles/app", "", None).await;
    assert_eq!(status, StatusCode::OK);
    for w in waiting {
        w.abort();
    }
}

#[tokio::test]
async fn made_up_methods_do_not_make_new_metric_series() {
    let (app, _) = app();
    for i in 0..50 {
        call(&app, &format!("FOO{i}"), "/v1/roles", "", None).await;
    }
    let resp = app
        .clone()
        .oneshot(
            Request::builder()
                .uri("/metrics")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(!text.contains("FOO"), "a series per made-up method");
    assert!(
        text.contains("method=\"OTHER\""),
        "{}",
        &text[..text.len().min(2000)]
    );
}

#[test]
fn host_names_accepted() {
    let access = Access {
        zone: "cluster".into(),
        allow_hosts: vec!["api.example.com".into()],
        ..Access::default()
    };
    for ok in [
        "127.0.0.1:8053",
        "localhost",
        "dns",
        "[::1]:80",
        "ns.cluster",
        "cluster",
        "API.example.com:443",
        "rollcall.",
    ] {
        assert!(host_allowed(&access, ok.as_bytes()), "{ok}");
    }
    for bad in [
        "example.com",
        "evil.cluster.example",
        "[nope]",
        "a.b",
        "\u{7f}",
    ] {
        assert!(!host_allowed(&access, bad.as_bytes()), "{bad}");
    }
}

/// A token table: each token writes only its roles (PUT, DELETE and session alike, 403 with a
/// sentence naming the role and what it may write); reads follow `read`; `--token` style
/// tokens may write everything.
#[tokio::test]
async fn scoped_tokens_write_only_their_roles() {
    let table = tokens::Tokens::parse(
        "[[token]]\nname = \"apps\"\nsecret = \"app-s\"\nroles = [\"appserver\"]\n\
         [[token]]\nsecret = \"front-s\"\nroles = [\"front*\"]\nread = false\n",
    )
    .unwrap();
    let (app, registry) = app_with(Access {
        tokens: table.shared(),
        token_reads: true,
        ..Access::default()
    });
    let put = |role: &str, token: &str| {
        let (app, uri, token) = (
            app.clone(),
            format!("/v1/roles/{role}/nodes/n1"),
            token.to_owned(),
        );
        async move { call(&app, "PUT", &uri, r#"{"addr":"10.0.0.1"}"#, Some(&token)).await }
    };
    assert_eq!(put("appserver", "app-s").await.0, StatusCode::OK);
    assert_eq!(
        put("AppServer", "app-s").await.0,
        StatusCode::OK,
        "labels fold case first"
    );
    assert_eq!(put("frontserver", "front-s").await.0, StatusCode::OK);
    let index = registry.index();
    let (status, body) = put("frontserver", "app-s").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let e = body["error"].as_str().unwrap();
    assert!(
        e.contains("token \"apps\" may not write role frontserver")
            && e.contains("only roles matching appserver"),
        "{e}"
    );
    // Percent-encoded role names are decoded before the check.
    assert_eq!(put("front%73erver", "app-s").await.0, StatusCode::FORBIDDEN);
    let (status, body) = call(
        &app,
        "DELETE",
        "/v1/roles/frontserver/nodes/n1",
        "",
        Some("app-s"),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body["error"].as_str().unwrap().contains("role frontserver"));
    let (status, body) = call(
        &app,
        "GET",
        "/v1/roles/frontserver/nodes/n1/session",
        "",
        Some("app-s"),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body["error"].as_str().unwrap().contains("role frontserver"));
    assert_eq!(registry.index(), index, "a refused write changes nothing");
    assert_eq!(
        call(
            &app,
            "DELETE",
            "/v1/roles/frontserver/nodes/n1",
            "",
            Some("front-s")
        )
        .await
        .0,
        StatusCode::NO_CONTENT
    );
    // Reads: with --token-reads, a token with read = false may not.
    assert_eq!(
        call(&app, "GET", "/v1/roles", "", Some("app-s")).await.0,
        StatusCode::OK
    );
    let (status, body) = call(&app, "GET", "/v1/roles", "", Some("front-s")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body["error"].as_str().unwrap().contains("may not read"));
    assert_eq!(
        call(&app, "GET", "/v1/roles", "", Some("nope")).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&app, "GET", "/healthz", "", None).await.0,
        StatusCode::OK
    );
}

/// With --tls-client-ca, writes need a verified client certificate; reads need none.
#[tokio::test]
async fn client_certificates_guard_writes_only() {
    let (app, _) = app_with(Access {
        client_cert_writes: true,
        ..Access::default()
    });
    let send = |method: &str, uri: &str, transport: serve::Transport| {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .extension(transport)
            .body(Body::from(r#"{"addr":"10.0.0.1"}"#))
            .unwrap();
        let app = app.clone();
        async move {
            let resp = app.oneshot(req).await.unwrap();
            let status = resp.status();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&bytes).into_owned())
        }
    };
    let no_cert = serve::Transport {
        tls: true,
        client_cert: false,
    };
    let with_cert = serve::Transport {
        tls: true,
        client_cert: true,
    };
    let (status, body) = send("PUT", "/v1/roles/app/nodes/n1", no_cert).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("--client-cert"), "{body}");
    assert_eq!(
        send("DELETE", "/v1/roles/app/nodes/n1", no_cert).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        send("GET", "/v1/roles/app/nodes/n1/session", no_cert)
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        send("PUT", "/v1/roles/app/nodes/n1", with_cert).await.0,
        StatusCode::OK
    );
    for read in ["/v1/roles/app", "/v1/roles", "/metrics", "/healthz", "/"] {
        assert_eq!(send("GET", read, no_cert).await.0, StatusCode::OK, "{read}");
    }
}

//! The session endpoint at the protocol level: frames renew, a closed connection removes the
//! node at once, a silent one ends with the lease (and its connection is closed too).

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rollcall::config::ServeConfig;
use rollcall::server::start;
use tokio_tungstenite::tungstenite::Message;

async fn put(http: &str, node: &str, ttl: u32) {
    let r = reqwest::Client::new()
        .put(format!("http://{http}/v1/roles/app/nodes/{node}"))
        .body(format!(r#"{{"addr":"10.0.0.1","ttl":{ttl}}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

async fn count(http: &str) -> usize {
    let v: serde_json::Value = reqwest::get(format!("http://{http}/v1/roles/app"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["nodes"].as_array().unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_renew_close_removes_silence_expires() {
    let running = start(ServeConfig::for_tests()).await.unwrap();
    let http = running.http_addr.to_string();

    // Unknown node: 404 before any upgrade.
    let err =
        tokio_tungstenite::connect_async(format!("ws://{http}/v1/roles/app/nodes/ghost/session"))
            .await
            .unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");

    // Pings every 500 ms keep a 1 s lease alive for 3 s.
    put(&http, "pinger", 1).await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{http}/v1/roles/app/nodes/pinger/session"))
            .await
            .unwrap();
    for _ in 0..6 {
        ws.send(Message::Ping(Vec::new().into())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(count(&http).await, 1, "pinged node expired");
    let v: serde_json::Value = reqwest::get(format!("http://{http}/v1/roles/app"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["nodes"][0]["session"], true);
    // Closing the connection removes it at once.
    drop(ws);
    let t = Instant::now();
    while count(&http).await != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "not removed after the session closed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // A silent session: the lease runs out, and the server closes the connection.
    put(&http, "silent", 1).await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{http}/v1/roles/app/nodes/silent/session"))
            .await
            .unwrap();
    let t = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the server kept a silent session open");
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "closed before the lease ran out: {:?}",
        t.elapsed()
    );
    assert_eq!(count(&http).await, 0);
    running.stop().await;
}

//! Crash test: clients register (and deregister) nodes as fast as they can while the server is
//! killed with SIGKILL at random moments, several times. After each restart, every registration
//! whose PUT returned 200 is present, none is duplicated, and none that a DELETE removed with a
//! 204 comes back.

#[path = "util/mod.rs"]
mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use util::*;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fate {
    /// PUT answered 200, no DELETE tried: must be present.
    Registered,
    /// PUT sent, no answer (the server died): may or may not be present.
    Unknown,
    /// DELETE answered 204: must be absent.
    Deleted,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn acknowledged_registrations_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let zones = dir.path().join("zones");
    let (dns_port, http_port) = (free_port(), free_port());
    let dns = format!("127.0.0.1:{dns_port}");
    let http_addr = format!("127.0.0.1:{http_port}");
    let api = format!("http://{http_addr}");
    let fates: Arc<Mutex<BTreeMap<(String, String), Fate>>> = Arc::default();
    let mut checked = 0usize;
    let rounds = 5;
    let mut rng = 0x2545F4914F6CDD1Du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };

    for round in 0..rounds {
        let mut server = ServeProc::start_on(&dns, &http_addr, &data, &zones, &[]);
        verify(&api, &fates.lock().unwrap(), &mut checked);

        // Load: 8 workers register nodes; every 4th node is deleted right after.
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..8)
            .map(|w| {
                let (api, fates, stop) = (api.clone(), fates.clone(), stop.clone());
                std::thread::spawn(move || {
                    let client = reqwest::blocking::Client::builder()
                        .timeout(Duration::from_secs(5))
                        .build()
                        .unwrap();
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let role = format!("role{}", i % 10);
                        let node = format!("r{round}-w{w}-n{i}");
                        let key = (role.clone(), node.clone());
                        fates.lock().unwrap().insert(key.clone(), Fate::Unknown);
                        let url = format!("{api}/v1/roles/{role}/nodes/{node}");
                        let body = format!(
                            r#"{{"addr":"10.{}.{}.{}","ttl":3600}}"#,
                            w,
                            (i / 250) % 250,
                            i % 250 + 1
                        );
                        match client.put(&url).body(body).send() {
                            Ok(r) if r.status() == 200 => {
                                fates.lock().unwrap().insert(key.clone(), Fate::Registered);
                            }
                            Ok(r) => panic!("PUT {url}: {}", r.status()),
                            Err(_) => break, // the server is gone
                        }
                        if i % 4 == 3 {
                            fates.lock().unwrap().insert(key.clone(), Fate::Unknown);
                            match client.delete(&url).send() {
                                Ok(r) if r.status() == 204 => {
                                    fates.lock().unwrap().insert(key, Fate::Deleted);
                                }
                                Ok(r) => panic!("DELETE {url}: {}", r.status()),
                                Err(_) => break,
                            }
                        }
                        i += 1;
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300 + next() % 1200));
        server.child.kill().unwrap(); // SIGKILL, mid-load
        server.child.wait().unwrap();
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        drop(server);
    }
    let _server = ServeProc::start_on(&dns, &http_addr, &data, &zones, &[]);
    verify(&api, &fates.lock().unwrap(), &mut checked);
    let acked = fates
        .lock()
        .unwrap()
        .values()
        .filter(|f| **f != Fate::Unknown)
        .count();
    eprintln!(
        "crash test: {rounds} kill -9 rounds, {acked} acknowledged operations, {checked} checks"
    );
    assert!(
        acked > 500,
        "the load was too small to mean anything: {acked}"
    );
}

fn verify(api: &str, fates: &BTreeMap<(String, String), Fate>, checked: &mut usize) {
    let mut present: BTreeSet<(String, String)> = BTreeSet::new();
    for r in 0..10 {
        let role = format!("role{r}");
        let body: serde_json::Value = http()
            .get(format!("{api}/v1/roles/{role}"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        for n in body["nodes"].as_array().unwrap() {
            let key = (role.clone(), n["node"].as_str().unwrap().to_owned());
            assert!(present.insert(key.clone()), "duplicated: {key:?}");
        }
    }
    for (key, fate) in fates {
        match fate {
            Fate::Registered => assert!(
                present.contains(key),
                "acknowledged registration lost: {key:?}"
            ),
            Fate::Deleted => assert!(!present.contains(key), "deleted node came back: {key:?}"),
            Fate::Unknown => {}
        }
        *checked += 1;
    }
    for key in &present {
        assert!(fates.contains_key(key), "a node nobody registered: {key:?}");
    }
}

//! Entry points for fuzzing (`fuzz/`) and for the fuzz smoke test that runs in CI
//! (`tests/fuzz_smoke.rs`). Each takes arbitrary bytes, runs the real code path, and panics
//! only when an invariant is broken.
#![doc(hidden)]

use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};

use hickory_proto::op::{Message, MessageType, OpCode};
use hickory_proto::rr::Name;

use crate::dns::wire::{answer, Outcome, Transport, MAX_UDP_PAYLOAD};
use crate::dns::{Builder, Snapshot, ZoneSettings};
use crate::registry::{Label, NodeSpec, Publish, RoleView};

/// A snapshot with a few roles: IPv4 and IPv6 nodes, SRV, a role too big for UDP.
pub fn sample_snapshot() -> Arc<Snapshot> {
    static SNAP: OnceLock<Arc<Snapshot>> = OnceLock::new();
    SNAP.get_or_init(|| {
        let settings = ZoneSettings {
            ns_addr: Some("127.0.0.1".parse().unwrap()),
            ..ZoneSettings::new(Name::from_ascii("cluster.").unwrap())
        };
        let builder = Arc::new(Mutex::new(Builder::new(settings, Vec::new())));
        let cell = builder.lock().unwrap().cell();
        let spec = |addr: &str, port| NodeSpec {
            addr: addr.parse().unwrap(),
            port,
            service: Label::parse("http").unwrap(),
            ttl: 30,
            weight: 1,
            meta: Default::default(),
        };
        let names: Vec<Label> = (0..100)
            .map(|i| Label::parse(&format!("n{i}")).unwrap())
            .collect();
        let small: Vec<NodeSpec> = vec![
            spec("10.0.0.1", Some(80)),
            spec("fd00::2", Some(81)),
            spec("10.0.0.3", None),
        ];
        let big: Vec<NodeSpec> = (0..100)
            .map(|i| spec(&format!("10.1.0.{}", i + 1), Some(8080)))
            .collect();
        let (app, bigrole) = (Label::parse("app").unwrap(), Label::parse("big").unwrap());
        let views = [
            RoleView {
                role: &app,
                len: small.len(),
                changed: names
                    .iter()
                    .zip(&small)
                    .map(|(l, s)| (l, Some(s)))
                    .collect(),
            },
            RoleView {
                role: &bigrole,
                len: big.len(),
                changed: names.iter().zip(&big).map(|(l, s)| (l, Some(s))).collect(),
            },
        ];
        let mut publisher = builder.clone();
        publisher.publish(1, &views);

        cell.load_full()
    })
    .clone()
}

/// Answers with records (NOERROR, at least one answer) that [`dns_query`] has checked: the
/// smoke test reads it to show that its mutations reach past the header checks.
pub static DNS_ANSWERS_WITH_RECORDS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// Bytes in, answer or nothing out; checks the answer against hickory's decoder.
pub fn dns_query(data: &[u8]) {
    let snap = sample_snapshot();
    let mut out = Vec::new();
    for transport in [Transport::Udp, Transport::Tcp] {
        let mut rotation = data.first().copied().unwrap_or(0).into();
        let outcome = answer(&snap, data, &mut out, transport, &mut rotation);
        let (rcode, truncated) = match outcome {
            Outcome::Answered {
                rcode, truncated, ..
            } => (rcode, truncated),
            Outcome::NotOurs { .. } => (5, false),
            Outcome::Drop => {
                assert!(data.len() < 12 || data[2] & 0x80 != 0, "dropped a query");
                continue;
            }
        };
        assert!(out.len() >= 12, "short answer");
        assert_eq!(out[..2], data[..2], "the ID is echoed");
        assert!(out[2] & 0x80 != 0, "QR set");
        if transport == Transport::Udp {
            assert!(
                out.len() <= usize::from(MAX_UDP_PAYLOAD),
                "UDP answer of {} bytes",
                out.len()
            );
        }
        let response = Message::from_vec(&out)
            .unwrap_or_else(|e| panic!("our answer does not decode: {e}; {out:?}"));
        assert_eq!(response.metadata.message_type, MessageType::Response);
        assert_eq!(response.metadata.truncation, truncated);
        if rcode == 0 && !response.answers.is_empty() {
            DNS_ANSWERS_WITH_RECORDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        // Where hickory reads the query as a plain one-question QUERY, we must not call it
        // malformed (unless its question name uses compression, which no real client does).
        if let Ok(q) = Message::from_vec(data) {
            let plain = q.metadata.op_code == OpCode::Query
                && q.queries.len() == 1
                && q.queries[0].query_type() != hickory_proto::rr::RecordType::OPT;
            if plain
                && !question_is_compressed(data)
                && q.edns.as_ref().is_none_or(|e| e.version() == 0)
            {
                assert_ne!(
                    rcode,
                    crate::dns::wire::RCODE_FORMERR,
                    "FORMERR for a query hickory decodes: {q:?}"
                );
            }
        }
    }
}

/// True when the first question's name uses a compression pointer.
fn question_is_compressed(data: &[u8]) -> bool {
    let mut pos = 12;
    while let Some(&len) = data.get(pos) {
        if len & 0xc0 != 0 {
            return true;
        }
        if len == 0 {
            return false;
        }
        pos += usize::from(len) + 1;
    }
    false
}

/// Bytes in as a register body: accepted specs satisfy every rule, rejections are 4xx.
pub fn register_body(data: &[u8]) {
    let peer: IpAddr = "10.9.8.7".parse().unwrap();
    match crate::api::parse_register(data, peer) {
        Ok(spec) => {
            assert!((1..=86_400).contains(&spec.ttl));
            assert!(spec.port != Some(0));
            assert!(!spec.addr.is_unspecified() && !spec.addr.is_multicast());
            assert!(Label::parse(spec.service.as_str()).is_ok());
            assert!(spec.service.as_str().len() <= 15);
        }
        Err(e) => {
            assert!(e.status.is_client_error(), "{} for {data:?}", e.status);
            assert!(!e.message.is_empty());
        }
    }
}

/// Bytes in -> the journal's replay (what start-up reads from the data dir). It never panics,
/// never claims an intact frame past the end, and its resynchronisation work stays within a
/// small multiple of the input, whatever the input holds.
pub fn journal_replay(data: &[u8]) {
    let r = crate::journal::replay(data);
    assert!(r.good_end <= data.len());
    assert!(
        r.work <= 16 * data.len() + 64,
        "replay examined {} bytes for {} bytes of input",
        r.work,
        data.len()
    );
    assert!(r.live.len() <= r.records);
}

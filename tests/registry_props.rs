//! Property test of the registry: any sequence of register / renew / deregister / time-advance
//! keeps the invariants — the DNS snapshot answers exactly the live set, the index never goes
//! back, and no node outlives its lease.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use proptest::prelude::*;
use rollcall::dns::wire::{answer, Transport};
use rollcall::dns::{Builder, ZoneSettings};
use rollcall::journal::{Loaded, MemoryJournal};
use rollcall::registry::{Label, Limits, NodeKey, NodeSpec, Registry};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
enum Op {
    Put {
        role: u8,
        node: u8,
        addr: u8,
        ttl: u8,
    },
    Renew {
        role: u8,
        node: u8,
    },
    Delete {
        role: u8,
        node: u8,
    },
    Advance {
        ms: u16,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3u8, 0..6u8, 1..5u8, 1..4u8).prop_map(|(role, node, addr, ttl)| Op::Put { role, node, addr, ttl }),
        2 => (0..3u8, 0..6u8).prop_map(|(role, node)| Op::Renew { role, node }),
        1 => (0..3u8, 0..6u8).prop_map(|(role, node)| Op::Delete { role, node }),
        3 => (1..2500u16).prop_map(|ms| Op::Advance { ms }),
    ]
}

fn key(role: u8, node: u8) -> NodeKey {
    NodeKey {
        role: Label::parse(&format!("r{role}")).unwrap(),
        node: Label::parse(&format!("n{node}")).unwrap(),
    }
}

fn dns_addrs(cell: &arc_swap::ArcSwap<rollcall::dns::Snapshot>, role: u8) -> Vec<IpAddr> {
    let mut m = Message::new(7, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(
        Name::from_ascii(format!("r{role}.cluster.")).unwrap(),
        RecordType::A,
    ));
    let mut out = Vec::new();
    let mut rot = 0;
    answer(
        &cell.load(),
        &m.to_vec().unwrap(),
        &mut out,
        Transport::Tcp,
        &mut rot,
    );
    let mut v: Vec<IpAddr> = Message::from_vec(&out)
        .unwrap()
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

async fn check(ops: Vec<Op>) {
    let settings = ZoneSettings::new(Name::from_ascii("cluster.").unwrap());
    let builder = Arc::new(Mutex::new(Builder::new(settings, Vec::new())));
    let cell = builder.lock().unwrap().cell();
    let (reg, _) = Registry::start(
        Box::new(MemoryJournal),
        Loaded::default(),
        Box::new(builder),
        Limits::default(),
        CancellationToken::new(),
    );
    // The model: key -> (addr, deadline).
    let mut model: BTreeMap<NodeKey, (IpAddr, Instant, u32)> = BTreeMap::new();
    let mut last_index = 0;
    for op in ops {
        let now = Instant::now();
        match op {
            Op::Put {
                role,
                node,
                addr,
                ttl,
            } => {
                let addr: IpAddr = format!("10.0.0.{addr}").parse().unwrap();
                let spec = NodeSpec {
                    addr,
                    port: Some(80),
                    service: Label::parse("http").unwrap(),
                    ttl: ttl.into(),
                    weight: 1,
                    meta: Default::default(),
                };
                reg.put(key(role, node), spec).await.unwrap();
                model.insert(
                    key(role, node),
                    (addr, now + Duration::from_secs(ttl.into()), ttl.into()),
                );
            }
            Op::Renew { role, node } => {
                let found = reg.renew(key(role, node)).await.unwrap();
                let m = model.get_mut(&key(role, node));
                assert_eq!(found, m.is_some(), "renew of {role}/{node}");
                if let Some(m) = m {
                    m.1 = now + Duration::from_secs(m.2.into());
                }
            }
            Op::Delete { role, node } => {
                let found = reg.delete(key(role, node)).await.unwrap();
                assert_eq!(found, model.remove(&key(role, node)).is_some());
            }
            Op::Advance { ms } => {
                tokio::time::sleep(Duration::from_millis(ms.into())).await;
                // Let the writer run its expiry for deadlines that just passed.
                tokio::task::yield_now().await;
            }
        }
        // Nodes whose lease ended are gone; the registry may expire a node exactly at its
        // deadline, so compare only nodes clearly inside or outside their lease.
        let now = Instant::now();
        let index = reg.index();
        assert!(
            index >= last_index,
            "index went back: {index} < {last_index}"
        );
        last_index = index;
        for role in 0..3u8 {
            let info = reg
                .role(Label::parse(&format!("r{role}")).unwrap())
                .await
                .unwrap();
            let live: Vec<&NodeKey> = info.nodes.iter().map(|n| &n.key).collect();
            for (k, (_, deadline, _)) in model
                .iter()
                .filter(|(k, _)| k.role.as_str() == format!("r{role}"))
            {
                if *deadline > now {
                    assert!(live.contains(&k), "{k:?} missing before its deadline");
                } else {
                    assert!(!live.contains(&k), "{k:?} outlived its lease");
                }
            }
            assert!(
                live.iter().all(|k| model.contains_key(*k)),
                "a node the model does not have"
            );
            // The DNS snapshot answers exactly the registry's live set.
            let mut want: Vec<IpAddr> = info.nodes.iter().map(|n| n.spec.addr).collect();
            want.sort();
            assert_eq!(
                dns_addrs(&cell, role),
                want,
                "DNS differs from the registry for r{role}"
            );
        }
        model.retain(|_, (_, deadline, _)| *deadline > now);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn registry_invariants_hold(ops in proptest::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        rt.block_on(check(ops));
    }
}

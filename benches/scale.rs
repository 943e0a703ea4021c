//! Scale figures of issue 6, measured in-process (`cargo bench --bench scale`):
//! - registration -> visible in DNS: latency of `Registry::put` (it returns after the snapshot
//!   is published) over 20,000 registrations into a registry that already holds 100,000 nodes,
//!   each checked in the snapshot right after; median, p99, max;
//! - 100,000 nodes in 1,000 roles: resident memory, time to publish one changed role;
//! - start-up from a data dir holding those 100,000 nodes: open + replay + first publish.
//!
//! Prints a table; asserts nothing (targets are compared by a person, in the closing note).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use rollcall::dns::wire::{answer, Transport};
use rollcall::dns::{Builder, ZoneSettings};
use rollcall::journal::{Journal, LogJournal};
use rollcall::registry::{Label, Limits, NodeKey, NodeSpec, Registry};
use tokio_util::sync::CancellationToken;

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn settings() -> ZoneSettings {
    ZoneSettings::new(Name::from_ascii("cluster.").unwrap())
}

fn spec(i: usize) -> NodeSpec {
    NodeSpec {
        addr: std::net::Ipv4Addr::from(0x0a00_0000u32 + i as u32).into(),
        port: Some(8080),
        service: Label::parse("http").unwrap(),
        ttl: 86_400,
        weight: 1,
        meta: Default::default(),
    }
}

fn key(role: usize, node: usize) -> NodeKey {
    NodeKey {
        role: Label::parse(&format!("role{role}")).unwrap(),
        node: Label::parse(&format!("node{node}")).unwrap(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn visible(cell: &arc_swap::ArcSwap<rollcall::dns::Snapshot>, q: &[u8]) -> bool {
    let mut out = Vec::new();
    let mut rot = 0;
    answer(&cell.load(), q, &mut out, Transport::Udp, &mut rot);
    out.len() > 3 && out[3] & 0x0f == 0 && u16::from_be_bytes([out[6], out[7]]) > 0
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this as a quick smoke test.
    let full = std::env::args().any(|a| a == "--bench");
    let (roles, per_role, probes) = if full {
        (1000usize, 100usize, 20_000usize)
    } else {
        (10, 10, 100)
    };
    let dir = tempfile::tempdir().unwrap();
    let rss_start = rss_mb();

    // Fill: 100,000 nodes in 1,000 roles, through the registry (with the data dir).
    let (store, loaded) = LogJournal::open(dir.path()).unwrap();
    let builder = Arc::new(Mutex::new(Builder::new(settings(), Vec::new())));
    let cell = builder.lock().unwrap().cell();
    let limits = Limits {
        max_nodes: 1_000_000,
        max_nodes_per_role: 100_000,
    };
    let (reg, task) = Registry::start(
        Box::new(store) as Box<dyn Journal>,
        loaded,
        Box::new(builder.clone()),
        limits.clone(),
        CancellationToken::new(),
    );
    let t = Instant::now();
    let mut pending = Vec::new();
    for r in 0..roles {
        for n in 0..per_role {
            let reg = reg.clone();
            pending.push(tokio::spawn(async move {
                reg.put(key(r, n), spec(r * per_role + n)).await.unwrap()
            }));
        }
        if pending.len() >= 5000 {
            for p in pending.drain(..) {
                p.await.unwrap();
            }
        }
    }
    for p in pending.drain(..) {
        p.await.unwrap();
    }
    let fill = t.elapsed();
    let rss_full = rss_mb();

    // Publish cost of one changed role with 100k nodes registered: time one more registration
    // end to end, and the builder's update alone.
    let mut publish = Vec::new();
    for i in 0..200 {
        let r = i % roles;
        let role = Label::parse(&format!("role{r}")).unwrap();
        // One node of the role changes (its weight only, as registered otherwise): the
        // incremental path.
        let n = i % per_role;
        let node = Label::parse(&format!("node{n}")).unwrap();
        let changed = NodeSpec {
            weight: (i % 60_000) as u16 + 2,
            ..spec(r * per_role + n)
        };
        let view = rollcall::registry::RoleView {
            role: &role,
            len: per_role,
            changed: vec![(&node, Some(&changed))],
        };
        let t = Instant::now();
        builder
            .lock()
            .unwrap()
            .update_roles(1_000_000 + i as u64, &[view]);
        publish.push(t.elapsed());
    }
    publish.sort();

    // Registration -> visible: 20,000 new nodes, each checked in DNS right after put() returns.
    let mut lat = Vec::new();
    for i in 0..probes {
        let (r, n) = (i % roles, per_role + i / roles);
        let q = {
            let mut m = Message::new(1, MessageType::Query, OpCode::Query);
            m.add_query(Query::query(
                Name::from_ascii(format!("node{n}.role{r}.cluster.")).unwrap(),
                RecordType::A,
            ));
            m.to_vec().unwrap()
        };
        let t = Instant::now();
        reg.put(key(r, n), spec(1_000_000 + i)).await.unwrap();
        let took = t.elapsed();
        assert!(
            visible(&cell, &q),
            "node{n}.role{r} not visible after its PUT returned"
        );
        lat.push(took);
    }
    lat.sort();
    let total = roles * per_role + probes;
    drop(reg);
    let _ = task.await;

    // The same without a data dir (no fsync): the registry and DNS path alone.
    let builder_mem = Arc::new(Mutex::new(Builder::new(settings(), Vec::new())));
    let cell_mem = builder_mem.lock().unwrap().cell();
    let limits_mem = Limits {
        max_nodes: 1_000_000,
        max_nodes_per_role: 100_000,
    };
    let (reg_mem, _t) = Registry::start(
        Box::new(rollcall::journal::MemoryJournal),
        Default::default(),
        Box::new(builder_mem),
        limits_mem,
        CancellationToken::new(),
    );
    for r in 0..roles {
        let mut batch = Vec::new();
        for n in 0..per_role {
            let reg = reg_mem.clone();
            batch.push(tokio::spawn(async move {
                reg.put(key(r, n), spec(r * per_role + n)).await.unwrap()
            }));
        }
        for b in batch {
            b.await.unwrap();
        }
    }
    let mut lat_mem = Vec::new();
    for i in 0..probes {
        let (r, n) = (i % roles, per_role + i / roles);
        let mut m = Message::new(1, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(
            Name::from_ascii(format!("node{n}.role{r}.cluster.")).unwrap(),
            RecordType::A,
        ));
        let q = m.to_vec().unwrap();
        let t = Instant::now();
        reg_mem.put(key(r, n), spec(1_000_000 + i)).await.unwrap();
        let took = t.elapsed();
        assert!(visible(&cell_mem, &q));
        lat_mem.push(took);
    }
    lat_mem.sort();
    drop(reg_mem);

    // Start-up from the data dir: open (replay + compaction) + restore + first publish.
    let t = Instant::now();
    let (store, loaded) = LogJournal::open(dir.path()).unwrap();
    let restored = loaded.nodes.len();
    let builder2 = Arc::new(Mutex::new(Builder::new(settings(), Vec::new())));
    let (reg2, _task2) = Registry::start(
        Box::new(store) as Box<dyn Journal>,
        loaded,
        Box::new(builder2),
        limits,
        CancellationToken::new(),
    );
    reg2.barrier().await.unwrap();
    let startup = t.elapsed();

    println!("| measure | value | target |");
    println!("|---|---|---|");
    println!("| fill {} nodes / {roles} roles via the registry (data dir, fsync per batch) | {:.2} s | - |", roles * per_role, fill.as_secs_f64());
    println!(
        "| resident memory with {} nodes (process RSS, start {:.0} MB) | {:.0} MB | < 200 MB |",
        roles * per_role,
        rss_start,
        rss_full
    );
    println!("| publish one changed {per_role}-node role, median / p99 / max | {:.2} / {:.2} / {:.2} ms | < 10 ms |",
        percentile(&publish, 0.5).as_secs_f64() * 1e3, percentile(&publish, 0.99).as_secs_f64() * 1e3, publish.last().unwrap().as_secs_f64() * 1e3);
    println!("| registration -> visible in DNS (put() latency), median / p99 / max over {probes} | {:.3} / {:.3} / {:.3} ms | p99 < 1 ms |",
        percentile(&lat, 0.5).as_secs_f64() * 1e3, percentile(&lat, 0.99).as_secs_f64() * 1e3, lat.last().unwrap().as_secs_f64() * 1e3);
    println!("| same, memory only (no data dir), median / p99 / max | {:.3} / {:.3} / {:.3} ms | p99 < 1 ms |",
        percentile(&lat_mem, 0.5).as_secs_f64() * 1e3, percentile(&lat_mem, 0.99).as_secs_f64() * 1e3, lat_mem.last().unwrap().as_secs_f64() * 1e3);
    println!(
        "| start-up from the data dir with {restored} nodes (of {total}) | {:.3} s | < 1 s |",
        startup.as_secs_f64()
    );
}

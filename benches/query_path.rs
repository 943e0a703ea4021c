//! In-process cost of the DNS query path (`dns::wire::answer`) and of publishing a role:
//! `cargo bench --bench query_path`. No sockets: this is the userland part of a query that the
//! UDP loop adds to the kernel's work.

use std::sync::{Arc, Mutex};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use rollcall::dns::role::{build_role, RoleBuild};
use rollcall::dns::wire::{answer, Transport};
use rollcall::dns::{Builder, ZoneSettings};
use rollcall::registry::{Label, NodeSpec, Publish, RoleView};

fn query(name: &str, rtype: RecordType) -> Vec<u8> {
    let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    m.to_vec().unwrap()
}

fn spec(i: usize) -> NodeSpec {
    NodeSpec {
        addr: format!("10.0.{}.{}", i / 250, i % 250 + 1).parse().unwrap(),
        port: Some(8080),
        service: Label::parse("http").unwrap(),
        ttl: 30,
        weight: 10,
        meta: Default::default(),
    }
}

fn bench(c: &mut Criterion) {
    let settings = ZoneSettings {
        ns_addr: Some("127.0.0.1".parse().unwrap()),
        ..ZoneSettings::new(Name::from_ascii("cluster.").unwrap())
    };
    let builder = Arc::new(Mutex::new(Builder::new(settings, Vec::new())));
    let cell = builder.lock().unwrap().cell();
    let names: Vec<Label> = (0..1000)
        .map(|i| Label::parse(&format!("n{i}")).unwrap())
        .collect();
    let specs: Vec<NodeSpec> = (0..1000).map(spec).collect();
    let (app, front, big) = (
        Label::parse("appserver").unwrap(),
        Label::parse("frontserver").unwrap(),
        Label::parse("big").unwrap(),
    );
    let views = [
        RoleView {
            role: &app,
            len: specs[..10].len(),
            changed: names[..10]
                .iter()
                .zip(&specs[..10])
                .map(|(l, s)| (l, Some(s)))
                .collect(),
        },
        RoleView {
            role: &front,
            len: specs[10..12].len(),
            changed: names[..2]
                .iter()
                .zip(&specs[10..12])
                .map(|(l, s)| (l, Some(s)))
                .collect(),
        },
        RoleView {
            role: &big,
            len: specs.len(),
            changed: names
                .iter()
                .zip(&specs)
                .map(|(l, s)| (l, Some(s)))
                .collect(),
        },
    ];
    builder.clone().publish(1, &views);
    let snap = cell.load_full();

    let mut out = Vec::with_capacity(4096);
    let mut rot = 0u32;
    for (label, name, rtype) in [
        ("role A (10 nodes)", "appserver.cluster.", RecordType::A),
        (
            "role SRV + glue (10)",
            "_http._tcp.appserver.cluster.",
            RecordType::SRV,
        ),
        ("node A", "n3.appserver.cluster.", RecordType::A),
        ("NXDOMAIN", "nope.cluster.", RecordType::A),
        ("NODATA", "n3.appserver.cluster.", RecordType::AAAA),
        ("REFUSED", "example.com.", RecordType::A),
        ("role A (1000 nodes, TC)", "big.cluster.", RecordType::A),
    ] {
        let q = query(name, rtype);
        c.bench_function(&format!("answer/{label}"), |b| {
            b.iter(|| {
                answer(
                    black_box(&snap),
                    black_box(&q),
                    &mut out,
                    Transport::Udp,
                    &mut rot,
                )
            })
        });
    }

    let zone = rollcall::dns::encode::wire_name(&Name::from_ascii("cluster.").unwrap());
    for n in [10usize, 100, 1000] {
        let nodes: Vec<(&Label, &NodeSpec)> = names[..n].iter().zip(&specs[..n]).collect();
        c.bench_function(&format!("build_role/{n} nodes"), |b| {
            b.iter(|| build_role(&zone, &app, black_box(&nodes), 5))
        });
    }
    // One node of a big role changes: what a publish costs the registry's owner.
    let many: Vec<Label> = (0..20_000)
        .map(|i| Label::parse(&format!("n{i}")).unwrap())
        .collect();
    let many_specs: Vec<NodeSpec> = (0..20_000).map(spec).collect();
    for n in [1000usize, 20_000] {
        let mut build = RoleBuild::new(&zone, &app, 5);
        let all: Vec<(&Label, Option<&NodeSpec>)> = many[..n]
            .iter()
            .zip(&many_specs[..n])
            .map(|(l, s)| (l, Some(s)))
            .collect();
        let mut reverse = rollcall::dns::snapshot::ReverseIndex::default();
        build.apply(&all, &mut reverse);
        let mut weight = 0u16;
        c.bench_function(&format!("role_change/1 of {n} nodes"), |b| {
            b.iter(|| {
                weight = weight.wrapping_add(1);
                let changed = NodeSpec {
                    weight,
                    ..many_specs[n / 2].clone()
                };
                build.apply(&[(&many[n / 2], Some(&changed))], &mut reverse);
                black_box(build.data())
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

use std::sync::{Arc, Mutex};

use super::*;
use crate::journal::MemoryJournal;
use crate::journal::{unix_ms, Loaded, StoredNode};

type Publishes = Vec<(u64, Vec<(String, usize)>)>;
/// Records every publish: (index, [(role, node count)]).
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Publishes>>);

impl Publish for Recorder {
    fn publish(&mut self, index: u64, changed: &[RoleView<'_>]) {
        let roles = changed
            .iter()
            .map(|v| (v.role.to_string(), v.len))
            .collect();
        self.0.lock().unwrap().push((index, roles));
    }
}

impl Recorder {
    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn last(&self) -> (u64, Vec<(String, usize)>) {
        self.0.lock().unwrap().last().cloned().unwrap()
    }
}

fn start(limits: Limits) -> (Registry, Recorder, CancellationToken) {
    let rec = Recorder::default();
    let token = CancellationToken::new();
    let (reg, _) = Registry::start(
        Box::new(MemoryJournal),
        Loaded::default(),
        Box::new(rec.clone()),
        limits,
        token.clone(),
    );
    (reg, rec, token)
}

fn key(role: &str, node: &str) -> NodeKey {
    NodeKey {
        role: Label::parse(role).unwrap(),
        node: Label::parse(node).unwrap(),
    }
}

fn spec(addr: &str, ttl: u32) -> NodeSpec {
    NodeSpec {
        addr: addr.parse().unwrap(),
        port: Some(8080),
        service: Label::parse("http").unwrap(),
        ttl,
        weight: 1,
        meta: Default::default(),
    }
}

#[tokio::test(start_paused = true)]
async fn register_publishes_and_bumps_index() {
    let (reg, rec, _t) = start(Limits::default());
    let info = reg
        .put(key("app", "a1"), spec("10.0.0.1", 5))
        .await
        .unwrap();
    assert_eq!(info.expires_in, Duration::from_secs(5));
    assert_eq!(rec.last(), (1, vec![("app".into(), 1)]));
    reg.put(key("app", "a2"), spec("10.0.0.2", 5))
        .await
        .unwrap();
    assert_eq!(rec.last(), (2, vec![("app".into(), 2)]));
    let role = reg.role(Label::parse("app").unwrap()).await.unwrap();
    assert_eq!(role.index, 2);
    assert_eq!(role.nodes.len(), 2);
    assert_eq!(
        reg.roles().unwrap(),
        (2, vec![(Label::parse("app").unwrap(), 2)])
    );
}

#[tokio::test(start_paused = true)]
async fn renewal_that_changes_nothing_visible_does_not_publish() {
    let (reg, rec, _t) = start(Limits::default());
    reg.put(key("app", "a1"), spec("10.0.0.1", 5))
        .await
        .unwrap();
    let before = rec.count();
    tokio::time::advance(Duration::from_secs(3)).await;
    let info = reg
        .put(key("app", "a1"), spec("10.0.0.1", 5))
        .await
        .unwrap();
    assert_eq!(
        info.expires_in,
        Duration::from_secs(5),
        "the lease restarts from now"
    );
    assert!(reg.renew(key("app", "a1")).await.unwrap());
    assert_eq!(rec.count(), before, "no publish for a pure renewal");
    assert_eq!(reg.index(), 1);
    // A changed address is a visible change.
    reg.put(key("app", "a1"), spec("10.0.0.9", 5))
        .await
        .unwrap();
    assert_eq!(rec.count(), before + 1);
    assert_eq!(reg.index(), 2);
}

#[tokio::test(start_paused = true)]
async fn lease_expires_on_time() {
    let (reg, rec, _t) = start(Limits::default());
    let start = Instant::now();
    reg.put(key("app", "a1"), spec("10.0.0.1", 5))
        .await
        .unwrap();
    reg.put(key("app", "a2"), spec("10.0.0.2", 60))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(4_990)).await;
    assert_eq!(
        reg.role(Label::parse("app").unwrap())
            .await
            .unwrap()
            .nodes
            .len(),
        2
    );
    // Wait for the expiry publish; it must come at the deadline, not later.
    let mut changes = reg.subscribe();
    changes.changed().await.unwrap();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_millis(5_100),
        "expired after {took:?}"
    );
    assert_eq!(rec.last(), (3, vec![("app".into(), 1)]));
    let left = reg.role(Label::parse("app").unwrap()).await.unwrap();
    assert_eq!(
        left.nodes
            .iter()
            .map(|n| n.key.node.as_str())
            .collect::<Vec<_>>(),
        ["a2"]
    );
}

#[tokio::test(start_paused = true)]
async fn renewals_keep_a_node_alive() {
    let (reg, _rec, _t) = start(Limits::default());
    reg.put(key("app", "a1"), spec("10.0.0.1", 2))
        .await
        .unwrap();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert!(
            reg.renew(key("app", "a1")).await.unwrap(),
            "node expired while renewed"
        );
    }
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    assert!(
        !reg.renew(key("app", "a1")).await.unwrap(),
        "node outlived its lease"
    );
}

#[tokio::test(start_paused = true)]
async fn delete_reports_whether_the_node_existed() {
    let (reg, _rec, _t) = start(Limits::default());
    reg.put(key("app", "a1"), spec("10.0.0.1", 5))
        .await
        .unwrap();
    assert!(reg.delete(key("app", "a1")).await.unwrap());
    assert!(!reg.delete(key("app", "a1")).await.unwrap());
    assert!(!reg.delete(key("nope", "a1")).await.unwrap());
    let role = reg.role(Label::parse("app").unwrap()).await.unwrap();
    assert!(role.nodes.is_empty());
    assert_eq!(
        role.index, 2,
        "an emptied role keeps its index for blocking queries"
    );
    assert!(reg.roles().unwrap().1.is_empty());
}

#[tokio::test(start_paused = true)]
async fn blocking_query_wakes_on_change_and_times_out_otherwise() {
    let (reg, _rec, _t) = start(Limits::default());
    reg.put(key("app", "a1"), spec("10.0.0.1", 60))
        .await
        .unwrap();
    let app = Label::parse("app").unwrap();

    // Already past the index: returns at once.
    assert_eq!(
        reg.role_after(app.clone(), 0, Duration::from_secs(30))
            .await
            .unwrap()
            .index,
        1
    );

    // Nothing changes: returns after the wait with the same index.
    let t0 = Instant::now();
    let same = reg
        .role_after(app.clone(), 1, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(same.index, 1);
    assert!(t0.elapsed() >= Duration::from_secs(2));

    // A change of another role does not wake it; a change of this role does.
    let waiter = tokio::spawn({
        let reg = reg.clone();
        let app = app.clone();
        async move {
            reg.role_after(app, 1, Duration::from_secs(30))
                .await
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    reg.put(key("other", "o1"), spec("10.0.0.5", 60))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiter.is_finished());
    let t1 = Instant::now();
    reg.put(key("app", "a2"), spec("10.0.0.2", 60))
        .await
        .unwrap();
    let woke = waiter.await.unwrap();
    assert_eq!(woke.index, 3);
    assert_eq!(woke.nodes.len(), 2);
    assert!(t1.elapsed() < Duration::from_millis(10));
}

#[tokio::test(start_paused = true)]
async fn session_close_removes_only_the_current_session() {
    let (reg, _rec, _t) = start(Limits::default());
    reg.put(key("app", "a1"), spec("10.0.0.1", 60))
        .await
        .unwrap();
    assert_eq!(reg.session_open(key("app", "zz")).await.unwrap(), None);
    let (old, ttl) = reg.session_open(key("app", "a1")).await.unwrap().unwrap();
    assert_eq!(ttl, 60);
    let (new, _) = reg.session_open(key("app", "a1")).await.unwrap().unwrap();
    reg.session_close(key("app", "a1"), old);
    assert_eq!(
        reg.role(Label::parse("app").unwrap())
            .await
            .unwrap()
            .nodes
            .len(),
        1,
        "a stale session must not remove"
    );
    reg.session_close(key("app", "a1"), new);
    assert!(reg
        .role(Label::parse("app").unwrap())
        .await
        .unwrap()
        .nodes
        .is_empty());
}

#[tokio::test(start_paused = true)]
async fn limits_refuse_new_nodes_but_allow_renewals() {
    let (reg, _rec, _t) = start(Limits {
        max_nodes: 3,
        max_nodes_per_role: 2,
    });
    reg.put(key("a", "n1"), spec("10.0.0.1", 60)).await.unwrap();
    reg.put(key("a", "n2"), spec("10.0.0.2", 60)).await.unwrap();
    let e = reg
        .put(key("a", "n3"), spec("10.0.0.3", 60))
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Full(_)), "{e}");
    reg.put(key("b", "n1"), spec("10.0.0.4", 60)).await.unwrap();
    assert!(matches!(
        reg.put(key("c", "n1"), spec("10.0.0.5", 60)).await,
        Err(RegistryError::Full(_))
    ));
    reg.put(key("a", "n1"), spec("10.0.0.1", 60))
        .await
        .expect("renewal at the limit");
}

#[tokio::test(start_paused = true)]
async fn restores_stored_nodes_with_their_remaining_lease() {
    let rec = Recorder::default();
    let now = unix_ms();
    let stored = |node: &str, left_ms: u64| StoredNode {
        role: "app".into(),
        node: node.into(),
        addr: "10.0.0.1".into(),
        port: Some(80),
        service: "http".into(),
        ttl: 60,
        weight: 1,
        meta: Default::default(),
        expires_unix_ms: now + left_ms,
        registered_unix_ms: now - 1000,
    };
    let loaded = Loaded {
        nodes: vec![stored("a", 2_000), stored("b", 30_000)],
        dropped: vec![],
    };
    let (reg, _) = Registry::start(
        Box::new(MemoryJournal),
        loaded,
        Box::new(rec.clone()),
        Limits::default(),
        CancellationToken::new(),
    );
    assert_eq!(rec.last().1, vec![("app".into(), 2)]);
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let role = reg.role(Label::parse("app").unwrap()).await.unwrap();
    assert_eq!(
        role.nodes
            .iter()
            .map(|n| n.key.node.as_str())
            .collect::<Vec<_>>(),
        ["b"]
    );
}

#[tokio::test(start_paused = true)]
async fn an_index_from_before_a_restart_does_not_block() {
    let (reg, _rec, _t) = start(Limits::default());
    reg.put(key("app", "a1"), spec("10.0.0.1", 60))
        .await
        .unwrap();
    // A client that read index 50 from a previous process: answered at once, with our index.
    let t0 = Instant::now();
    let info = reg
        .role_after(Label::parse("app").unwrap(), 50, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(info.index, 1);
    assert!(t0.elapsed() < Duration::from_millis(10));
    let (index, _) = reg.roles_after(50, Duration::from_secs(30)).await.unwrap();
    assert_eq!(index, 1);
    assert!(t0.elapsed() < Duration::from_millis(10));
    // And the current index still blocks.
    let t1 = Instant::now();
    reg.roles_after(1, Duration::from_secs(3)).await.unwrap();
    assert!(t1.elapsed() >= Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn start_at_begins_the_index_where_asked() {
    let rec = Recorder::default();
    let (reg, _) = Registry::start_at(
        Box::new(MemoryJournal),
        Loaded::default(),
        Box::new(rec.clone()),
        Limits::default(),
        CancellationToken::new(),
        1_000,
    );
    reg.put(key("app", "a1"), spec("10.0.0.1", 60))
        .await
        .unwrap();
    assert_eq!(reg.index(), 1_001);
}

#[tokio::test(start_paused = true)]
async fn a_refused_put_leaves_nothing_behind() {
    // Before: every PUT refused over a limit created an empty role entry that was never removed.
    let (reg, _rec, _t) = start(Limits {
        max_nodes: 1,
        max_nodes_per_role: 1,
    });
    reg.put(key("app", "a1"), spec("10.0.0.1", 60))
        .await
        .unwrap();
    for i in 0..1000 {
        let err = reg
            .put(key(&format!("r{i}"), "n"), spec("10.0.0.2", 60))
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::Full(_)), "{err}");
    }
    assert_eq!(reg.table_roles().await, 1);
    // Emptied roles leave the table too (their index stays in the published view).
    reg.delete(key("app", "a1")).await.unwrap();
    assert_eq!(reg.table_roles().await, 0);
    assert_eq!(
        reg.role(Label::parse("app").unwrap()).await.unwrap().index,
        2
    );
}

#[tokio::test(start_paused = true)]
async fn reads_see_renewals_and_sessions_without_a_publish() {
    let (reg, rec, _t) = start(Limits::default());
    reg.put(key("app", "a1"), spec("10.0.0.1", 10))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let node = reg.node(&key("app", "a1")).unwrap().unwrap();
    assert_eq!(node.expires_in, Duration::from_secs(6));
    assert_eq!(node.age, Duration::from_secs(4));
    assert!(reg.renew(key("app", "a1")).await.unwrap());
    let (id, _) = reg.session_open(key("app", "a1")).await.unwrap().unwrap();
    let node = reg.node(&key("app", "a1")).unwrap().unwrap();
    assert_eq!(node.expires_in, Duration::from_secs(10));
    assert!(node.session);
    assert_eq!(rec.count(), 1, "renewals and sessions publish nothing");
    assert!(reg.node(&key("app", "zz")).unwrap().is_none());
    reg.session_close(key("app", "a1"), id);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(reg.node(&key("app", "a1")).unwrap().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_blocking_query_holds_no_copy_and_wakes_only_for_its_role() {
    let (reg, _rec, _t) = start(Limits::default());
    reg.put(key("app", "a1"), spec("10.0.0.1", 600))
        .await
        .unwrap();
    let app = Label::parse("app").unwrap();
    let (view, snap) = reg
        .role_snapshot_after(&app, 0, Duration::from_secs(1))
        .await
        .unwrap();
    let first = snap.unwrap();
    drop(view);
    let waiter = tokio::spawn({
        let reg = reg.clone();
        let app = app.clone();
        async move {
            reg.role_snapshot_after(&app, 1, Duration::from_secs(60))
                .await
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Readers share the one published snapshot: the table and the current view hold it, this
    // test holds it, and the waiter holds none while it waits.
    assert_eq!(Arc::strong_count(&first), 3);
    for i in 0..50 {
        reg.put(key("other", &format!("o{i}")), spec("10.0.0.5", 600))
            .await
            .unwrap();
    }
    assert!(!waiter.is_finished());
    reg.put(key("app", "a2"), spec("10.0.0.2", 600))
        .await
        .unwrap();
    let (view, snap) = waiter.await.unwrap();
    let snap = snap.unwrap();
    assert_eq!(snap.index, view.roles[&app].index);
    assert_eq!(snap.nodes.len(), 2);
}

#[tokio::test]
async fn blocking_queries_answer_when_the_registry_stops() {
    let (reg, _rec, token) = start(Limits::default());
    reg.put(key("app", "a1"), spec("10.0.0.1", 600))
        .await
        .unwrap();
    let waiter = tokio::spawn({
        let reg = reg.clone();
        async move {
            reg.role_snapshot_after(&Label::parse("app").unwrap(), 1, Duration::from_secs(60))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    token.cancel();
    let r = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.err(), Some(RegistryError::Closed));
}

/// A change to one node of a big role publishes a node list that shares every chunk but one
/// with the list before (readers of the old view keep theirs unchanged): publishing does not
/// copy the role.
#[tokio::test(start_paused = true)]
async fn one_change_in_a_big_role_copies_one_chunk_of_its_node_list() {
    let (reg, rec, _t) = start(Limits::default());
    let mut pending = Vec::new();
    for i in 0..5000u32 {
        let reg = reg.clone();
        pending.push(tokio::spawn(async move {
            let addr = std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string();
            reg.put(key("big", &format!("n{i:04}")), spec(&addr, 600))
                .await
                .unwrap();
        }));
    }
    for p in pending {
        p.await.unwrap();
    }
    let big = Label::parse("big").unwrap();
    let before = reg.view().unwrap();
    let old = before.roles[&big].clone();
    assert_eq!(old.nodes.len(), 5000);
    reg.put(key("big", "n2500"), spec("10.9.9.9", 600))
        .await
        .unwrap();
    assert_eq!(rec.last().1, vec![("big".into(), 5000)]);
    let after = reg.view().unwrap();
    let new = &after.roles[&big];
    let chunks = old.nodes.chunk_count();
    assert!(chunks > 20, "{chunks} chunks");
    assert_eq!(new.nodes.shared_chunks(&old.nodes), chunks - 1);
    let n = Label::parse("n2500").unwrap();
    assert_eq!(new.nodes.get(&n).unwrap().spec.addr.to_string(), "10.9.9.9");
    assert_eq!(
        old.nodes.get(&n).unwrap().spec.addr.to_string(),
        "10.0.9.196"
    );
}

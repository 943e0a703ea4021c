//! A full or failing disk never loses an acknowledged write (the red team's findings, 2026-12).
//!
//! Real parts: the real binary, a real tmpfs of a few MiB for ENOSPC (these tests run as root,
//! as CI does: `mount` is required, and its absence is a failure, not a skip), and for failing
//! syncs an `LD_PRELOAD` shim built here with gcc: a *test double for a failing disk*, which this
//! machine cannot produce otherwise. While the file named by `FAULT_FLAG` exists, `fsync` and
//! `fdatasync` fail with EIO.
//!
//! Every case ends with `kill -9` and a restart: whatever answered 200 (or 204) must be there
//! (or gone); whatever answered 5xx may be either.

#[path = "util/mod.rs"]
mod util;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use util::*;

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs failed ({}): these tests need root, as CI has",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    /// Fills the file system but for about `leave` bytes.
    fn fill(&self, leave: u64) -> PathBuf {
        let filler = self.path().join("filler");
        let free = free_bytes(self.path());
        let size = free.saturating_sub(leave);
        std::fs::write(&filler, vec![0u8; size as usize]).unwrap();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn free_bytes(p: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fate {
    Registered,
    Deleted,
    Unknown,
}

fn put(api: &str, node: &str, meta_bytes: usize) -> u16 {
    put_answer(api, node, meta_bytes).0
}

/// Status, `Retry-After` and body of a PUT.
fn put_answer(api: &str, node: &str, meta_bytes: usize) -> (u16, Option<String>, String) {
    let body = serde_json::json!({
        "addr": "10.1.0.1",
        "port": 80,
        "ttl": 3600,
        "meta": { "pad": "x".repeat(meta_bytes) },
    });
    http()
        .put(format!("{api}/v1/roles/app/nodes/{node}"))
        .body(body.to_string())
        .send()
        .map(answer)
        .unwrap_or((0, None, String::new()))
}

fn answer(r: reqwest::blocking::Response) -> (u16, Option<String>, String) {
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, retry, r.text().unwrap_or_default())
}

fn delete(api: &str, node: &str) -> u16 {
    delete_answer(api, node).0
}

fn delete_answer(api: &str, node: &str) -> (u16, Option<String>, String) {
    http()
        .delete(format!("{api}/v1/roles/app/nodes/{node}"))
        .send()
        .map(answer)
        .unwrap_or((0, None, String::new()))
}

/// The documented answer to a write the data dir could not take: 503, `Retry-After`, and a
/// sentence that stays true whatever the repair stores (red team 3 §4 row 5: it was a 500
/// saying "nothing of this request was stored", and the repair stored it).
fn assert_storage_503(what: &str, (status, retry, body): &(u16, Option<String>, String)) {
    assert_eq!(*status, 503, "{what}: {body}");
    assert_eq!(retry.as_deref(), Some("1"), "{what}: Retry-After");
    let error = serde_json::from_str::<serde_json::Value>(body).unwrap()["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        error.starts_with("the data dir could not be written (")
            && error.ends_with(
                "); this request may or may not be stored: repeat it once the disk is healthy"
            ),
        "{what}: {error}"
    );
}

fn present(api: &str) -> Vec<String> {
    let body: serde_json::Value = http()
        .get(format!("{api}/v1/roles/app"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    body["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap().to_owned())
        .collect()
}

fn verify(api: &str, fates: &BTreeMap<String, Fate>) -> usize {
    let here = present(api);
    let mut checked = 0;
    for (node, fate) in fates {
        match fate {
            Fate::Registered => assert!(here.contains(node), "acknowledged {node} lost"),
            Fate::Deleted => assert!(!here.contains(node), "deleted {node} came back"),
            Fate::Unknown => continue,
        }
        checked += 1;
    }
    checked
}

#[test]
fn a_full_disk_loses_no_acknowledged_write_and_the_server_restarts_on_it() {
    let fs = Tmpfs::mount("8m");
    let data = fs.path().join("data");
    let zones = tempfile::tempdir().unwrap();
    let mut fates: BTreeMap<String, Fate> = BTreeMap::new();
    let mut server = ServeProc::start(&data, zones.path(), &[]);
    let api = server.api();

    // Fill the disk with registrations (~20 KB each) until writes fail.
    let filler = fs.fill(600 * 1024);
    let mut refused = 0;
    for i in 0..400 {
        let node = format!("n{i}");
        let answer = put_answer(&api, &node, 20_000);
        match answer.0 {
            200 => {
                fates.insert(node, Fate::Registered);
            }
            _ => {
                assert_storage_503(&format!("PUT {node}"), &answer);
                fates.insert(node, Fate::Unknown);
                refused += 1;
                if refused >= 5 {
                    break;
                }
            }
        }
    }
    assert!(refused >= 5, "the disk never filled up");
    let acked = fates.values().filter(|f| **f == Fate::Registered).count();
    assert!(
        acked >= 5,
        "too few registrations before the disk filled: {acked}"
    );

    // While full: small requests fail too (nothing is acknowledged until a rewrite succeeds),
    // renewals included; a DELETE is never answered 204 without being stored.
    let first = fates
        .iter()
        .find(|(_, f)| **f == Fate::Registered)
        .map(|(n, _)| n.clone())
        .unwrap();
    assert_storage_503("renewal on a full disk", &put_answer(&api, &first, 20_000));
    let victims: Vec<String> = fates
        .iter()
        .filter(|(_, f)| **f == Fate::Registered)
        .map(|(n, _)| n.clone())
        .skip(1)
        .take(3)
        .collect();
    for v in &victims {
        let answer = delete_answer(&api, v);
        match answer.0 {
            204 => {
                fates.insert(v.clone(), Fate::Deleted);
            }
            _ => {
                assert_storage_503(&format!("DELETE {v}"), &answer);
                fates.insert(v.clone(), Fate::Unknown);
            }
        }
    }
    // DNS keeps answering throughout.
    let m = tcp_query(server.dns, "app.cluster.", hickory_proto::rr::RecordType::A);
    assert!(!m.answers.is_empty());

    // Space comes back: writes succeed again within a rewrite interval, and the first
    // registration acknowledged afterwards is never swallowed by a torn frame.
    std::fs::remove_file(&filler).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || put(&api, "after-1", 100) == 200),
        "writes did not recover after space came back"
    );
    fates.insert("after-1".into(), Fate::Registered);
    for i in 2..20 {
        assert_eq!(put(&api, &format!("after-{i}"), 100), 200);
        fates.insert(format!("after-{i}"), Fate::Registered);
    }
    for v in &victims {
        // Deletes answered 503 earlier are retried, as a client would: now they are stored.
        if fates[v] == Fate::Unknown {
            let s = delete(&api, v);
            assert!(s == 204 || s == 404, "DELETE {v} after recovery: {s}");
            fates.insert(v.clone(), Fate::Deleted);
        }
    }

    // kill -9, then restart with the disk nearly full again (less free space than the log).
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    drop(server);
    let log_size = std::fs::metadata(data.join("registrations.log"))
        .unwrap()
        .len();
    let filler = fs.fill(log_size / 4);
    assert!(free_bytes(fs.path()) < log_size);
    let server = ServeProc::start(&data, zones.path(), &[]);
    let checked = verify(&server.api(), &fates);
    eprintln!(
        "full disk: {acked} acknowledged before full, {refused} refused, {checked} fates checked, restart with {} KiB free for a {} KiB log",
        free_bytes(fs.path()) / 1024,
        log_size / 1024
    );
    // And it keeps working on that disk once there is room for appends.
    std::fs::remove_file(&filler).unwrap();
    assert!(eventually(Duration::from_secs(5), || put(
        &server.api(),
        "late",
        100
    ) == 200));
}

fn build_shim(dir: &Path) -> PathBuf {
    let src = dir.join("shim.c");
    std::fs::write(
        &src,
        r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>
static int flag(void) { const char *p = getenv("FAULT_FLAG"); return p && access(p, F_OK) == 0; }
int fdatasync(int fd) {
    static int (*real)(int) = 0; if (!real) real = dlsym(RTLD_NEXT, "fdatasync");
    if (flag()) { errno = EIO; return -1; }
    return real(fd);
}
int fsync(int fd) {
    static int (*real)(int) = 0; if (!real) real = dlsym(RTLD_NEXT, "fsync");
    if (flag()) { errno = EIO; return -1; }
    return real(fd);
}
"#,
    )
    .unwrap();
    let so = dir.join("shim.so");
    let gcc = require("gcc");
    let out = Command::new(gcc)
        .args(["-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(&src)
        .arg("-ldl")
        .output()
        .unwrap();
    assert_succeeded(&out);
    so
}

#[test]
fn a_failing_fsync_is_a_503_for_every_request_until_a_sync_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let so = build_shim(tmp.path());
    let flag = tmp.path().join("fail-now");
    let data = tmp.path().join("data");
    let zones = tmp.path().join("zones");
    std::fs::create_dir_all(&zones).unwrap();
    let mut fates: BTreeMap<String, Fate> = BTreeMap::new();
    let mut server = ServeProc::start_env(
        &data,
        &zones,
        &[],
        &[
            ("LD_PRELOAD", so.to_str().unwrap()),
            ("FAULT_FLAG", flag.to_str().unwrap()),
        ],
    );
    let api = server.api();
    for i in 0..10 {
        assert_eq!(put(&api, &format!("n{i}"), 10), 200);
        fates.insert(format!("n{i}"), Fate::Registered);
    }

    std::fs::write(&flag, b"").unwrap();
    // Registration, renewal and deregistration alike: told it was not stored.
    assert_storage_503("PUT with fsync failing", &put_answer(&api, "new", 10));
    fates.insert("new".into(), Fate::Unknown);
    assert_storage_503("renewal with fsync failing", &put_answer(&api, "n0", 10));
    let answer = delete_answer(&api, "n1");
    assert_storage_503("DELETE with fsync failing", &answer);
    fates.insert("n1".into(), Fate::Unknown);
    let body = http()
        .get(format!("{api}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let failures: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix("rollcall_storage_failures_total "))
        .expect("storage failure counter")
        .parse()
        .unwrap();
    assert!(failures >= 1, "{failures}");

    std::fs::remove_file(&flag).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || put(&api, "back", 10) == 200),
        "writes did not recover once fsync works again"
    );
    fates.insert("back".into(), Fate::Registered);
    assert_eq!(delete(&api, "n2"), 204);
    fates.insert("n2".into(), Fate::Deleted);

    server.child.kill().unwrap();
    server.child.wait().unwrap();
    drop(server);
    let server = ServeProc::start(&data, &zones, &[]);
    let checked = verify(&server.api(), &fates);
    assert!(checked >= 10);
}

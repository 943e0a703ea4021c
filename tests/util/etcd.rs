//! A real etcd cluster for the tests: Debian's `etcd` (3.4.23), members on loopback ports
//! picked free for each test, fresh data dirs and cluster token, short raft timings
//! (heartbeat 50 ms, election 500 ms: the minimum lease TTL is then 1 s) and
//! `--unsafe-no-fsync` (the tests kill processes, never the machine).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{require, ServeProc};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Member {
    pub name: String,
    pub client: String,
    pub peer: String,
    pub dir: PathBuf,
    pub child: Option<Child>,
}

pub struct EtcdCluster {
    pub members: Vec<Member>,
    token: String,
    initial: String,
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a process this test started.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

impl EtcdCluster {
    /// Starts `n` members under `dir` and waits until the cluster has a leader.
    pub fn start(dir: &Path, n: usize) -> EtcdCluster {
        require("etcd");
        let token = format!("rollcall-test-{}-{}", std::process::id(), free_port());
        let members: Vec<Member> = (1..=n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: format!("http://127.0.0.1:{}", free_port()),
                peer: format!("http://127.0.0.1:{}", free_port()),
                dir: dir.join(format!("m{i}")),
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = EtcdCluster {
            members,
            token,
            initial,
        };
        for i in 0..n {
            c.spawn(i);
        }
        c.wait_leader(Duration::from_secs(20));
        c
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let log = std::fs::File::create(m.dir.with_extension("log")).unwrap();
        let child = Command::new(require("etcd"))
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.dir)
            .args(["--listen-client-urls", &m.client])
            .args(["--advertise-client-urls", &m.client])
            .args(["--listen-peer-urls", &m.peer])
            .args(["--initial-advertise-peer-urls", &m.peer])
            .args(["--initial-cluster", &self.initial])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args([
                "--unsafe-no-fsync",
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
            ])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting etcd");
        self.members[i].child = Some(child);
    }

    /// Client URLs, comma-separated, starting with member `first`.
    pub fn endpoints_from(&self, first: usize) -> String {
        let n = self.members.len();
        (0..n)
            .map(|k| self.members[(first + k) % n].client.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn endpoints(&self) -> String {
        self.endpoints_from(0)
    }

    /// `etcdctl` against the live members, output as text.
    pub fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let live: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.client.clone())
            .collect();
        let out = Command::new(require("etcdctl"))
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(live.join(","))
            .args(["--command-timeout", "3s"])
            .args(args)
            .output()
            .expect("running etcdctl");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// The index of the leader, if the live members agree on one.
    pub fn leader(&self) -> Option<usize> {
        let out = self.ctl(&["endpoint", "status", "-w", "json"]).ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        for s in v.as_array()? {
            let leader = s["Status"]["leader"].as_u64()?;
            let id = s["Status"]["header"]["member_id"].as_u64()?;
            if leader == id && leader != 0 {
                let ep = s["Endpoint"].as_str()?;
                return self.members.iter().position(|m| m.client == ep);
            }
        }
        None
    }

    pub fn wait_leader(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader() {
                return l;
            }
            assert!(Instant::now() < deadline, "the etcd cluster has no leader");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The cluster's current revision.
    pub fn revision(&self) -> i64 {
        let out = self
            .ctl(&["endpoint", "status", "-w", "json"])
            .expect("etcdctl endpoint status");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["Status"]["header"]["revision"].as_i64())
            .max()
            .unwrap()
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn stop(&self, i: usize) {
        signal(self.members[i].child.as_ref().unwrap().id(), libc::SIGSTOP);
    }

    pub fn cont(&self, i: usize) {
        signal(self.members[i].child.as_ref().unwrap().id(), libc::SIGCONT);
    }

    /// Restarts a killed member on its data dir (it rejoins the cluster).
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} still runs");
        self.spawn(i);
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                signal(c.id(), libc::SIGCONT);
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A `rollcall serve --etcd …` on port 0, its data dir under `dir/name`.
pub fn serve(dir: &Path, name: &str, endpoints: &str, extra: &[&str]) -> ServeProc {
    serve_on(dir, name, endpoints, "127.0.0.1:0", "127.0.0.1:0", extra)
}

pub fn serve_on(
    dir: &Path,
    name: &str,
    endpoints: &str,
    dns: &str,
    http: &str,
    extra: &[&str],
) -> ServeProc {
    let mut args = vec!["--etcd", endpoints, "--etcd-timeout", "2s"];
    args.extend_from_slice(extra);
    let s = ServeProc::start_full(
        dns,
        http,
        &dir.join(name),
        &dir.join("no-zones"),
        &args,
        &[],
    );
    wait_ready(&s, Duration::from_secs(20));
    s
}

/// Waits until `/readyz` says ready.
pub fn wait_ready(s: &ServeProc, timeout: Duration) {
    let http = super::http();
    let ok = super::eventually(timeout, || {
        http.get(format!("{}/readyz", s.api()))
            .timeout(Duration::from_secs(2))
            .send()
            .is_ok_and(|r| r.status().is_success())
    });
    assert!(ok, "rollcall at {} did not become ready", s.api());
}

pub fn signal_proc(s: &ServeProc, sig: libc::c_int) {
    signal(s.child.id(), sig);
}

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
    /// More flags for every member (TLS, auth token TTL).
    extra: Vec<String>,
    /// More flags for etcdctl (its TLS files, the root user once auth is on).
    ctl_extra: Vec<String>,
}

/// Certificates made with openssl for a secured cluster: a CA, etcd's certificate (for
/// 127.0.0.1, server and client use: etcd's gateway dials etcd with it), a client certificate
/// signed by the CA, and a second CA that signed nothing of it.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub other_ca: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new(require("openssl"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    pub fn make(dir: &Path) -> Pki {
        let dir = dir.join("pki");
        std::fs::create_dir_all(&dir).unwrap();
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
        let run = |cmd: String| {
            let args: Vec<&str> = cmd.split(' ').collect();
            openssl(&dir, &args);
        };
        for ca in ["ca", "other-ca"] {
            run(format!(
                "req -x509 {ec} -keyout {ca}.key -out {ca}.pem -days 2 -subj /CN={ca} \
                 -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign"
            ));
        }
        for (name, ext) in [
            (
                "server",
                "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
            ),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
            run(format!(
                "req {ec} -keyout {name}.key -out {name}.csr -subj {}",
                // etcd answers 400 to gateway calls made with a client certificate that
                // has a CommonName.
                if name == "server" { "/CN=etcd-test" } else { "/O=rollcall-test" }
            ));
            run(format!(
                "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
                 -extfile {name}.ext -out {name}.pem"
            ));
        }
        Pki {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            other_ca: dir.join("other-ca.pem"),
        }
    }
}

/// The password of the test's etcd user `rollcall` and of `root`.
pub const ROLLCALL_PASSWORD: &str = "rollcall-secret";
const ROOT_PASSWORD: &str = "root-secret";

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a process this test started.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

impl EtcdCluster {
    /// Starts `n` members under `dir` and waits until the cluster has a leader.
    pub fn start(dir: &Path, n: usize) -> EtcdCluster {
        Self::start_with(dir, n, None, &[])
    }

    /// A cluster on https:// client URLs with `--client-cert-auth` (clients need a
    /// certificate signed by `pki.ca`), auth enabled, and a user `rollcall` (password
    /// [`ROLLCALL_PASSWORD`]) whose role may read and write `prefix` and nothing else.
    /// `extra`: more etcd flags (`--auth-token-ttl`).
    pub fn start_secure(
        dir: &Path,
        n: usize,
        pki: &Pki,
        prefix: &str,
        extra: &[&str],
    ) -> EtcdCluster {
        let c = Self::start_with(dir, n, Some(pki), extra);
        let end = format!("{prefix}/");
        let steps: [&[&str]; 7] = [
            &["user", "add", &format!("root:{ROOT_PASSWORD}")],
            &["user", "add", &format!("rollcall:{ROLLCALL_PASSWORD}")],
            &["role", "add", "rollcall"],
            &[
                "role",
                "grant-permission",
                "rollcall",
                "--prefix=true",
                "readwrite",
                &end,
            ],
            &["user", "grant-role", "rollcall", "rollcall"],
            &["user", "grant-role", "root", "root"],
            &["auth", "enable"],
        ];
        for step in steps {
            let r = c.ctl(step);
            // `root` may hold the root role already.
            if step[..2] != ["user", "grant-role"] || step[2] != "root" {
                r.unwrap_or_else(|e| panic!("etcdctl {step:?}: {e}"));
            }
        }
        let mut c = c;
        c.ctl_extra
            .extend(["--user".into(), format!("root:{ROOT_PASSWORD}")]);
        c
    }

    fn start_with(dir: &Path, n: usize, pki: Option<&Pki>, extra: &[&str]) -> EtcdCluster {
        require("etcd");
        let scheme = if pki.is_some() { "https" } else { "http" };
        let token = format!("rollcall-test-{}-{}", std::process::id(), free_port());
        let members: Vec<Member> = (1..=n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: format!("{scheme}://127.0.0.1:{}", free_port()),
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
        let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut ctl_extra = Vec::new();
        if let Some(p) = pki {
            let path = |p: &PathBuf| p.to_str().unwrap().to_owned();
            extra.extend([
                "--client-cert-auth".into(),
                "--trusted-ca-file".into(),
                path(&p.ca),
                "--cert-file".into(),
                path(&p.server_cert),
                "--key-file".into(),
                path(&p.server_key),
            ]);
            ctl_extra.extend([
                "--cacert".into(),
                path(&p.ca),
                "--cert".into(),
                path(&p.client_cert),
                "--key".into(),
                path(&p.client_key),
            ]);
        }
        let mut c = EtcdCluster {
            members,
            token,
            initial,
            extra,
            ctl_extra,
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
            .args(&self.extra)
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
            .args(&self.ctl_extra)
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
    serve_full(dir, name, endpoints, dns, http, extra, &[])
}

/// [`serve`] with environment variables.
pub fn serve_env(
    dir: &Path,
    name: &str,
    endpoints: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> ServeProc {
    serve_full(
        dir,
        name,
        endpoints,
        "127.0.0.1:0",
        "127.0.0.1:0",
        extra,
        env,
    )
}

fn serve_full(
    dir: &Path,
    name: &str,
    endpoints: &str,
    dns: &str,
    http: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> ServeProc {
    let mut args = vec!["--etcd", endpoints, "--etcd-timeout", "2s"];
    args.extend_from_slice(extra);
    let s = ServeProc::start_full(
        dns,
        http,
        &dir.join(name),
        &dir.join("no-zones"),
        &args,
        env,
    );
    wait_ready(&s, Duration::from_secs(20));
    s
}

/// [`serve`] without waiting for it to be ready.
pub fn serve_unready(dir: &Path, name: &str, endpoints: &str, extra: &[&str]) -> ServeProc {
    let mut args = vec!["--etcd", endpoints, "--etcd-timeout", "2s"];
    args.extend_from_slice(extra);
    ServeProc::start_full(
        "127.0.0.1:0",
        "127.0.0.1:0",
        &dir.join(name),
        &dir.join("no-zones"),
        &args,
        &[],
    )
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
    if !ok {
        let why = http
            .get(format!("{}/readyz", s.api()))
            .timeout(Duration::from_secs(2))
            .send()
            .and_then(|r| r.text());
        panic!("rollcall at {} did not become ready: {why:?}", s.api());
    }
}

pub fn signal_proc(s: &ServeProc, sig: libc::c_int) {
    signal(s.child.id(), sig);
}

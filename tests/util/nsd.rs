//! A real NSD (`nsd -d`, in the foreground, in its own process group) on 127.0.0.1 and a free
//! port, for the tests that compare rollcall with it or forward to it; stopped on drop through
//! its PID.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;

use super::{query_msg, require};

/// One zone NSD serves. `file: None` names a zone file that does not exist, so NSD answers
/// SERVFAIL for the zone.
pub struct NsdZone<'a> {
    pub name: &'a str,
    pub file: Option<&'a Path>,
}

pub struct Nsd {
    child: Child,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Nsd {
    /// Starts NSD for `zones` (each checked with `nsd-checkzone` first) and waits until it
    /// answers the first zone's SOA over UDP and accepts TCP. `minimal`: NSD's
    /// `minimal-responses` (no: the SRV targets' addresses come as additional data). Response
    /// rate limiting is off (Debian's NSD limits each source /24).
    pub fn start(zones: &[NsdZone<'_>], minimal: bool) -> Nsd {
        let nsd = require("nsd");
        let checkzone = require("nsd-checkzone");
        for z in zones {
            let Some(file) = z.file else { continue };
            let out = Command::new(&checkzone)
                .arg(z.name)
                .arg(file)
                .output()
                .expect("running nsd-checkzone");
            assert!(
                out.status.success(),
                "nsd-checkzone rejects {}: {}{}",
                z.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let minimal = if minimal { "yes" } else { "no" };
        let mut failures = String::new();
        // The port is free when picked but could be taken before NSD binds it: try again.
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path().display();
            let port = free_port();
            let mut conf = format!(
                r#"server:
    ip-address: 127.0.0.1@{port}
    port: {port}
    do-ip6: no
    server-count: 1
    username: ""
    chroot: ""
    zonesdir: "{d}"
    database: ""
    zonelistfile: "{d}/zone.list"
    xfrdfile: "{d}/xfrd.state"
    xfrdir: "{d}"
    pidfile: "{d}/nsd.pid"
    logfile: "{d}/nsd.log"
    verbosity: 1
    minimal-responses: {minimal}
    round-robin: yes
    rrl-ratelimit: 0
    rrl-whitelist-ratelimit: 0
remote-control:
    control-enable: no
"#
            );
            for z in zones {
                let file = match z.file {
                    Some(f) => f.display().to_string(),
                    None => format!("{d}/missing-{}.zone", z.name),
                };
                let _ = write!(
                    conf,
                    "zone:\n    name: {}\n    zonefile: \"{file}\"\n",
                    z.name
                );
            }
            let conf_path = dir.path().join("nsd.conf");
            std::fs::write(&conf_path, conf).unwrap();
            let stderr = std::fs::File::create(dir.path().join("stderr")).unwrap();
            let child = Command::new(&nsd)
                .arg("-d")
                .arg("-c")
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .process_group(0)
                .spawn()
                .expect("starting nsd");
            let mut nsd = Nsd {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                dir,
            };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if nsd.child.try_wait().unwrap().is_some() {
                    let _ = writeln!(failures, "nsd on port {port} exited: {}", nsd.logs());
                    break;
                }
                if answers(nsd.addr, zones[0].name) {
                    return nsd;
                }
                if Instant::now() > deadline {
                    panic!("nsd did not answer within 20 s: {}", nsd.logs());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("nsd did not start:\n{failures}");
    }

    /// Whether NSD is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn logs(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!("log: {} stderr: {}", read("nsd.log"), read("stderr"))
    }
}

impl Drop for Nsd {
    fn drop(&mut self) {
        // SIGTERM to the main process: NSD stops its server and xfrd processes and exits.
        // Those run in the process group created for NSD (PGID = its PID); whatever is left
        // of it afterwards gets SIGKILL. The main process is reaped last, so the group ID
        // cannot have been reused by then.
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signals to the process (group) this helper started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !exited(pid) {
            std::thread::sleep(Duration::from_millis(20));
        }
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Whether child `pid` has exited, without reaping it.
fn exited(pid: libc::pid_t) -> bool {
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own child with WNOWAIT only reads its state.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    r == 0 && unsafe { info.si_pid() } == pid
}

/// Whether `server` answers `zone`'s SOA over UDP and accepts a TCP connection.
fn answers(server: SocketAddr, zone: &str) -> bool {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    sock.send_to(&query_msg(zone, RecordType::SOA, None), server)
        .unwrap();
    let mut buf = [0u8; 4096];
    sock.recv(&mut buf).is_ok()
        && TcpStream::connect_timeout(&server, Duration::from_millis(200)).is_ok()
}

/// A port free for both UDP and TCP on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

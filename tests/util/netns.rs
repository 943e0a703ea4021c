//! Network namespaces for tests: a second host on this machine, joined by a veth pair.

use std::process::{Command, Stdio};

use super::require;

/// A network namespace with a veth link to this one; removed (with the link) when dropped.
pub struct NetNs {
    pub name: String,
    pub host_if: String,
    pub host_ip: String,
    pub ns_ip: String,
}

/// Runs `ip ARGS`; panics with its error output when it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new(require("ip"))
        .args(args)
        .output()
        .expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    /// A namespace joined to this one by a veth pair on a /30 of 10.231.x.y (its name, link
    /// and addresses derived from this process's PID).
    pub fn create() -> NetNs {
        Self::create_in(231)
    }

    /// The same on 10.`octet`.x.y, for tests that must not share addresses with another's.
    pub fn create_in(octet: u8) -> NetNs {
        let id = std::process::id();
        let (a, b) = ((id >> 8) % 256, id % 256);
        let ns = NetNs {
            name: format!("rollcall-test-{octet}-{id}"),
            host_if: format!("rch{octet}{}", id % 100_000),
            host_ip: format!("10.{octet}.{a}.{}", (b / 4) * 4 + 1),
            ns_ip: format!("10.{octet}.{a}.{}", (b / 4) * 4 + 2),
        };
        let peer = format!("rcn{octet}{}", id % 100_000);
        ip(&["netns", "add", &ns.name]);
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &ns.name]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ]);
        ip(&["link", "set", &ns.host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        inside(&["addr", "add", &format!("{}/30", ns.ns_ip), "dev", &peer]);
        inside(&["link", "set", &peer, "up"]);
        inside(&["link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace destroys its veth end, and with it the pair.
        let _ = Command::new(require("ip"))
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new(require("ip"))
            .args(["link", "del", &self.host_if])
            .stderr(Stdio::null())
            .status();
    }
}

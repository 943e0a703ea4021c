//! `rollcall register`'s flags, validated into a [`Plan`]; the check target; the address to
//! register when a server is on loopback; stop signals by name.

use super::*;

// ---------------------------------------------------------------------------------------------
// Flags, validated.

/// A health check: `tcp://HOST:PORT` (connects) or `http(s)://HOST:PORT/PATH` (GET, 2xx passes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    Tcp(String),
    Http(String),
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Check::Tcp(a) => write!(f, "tcp://{a}"),
            Check::Http(u) => f.write_str(u),
        }
    }
}

impl Check {
    /// `--check`'s value; errors name the flag.
    pub fn parse(s: &str) -> Result<Check, String> {
        Check::parse_target(s).map_err(|e| format!("--check {e}"))
    }

    /// A probe target (`rollcall check TARGET`, or `--check`'s value).
    pub fn parse_target(s: &str) -> Result<Check, String> {
        let bad = |why: &str| {
            format!(
                "{s:?} {why}: use tcp://HOST:PORT or http://HOST:PORT/PATH \
                 or https://HOST:PORT/PATH (e.g. tcp://127.0.0.1:8080)"
            )
        };
        let url = reqwest::Url::parse(s).map_err(|e| bad(&format!("is not a URL ({e})")))?;
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("has no host"))?;
        match url.scheme() {
            "tcp" => {
                let port = url.port().ok_or_else(|| bad("has no port"))?;
                Ok(Check::Tcp(format!("{host}:{port}")))
            }
            "http" | "https" => Ok(Check::Http(url.to_string())),
            other => Err(bad(&format!("has the unknown scheme {other:?}"))),
        }
    }

    pub(crate) async fn run(&self, http: &reqwest::Client) -> Result<(), String> {
        match self {
            Check::Tcp(addr) => {
                match tokio::time::timeout(CHECK_TIMEOUT, TcpStream::connect(addr)).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no connection within {CHECK_TIMEOUT:?}")),
                }
            }
            Check::Http(url) => match http.get(url).timeout(CHECK_TIMEOUT).send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("HTTP {}", r.status())),
                Err(e) => Err(chain(&e)),
            },
        }
    }
}

pub use crate::clock::parse_duration;

/// `rollcall check TARGET`: one probe, as the agent's --check runs it (2-s timeout); https
/// targets are checked with --ca-file (else the system's CAs) and show --client-cert.
pub async fn check_once(args: &crate::cli::CheckArgs) -> Result<u8, (u8, String)> {
    let check = Check::parse_target(&args.target).map_err(|e| (2, e))?;
    let http = check_client(&check, &args.tls.files()).map_err(|e| (2, e))?;
    match check.run(&http).await {
        Ok(()) => Ok(0),
        Err(e) => Err((1, format!("{check} fails: {e}"))),
    }
}

/// The HTTP client a check runs with: its TLS config when the check is https (or TLS flags
/// are given).
pub(crate) fn check_client(
    check: &Check,
    files: &crate::tls::ClientFiles,
) -> Result<reqwest::Client, String> {
    let url = match check {
        Check::Http(u) => u.as_str(),
        Check::Tcp(_) => "",
    };
    let tls = crate::client::tls_for(files, &[url])?;
    crate::client::http(CHECK_TIMEOUT, Some(CHECK_TIMEOUT), tls.as_ref())
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))
}

/// This host's name, as the kernel has it.
pub(crate) fn host_name() -> std::io::Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates when it fits.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// The node name used when `--node` is not given: the host name's first label, lower-cased.
pub fn default_node_name() -> Result<Label, String> {
    let host = host_name().map_err(|e| {
        format!("--node is not given and the host name cannot be read ({e}): pass --node NAME")
    })?;
    node_name_from_host(&host)
}

/// A host name's first label as a node name (lower-cased), or why it cannot be one.
pub fn node_name_from_host(host: &str) -> Result<Label, String> {
    let first = host.split('.').next().unwrap_or("");
    Label::parse(first).map_err(|e| {
        format!(
            "--node is not given and the host name {host:?} is not a usable node name: \
             {first:?} {e}; pass --node NAME"
        )
    })
}

pub use crate::client::api_url;

/// Everything `rollcall register` was asked to do, validated.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Base URLs of the API servers, without a trailing slash (`http://127.0.0.1:8053`), in
    /// the order they are tried.
    pub apis: Vec<String>,
    pub role: Label,
    pub node: Label,
    /// The PUT body.
    pub body: serde_json::Value,
    pub ttl: u32,
    pub check: Option<Check>,
    pub drain: Duration,
    /// What the child gets instead of the stop signal the agent received (--stop-signal).
    pub stop_signal: Option<libc::c_int>,
    pub token: Option<String>,
    /// TLS for https:// servers and an https check (None: every URL is http://).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The TLS flags, for the check's own client.
    pub tls_files: crate::tls::ClientFiles,
    pub command: Vec<String>,
    /// Hold a WebSocket session (the agent); false: renew by PUT only (`rollcall docker`,
    /// whose registrations must outlive a restart of the watcher).
    pub sessions: bool,
}

impl Plan {
    pub fn from_args(a: RegisterArgs) -> Result<Plan, String> {
        let apis = crate::client::api_urls(&a.client.api)?;

        let role = Label::parse(&a.role).map_err(|e| format!("--role {:?} {e}", a.role))?;
        let node = match &a.node {
            Some(n) => Label::parse(n).map_err(|e| format!("--node {n:?} {e}"))?,
            None => default_node_name()?,
        };
        if !(MIN_TTL..=MAX_TTL).contains(&a.ttl) {
            return Err(format!(
                "--ttl {} is out of range: use {MIN_TTL} to {MAX_TTL} seconds",
                a.ttl
            ));
        }
        let service =
            parse_service(&a.service).map_err(|e| format!("--service {:?} {e}", a.service))?;
        let mut body = serde_json::json!({
            "ttl": a.ttl,
            "service": service.as_str(),
            "weight": a.weight,
        });
        if let Some(addr) = &a.addr {
            let ip: IpAddr = addr.parse().map_err(|_| {
                format!("--addr {addr:?} is not an IP address (e.g. 10.0.0.7 or fd00::7)")
            })?;
            body["addr"] = ip.to_string().into();
        } else if let Some((ip, via)) = outward_addr(&apis) {
            // A server on this host sees us as 127.0.0.1: register the address the others see.
            tracing::info!(
                addr = %ip,
                "registering {ip}, this host's address towards {via}: a server on loopback \
                 would see 127.0.0.1 (--addr sets it)"
            );
            body["addr"] = ip.to_string().into();
        }
        if let Some(port) = a.port {
            if port == 0 {
                return Err("--port 0 is not a port: use 1 to 65535".into());
            }
            body["port"] = port.into();
        }
        let check = a.check.as_deref().map(Check::parse).transpose()?;
        let drain = parse_duration(&a.drain).map_err(|e| format!("--drain {e}"))?;
        let stop_signal = a
            .stop_signal
            .as_deref()
            .map(parse_signal)
            .transpose()
            .map_err(|e| format!("--stop-signal {e}"))?;
        let token = crate::config::read_token(a.client.token, a.client.token_file.as_ref())
            .map_err(|e| e.to_string())?;
        if let Some(t) = &token {
            if !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(
                    "the token contains spaces or control characters: it must be one word".into(),
                );
            }
        }
        let check_url = match &check {
            Some(Check::Http(u)) => u.as_str(),
            _ => "",
        };
        let tls_files = a.client.tls.files();
        let urls: Vec<&str> = apis.iter().map(String::as_str).chain([check_url]).collect();
        let tls = crate::client::tls_for(&tls_files, &urls)?;
        if a.command.first().is_some_and(|c| c.is_empty()) {
            return Err("the command after -- is empty".into());
        }
        Ok(Plan {
            apis,
            role,
            node,
            body,
            ttl: a.ttl,
            check,
            drain,
            stop_signal,
            token,
            tls,
            tls_files,
            command: a.command,
            sessions: true,
        })
    }

    pub(crate) fn node_url(&self, api: &str) -> String {
        format!("{}/v1/roles/{}/nodes/{}", api, self.role, self.node)
    }

    pub(crate) fn session_url(&self, api: &str) -> String {
        // `api` starts with http:// or https://, checked in from_args: ws:// or wss://.
        format!("ws{}/session", &self.node_url(api)["http".len()..])
    }

    /// Several servers: a silent one is left quickly, and requests time out sooner.
    pub(crate) fn failover(&self) -> bool {
        self.apis.len() > 1
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        if self.failover() {
            FAILOVER_TIMEOUT
        } else {
            REQUEST_TIMEOUT
        }
    }

    pub(crate) fn ttl(&self) -> Duration {
        Duration::from_secs(u64::from(self.ttl))
    }

    /// Ping (or PUT-renewal) period: ttl/3, so two beats may be lost before the lease runs out.
    pub(crate) fn beat(&self) -> Duration {
        self.ttl() / 3
    }

    /// How often a passing check is repeated.
    pub(crate) fn check_every(&self) -> Duration {
        self.beat()
            .clamp(Duration::from_millis(250), Duration::from_secs(10))
    }

    /// Backoff cap while the server is away: soon enough to catch it back within the lease.
    pub(crate) fn backoff_cap(&self) -> Duration {
        self.beat()
            .clamp(Duration::from_millis(500), Duration::from_secs(5))
    }
}

/// With a server on loopback among several (`--api http://127.0.0.1:8053,http://rc-b:8053`, the
/// topology of a server beside every nginx), the server on loopback would register 127.0.0.1.
/// Then the address to register is this host's source address towards the first server not on
/// loopback (a UDP `connect`, which sends nothing), or towards the default route when that
/// server's name does not resolve. None when no API is on loopback, or every one is.
pub(crate) fn outward_addr(apis: &[String]) -> Option<(IpAddr, String)> {
    let host_port = |api: &str| -> Option<(String, u16)> {
        let url = reqwest::Url::parse(api).ok()?;
        Some((
            url.host_str()?.trim_matches(['[', ']']).to_string(),
            url.port_or_known_default()?,
        ))
    };
    let is_loopback = |host: &str| {
        host.eq_ignore_ascii_case("localhost")
            || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    };
    let hosts: Vec<(String, u16)> = apis.iter().filter_map(|a| host_port(a)).collect();
    if !hosts.iter().any(|(h, _)| is_loopback(h)) {
        return None;
    }
    let (remote, port) = hosts.iter().find(|(h, _)| !is_loopback(h))?;
    let source = |to: std::net::SocketAddr| -> Option<IpAddr> {
        let any: std::net::SocketAddr = if to.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = std::net::UdpSocket::bind(any).ok()?;
        sock.connect(to).ok()?;
        let ip = sock.local_addr().ok()?.ip();
        (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
    };
    use std::net::ToSocketAddrs;
    let resolved: Vec<std::net::SocketAddr> = (remote.as_str(), *port)
        .to_socket_addrs()
        .map(|a| a.collect())
        .unwrap_or_default();
    if let Some(ip) = resolved.iter().find_map(|a| source(*a)) {
        return Some((ip, format!("{remote}:{port}")));
    }
    // Unresolvable for now: the default route's source address (192.0.2.1 is TEST-NET-1).
    source(([192, 0, 2, 1], 9).into()).map(|ip| (ip, "the default route".to_string()))
}

/// A signal by name: `QUIT`, `SIGQUIT` or `quit`.
pub(crate) fn parse_signal(name: &str) -> Result<libc::c_int, String> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    Ok(match bare {
        "TERM" => libc::SIGTERM,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "HUP" => libc::SIGHUP,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "KILL" => libc::SIGKILL,
        _ => {
            return Err(format!(
                "{name:?} is not a signal the agent sends: use TERM, INT, QUIT, HUP, USR1, USR2 or KILL"
            ))
        }
    })
}

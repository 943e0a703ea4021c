//! hipache-sync's flags, validated into a [`SyncConfig`]; backend URLs as hipache wants them.

use super::*;

/// Validated settings of `rollcall hipache-sync`.
#[derive(Clone, Debug)]
pub struct SyncConfig {
    /// `…/v1/roles/<role>` on the rollcall API (the first server's).
    pub role_url: Url,
    /// The same on every `--api` server, in the order they are tried.
    pub role_urls: Vec<Url>,
    pub api: String,
    pub role: Label,
    pub redis: redis::ConnectionInfo,
    /// The redis URL without its password, for logs.
    pub redis_shown: String,
    /// Key prefix (hipache's `redis://…#prefix`), usually empty.
    pub prefix: String,
    /// Frontend hosts, lower case, without duplicates, in the order given.
    pub frontends: Vec<String>,
    pub identifier: String,
    pub scheme: String,
    pub port: Option<u16>,
    /// Re-read the role at least this often (None: rely on blocking queries alone).
    pub interval: Option<Duration>,
    pub token: Option<String>,
    /// TLS for https:// servers (None: every --api is http://).
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

pub use crate::clock::parse_duration;

/// A frontend host as hipache looks it up: a host name, `*.<domain>` or the catch-all `*`.
pub(crate) fn parse_frontend(raw: &str) -> Result<String, String> {
    let host = raw.trim().to_ascii_lowercase();
    let bad = |why: &str| {
        format!(
            "--frontend {raw:?} {why}: give the Host header hipache serves, e.g. \
             --frontend www.example.com (or *.example.com, or * for every host)"
        )
    };
    if host.is_empty() {
        return Err(bad("is empty"));
    }
    if host == "*" {
        return Ok(host);
    }
    let name = host.strip_prefix("*.").unwrap_or(&host);
    if name.is_empty() || name.len() > 253 {
        return Err(bad("is not a host name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(bad(&format!("contains {c:?}")));
    }
    if name.split('.').any(str::is_empty) {
        return Err(bad("has an empty label"));
    }
    Ok(host)
}

/// The redis URL without its password, for messages and logs.
pub(crate) fn redact(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// `…/v1/roles/<role>` on one `--api` server, validated.
pub(crate) fn role_url_of(api_s: &str, role: &Label) -> Result<Url, String> {
    let base = crate::client::api_url(api_s)?;
    Url::parse(&format!("{base}/v1/roles/{role}")).map_err(|e| format!("--api {api_s:?}: {e}"))
}

impl SyncConfig {
    /// Validates the flags; every error names the flag and what would be accepted.
    pub fn from_args(a: HipacheArgs) -> Result<SyncConfig, String> {
        // rollcall API: one or more servers
        let role = Label::parse(a.role.trim()).map_err(|e| {
            format!(
                "--role {:?} {e}: give the role the frontservers register under",
                a.role
            )
        })?;
        let mut role_urls = Vec::new();
        for api_s in a
            .client
            .api
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
        {
            role_urls.push(role_url_of(api_s, &role)?);
        }
        let Some(role_url) = role_urls.first().cloned() else {
            return Err(
                "--api is empty: give the URL of a rollcall server, e.g. http://127.0.0.1:8053"
                    .into(),
            );
        };

        // redis, with hipache's optional `#prefix`
        let raw = a.redis.trim();
        let (url, prefix) = match raw.split_once('#') {
            Some((u, p)) => (u, p.to_owned()),
            None => (raw, String::new()),
        };
        let redis_shown = redact(raw);
        let scheme_ok = url.starts_with("redis://")
            || url.starts_with("unix://")
            || url.starts_with("redis+unix://");
        if !scheme_ok {
            let hint = if url.starts_with("rediss://") {
                "TLS (rediss://) is not supported by this build; use redis://"
            } else {
                "use redis://[:password@]host[:port][/db], e.g. redis://127.0.0.1:6379"
            };
            return Err(format!("--redis {redis_shown:?} is not usable: {hint}"));
        }
        let redis = redis::IntoConnectionInfo::into_connection_info(url).map_err(|e| {
            format!(
                "--redis {redis_shown:?} is not a redis URL ({e}): use \
                 redis://[:password@]host[:port][/db], e.g. redis://127.0.0.1:6379/0"
            )
        })?;

        // frontends
        let mut frontends = Vec::new();
        for f in &a.frontends {
            let host = parse_frontend(f)?;
            if !frontends.contains(&host) {
                frontends.push(host);
            }
        }
        if frontends.is_empty() {
            return Err(
                "no --frontend given: name at least one host hipache serves, e.g. \
                        --frontend www.example.com"
                    .into(),
            );
        }

        let identifier = match a.identifier {
            None => role.to_string(),
            Some(id) if id.trim().is_empty() => {
                return Err(
                    "--identifier is empty: give a name for hipache's logs, or leave \
                            it out to use the role name"
                        .into(),
                )
            }
            Some(id) => id.trim().to_owned(),
        };
        let scheme = a.scheme.trim().to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(format!(
                "--scheme {:?} is not one hipache proxies to: use http or https",
                a.scheme
            ));
        }
        if a.port == Some(0) {
            return Err(
                "--port 0 is not a port: use 1 to 65535, or leave it out to use each \
                        node's registered port"
                    .into(),
            );
        }
        let interval = parse_duration(&a.interval)
            .map_err(|e| format!("--interval {e}; 0 turns the periodic re-read off"))?;
        let interval = (!interval.is_zero()).then_some(interval);
        let token = crate::config::read_token(a.client.token, a.client.token_file.as_ref())
            .map_err(|e| e.to_string())?;
        let urls: Vec<&str> = role_urls.iter().map(Url::as_str).collect();
        let tls = crate::client::tls_for(&a.client.tls.files(), &urls)?;
        Ok(SyncConfig {
            role_url,
            role_urls,
            api: a.client.api.join(","),
            role,
            redis,
            redis_shown,
            prefix,
            frontends,
            identifier,
            scheme,
            port: a.port,
            interval,
            token,
            tls,
        })
    }

    pub(crate) fn list_key(&self, host: &str) -> String {
        format!("{}frontend:{host}", self.prefix)
    }

    pub(crate) fn dead_key(&self, host: &str) -> String {
        format!("{}dead:{host}", self.prefix)
    }

    /// How long one blocking query waits.
    pub(crate) fn wait(&self) -> Duration {
        self.interval
            .map_or(BLOCKING_WAIT, |i| i.min(BLOCKING_WAIT))
    }

    /// The list hipache should see for these nodes: the identifier, then one URL per distinct
    /// backend, sorted by address then port.
    pub fn hipache_list(&self, nodes: &[NodeOut]) -> Vec<String> {
        let default_port = if self.scheme == "https" { 443 } else { 80 };
        let backends: BTreeSet<(IpAddr, u16)> = nodes
            .iter()
            .filter_map(|n| {
                let ip = n.addr.parse::<IpAddr>().ok()?;
                Some((ip, self.port.or(n.port).unwrap_or(default_port)))
            })
            .collect();
        std::iter::once(self.identifier.clone())
            .chain(
                backends
                    .into_iter()
                    .map(|(ip, port)| backend_url(&self.scheme, ip, port)),
            )
            .collect()
    }
}

/// `http://10.0.0.5:8080`, `http://[fd00::5]:8080`.
pub fn backend_url(scheme: &str, ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{scheme}://{v4}:{port}"),
        IpAddr::V6(v6) => format!("{scheme}://[{v6}]:{port}"),
    }
}

//! Validated settings, built once from the raw flags. Every error here is a usage error
//! (exit code 2) that names the flag and says what would be accepted.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use hickory_proto::rr::Name;
use ipnet::IpNet;

use crate::api::Access;
use crate::cli::ServeArgs;
use crate::registry::Limits;

#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Never empty; the first is the main one (its address is `ns.<zone>`'s default).
    pub dns_listen: Vec<SocketAddr>,
    pub http_listen: SocketAddr,
    pub zone: Name,
    pub zones_dir: PathBuf,
    /// None: memory only.
    pub data_dir: Option<PathBuf>,
    pub record_ttl: u32,
    pub negative_ttl: u32,
    pub ns_name: Name,
    pub dns_threads: usize,
    pub access: Access,
    /// DNS clients allowed to query (empty: everyone).
    pub allow_query: crate::dns::acl::Acl,
    pub limits: Limits,
    /// Longest blocking query.
    pub max_wait: std::time::Duration,
    /// Blocking queries per client address.
    pub max_waits_per_client: usize,
    /// UDP response rate limiting.
    pub rate_limit: crate::dns::rrl::RateLimitConfig,
    /// etcd mode (None: the embedded single server).
    pub etcd: Option<crate::etcd::EtcdConfig>,
    /// etcd mode: TLS to etcd and the etcd user (`--etcd-cacert`, `--etcd-user`, …).
    pub etcd_access: crate::etcd::client::Access,
    /// Forwarding of names outside our zones (None: REFUSED).
    pub forward: Option<crate::dns::forward::ForwardConfig>,
    /// HTTPS on the API (None: plain HTTP): the files, read again on SIGHUP, and the config
    /// they made at start.
    pub tls: Option<TlsServe>,
    /// `--token-file`, read again on SIGHUP into `access.tokens`.
    pub token_file: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct TlsServe {
    pub files: crate::tls::ServerFiles,
    pub initial: Arc<rustls::ServerConfig>,
}

/// `--tls-cert`, `--tls-key`, `--tls-client-ca`, checked together and read once.
fn parse_tls(a: &ServeArgs) -> Result<Option<TlsServe>, ConfigError> {
    let files = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => crate::tls::ServerFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: a.tls_client_ca.clone(),
        },
        (None, None) if a.tls_client_ca.is_some() => {
            return Err(err(
                "--tls-client-ca needs HTTPS: give --tls-cert and --tls-key too",
            ))
        }
        (None, None) => return Ok(None),
        (Some(_), None) => return Err(err("--tls-cert is given without --tls-key: give both")),
        (None, Some(_)) => return Err(err("--tls-key is given without --tls-cert: give both")),
    };
    let initial = files.load().map_err(err)?;
    Ok(Some(TlsServe { files, initial }))
}

/// The server's tokens: `--token` (one that may write every role), `--token-file` (either
/// form; see `api::tokens`), or none.
fn server_tokens(a: &ServeArgs) -> Result<crate::api::tokens::Tokens, ConfigError> {
    use crate::api::tokens::Tokens;
    match (&a.token, &a.token_file) {
        (Some(_), Some(path)) => Err(err(format!(
            "both --token and --token-file ({}) are given: give one",
            path.display()
        ))),
        (Some(t), None) if t.trim().is_empty() => Err(err(
            "the token is empty: give a non-empty --token or --token-file",
        )),
        (Some(t), None) => Ok(Tokens::single(t)),
        (None, Some(path)) => Tokens::load(path).map_err(err),
        (None, None) => Ok(Tokens::default()),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err(s: impl Into<String>) -> ConfigError {
    ConfigError(s.into())
}

pub fn parse_addr(flag: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| {
        err(format!(
            "--{flag} {s:?} is not an address:port (e.g. 127.0.0.1:1053 or [::1]:1053)"
        ))
    })
}

pub fn read_token(
    token: Option<String>,
    file: Option<&PathBuf>,
) -> Result<Option<String>, ConfigError> {
    let token = match (token, file) {
        (Some(_), Some(path)) => {
            return Err(err(format!(
                "both --token and --token-file ({}) are given: give one",
                path.display()
            )))
        }
        (Some(t), None) => Some(t),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| err(format!("--token-file {}: {e}", path.display())))?;
            Some(text.lines().next().unwrap_or("").trim().to_owned())
        }
        (None, None) => None,
    };
    match token {
        Some(t) if t.is_empty() => Err(err(
            "the token is empty: give a non-empty --token or --token-file",
        )),
        t => Ok(t),
    }
}

/// `10.0.0.0/8` or a bare address, per flag value.
fn parse_nets(flag: &str, values: &[String]) -> Result<Vec<IpNet>, ConfigError> {
    values
        .iter()
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| err(format!("--{flag} {s:?} is not a network (e.g. 10.0.0.0/8)")))
        })
        .collect()
}

impl ServeConfig {
    pub fn from_args(a: ServeArgs) -> Result<ServeConfig, ConfigError> {
        let zone = Name::from_ascii(&a.zone)
            .map(|mut z| {
                z.set_fqdn(true);
                z.to_lowercase()
            })
            .map_err(|e| err(format!("--zone {:?} is not a domain name: {e}", a.zone)))?;
        if zone.is_root() {
            return Err(err(
                "--zone cannot be the root zone: use a zone such as cluster.",
            ));
        }
        let ns_name = match &a.ns_name {
            Some(n) => Name::from_ascii(n)
                .map(|mut z| {
                    z.set_fqdn(true);
                    z
                })
                .map_err(|e| err(format!("--ns-name {n:?} is not a domain name: {e}")))?,
            None => {
                crate::dns::builder::default_name("ns", &zone).map_err(|e| err(e.to_string()))?
            }
        };
        if a.record_ttl == 0 || a.record_ttl > 86_400 {
            return Err(err(format!(
                "--record-ttl {} is out of range: use 1 to 86400 seconds",
                a.record_ttl
            )));
        }
        if a.negative_ttl > 86_400 {
            return Err(err(format!(
                "--negative-ttl {} is out of range: use 0 to 86400 seconds",
                a.negative_ttl
            )));
        }
        let allow_register = a
            .allow_register
            .iter()
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        err(format!(
                            "--allow-register {s:?} is not a network (e.g. 10.0.0.0/8)"
                        ))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let allow_query = match parse_nets("allow-query", &a.allow_query)? {
            nets if nets.is_empty() => crate::dns::acl::Acl::Everyone,
            nets => crate::dns::acl::Acl::only(nets),
        };
        let max_wait = crate::clock::parse_duration(&a.max_wait)
            .map_err(|e| err(format!("--max-wait {e}")))?;
        if max_wait.is_zero() {
            return Err(err("--max-wait must be more than 0"));
        }
        let etcd = parse_etcd(&a)?;
        let etcd_access = parse_etcd_access(&a, etcd.as_ref())?;
        let shared = etcd.is_some();
        let forward = parse_forward(&a)?;
        let tokens = server_tokens(&a)?;
        let tls = parse_tls(&a)?;
        let client_cert_writes = tls.as_ref().is_some_and(|t| t.files.client_ca.is_some());
        let dns_threads = match a.dns_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let zone_host = zone_host(&zone);
        let rate_limit_exempt = acl_flag("rate-limit-exempt", &a.rate_limit_exempt)?;
        Ok(ServeConfig {
            etcd,
            etcd_access,
            forward,
            tls,
            token_file: a.token_file,
            dns_listen: {
                let addrs = a
                    .dns_listen
                    .iter()
                    .map(|s| s.trim())
                    .filter(|s| !s.is_empty())
                    .map(|s| parse_addr("dns-listen", s))
                    .collect::<Result<Vec<_>, _>>()?;
                if addrs.is_empty() {
                    return Err(err(
                        "--dns-listen is empty: give an address, e.g. 127.0.0.1:1053",
                    ));
                }
                for (i, x) in addrs.iter().enumerate() {
                    if addrs[..i].contains(x) {
                        return Err(err(format!("--dns-listen lists {x} twice")));
                    }
                }
                addrs
            },
            http_listen: parse_addr("http-listen", &a.http_listen)?,
            zone,
            zones_dir: a.zones,
            data_dir: (!a.data_dir.is_empty()).then(|| PathBuf::from(a.data_dir)),
            record_ttl: a.record_ttl,
            negative_ttl: a.negative_ttl,
            ns_name,
            dns_threads,
            access: Access {
                tokens: tokens.shared(),
                token_reads: a.token_reads,
                client_cert_writes,
                allow_register,
                allow_hosts: a
                    .allow_host
                    .iter()
                    .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
                    .filter(|h| !h.is_empty())
                    .collect(),
                zone: zone_host.clone(),
                any_addr: a.allow_any_addr,
                shared,
            },
            max_waits_per_client: a.max_waits_per_client.max(1),
            rate_limit: crate::dns::rrl::RateLimitConfig {
                limit: a.rate_limit,
                slip: a.rate_limit_slip,
                exempt: rate_limit_exempt,
            },
            allow_query,
            max_wait,
            limits: Limits {
                max_nodes: a.max_nodes,
                max_nodes_per_role: a.max_nodes_per_role,
            },
        })
    }

    /// Settings for tests and benchmarks: loopback, port 0, memory only, no zone files.
    pub fn for_tests() -> ServeConfig {
        ServeConfig {
            dns_listen: vec!["127.0.0.1:0".parse().unwrap()],
            http_listen: "127.0.0.1:0".parse().unwrap(),
            zone: Name::from_ascii("cluster.").unwrap(),
            zones_dir: PathBuf::from("/nonexistent-rollcall-zones"),
            data_dir: None,
            record_ttl: 5,
            negative_ttl: 1,
            ns_name: Name::from_ascii("ns.cluster.").unwrap(),
            dns_threads: 1,
            access: Access {
                zone: "cluster".into(),
                ..Access::default()
            },
            allow_query: crate::dns::acl::Acl::Everyone,
            limits: Limits::default(),
            max_wait: crate::api::MAX_WAIT,
            max_waits_per_client: crate::api::MAX_WAITERS_PER_CLIENT,
            rate_limit: crate::dns::rrl::RateLimitConfig::default(),
            etcd: None,
            etcd_access: Default::default(),
            forward: None,
            tls: None,
            token_file: None,
        }
    }
}

fn parse_duration_flag(flag: &str, s: &str) -> Result<std::time::Duration, ConfigError> {
    let d = crate::clock::parse_duration(s).map_err(|e| err(format!("--{flag} {e}")))?;
    if d.is_zero() {
        return Err(err(format!("--{flag} must be more than 0")));
    }
    Ok(d)
}

fn parse_etcd(a: &ServeArgs) -> Result<Option<crate::etcd::EtcdConfig>, ConfigError> {
    let endpoints: Vec<String> = a
        .etcd
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            let url = if s.contains("://") {
                s.to_owned()
            } else {
                format!("http://{s}")
            };
            match reqwest::Url::parse(&url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                    Ok(url.trim_end_matches('/').to_owned())
                }
                _ => Err(err(format!(
                    "--etcd {s:?} is not an etcd client URL: use e.g. http://127.0.0.1:2379 or \
                     https://127.0.0.1:2379"
                ))),
            }
        })
        .collect::<Result<_, _>>()?;
    if endpoints.is_empty() {
        return Ok(None);
    }
    let prefix = a.etcd_prefix.trim_end_matches('/').to_owned();
    if !prefix.starts_with('/') || prefix.contains("//") {
        return Err(err(format!(
            "--etcd-prefix {:?} must start with / (e.g. /rollcall)",
            a.etcd_prefix
        )));
    }
    Ok(Some(crate::etcd::EtcdConfig {
        endpoints,
        prefix,
        timeout: parse_duration_flag("etcd-timeout", &a.etcd_timeout)?,
        dial_timeout: parse_duration_flag("etcd-dial-timeout", &a.etcd_dial_timeout)?,
        resync: parse_duration_flag("etcd-resync", &a.etcd_resync)?,
        // A knob for the tests only (a catch-up over the limit without writing 64 MiB).
        watch_line_max: std::env::var("ROLLCALL_TEST_ETCD_WATCH_MAX_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(crate::etcd::client::WATCH_LINE_MAX),
    }))
}

/// `--etcd-cacert`, `--etcd-cert`, `--etcd-key`, `--etcd-user` and its password, read once.
fn parse_etcd_access(
    a: &ServeArgs,
    etcd: Option<&crate::etcd::EtcdConfig>,
) -> Result<crate::etcd::client::Access, ConfigError> {
    let given = a.etcd_cacert.is_some()
        || a.etcd_cert.is_some()
        || a.etcd_key.is_some()
        || a.etcd_user.is_some()
        || a.etcd_password_file.is_some();
    let Some(etcd) = etcd else {
        if given {
            return Err(err(
                "--etcd-cacert, --etcd-cert, --etcd-key and --etcd-user need --etcd",
            ));
        }
        return Ok(Default::default());
    };
    let https = etcd.endpoints.iter().any(|e| e.starts_with("https://"));
    let tls_flags = a.etcd_cacert.is_some() || a.etcd_cert.is_some() || a.etcd_key.is_some();
    if tls_flags && !https {
        return Err(err(
            "--etcd-cacert, --etcd-cert and --etcd-key are for https:// etcd endpoints: use \
             https:// in --etcd",
        ));
    }
    let tls = if https {
        Some(
            crate::tls::etcd_client_config(
                a.etcd_cacert.as_deref(),
                a.etcd_cert.as_deref(),
                a.etcd_key.as_deref(),
            )
            .map_err(err)?,
        )
    } else {
        None
    };
    let password = match (
        &a.etcd_password_file,
        std::env::var("ROLLCALL_ETCD_PASSWORD"),
    ) {
        (Some(path), _) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| err(format!("--etcd-password-file {}: {e}", path.display())))?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
        ),
        (None, Ok(p)) if !p.is_empty() => Some(p),
        _ => None,
    };
    let user = match (&a.etcd_user, password) {
        (Some(u), Some(p)) if !u.is_empty() => Some((u.clone(), p)),
        (Some(_), None) => {
            return Err(err(
                "--etcd-user needs a password: --etcd-password-file FILE or the environment \
                 variable ROLLCALL_ETCD_PASSWORD (never on the command line)",
            ))
        }
        (None, Some(_)) if a.etcd_password_file.is_some() => {
            return Err(err("--etcd-password-file needs --etcd-user"))
        }
        (Some(_), Some(_)) => return Err(err("--etcd-user is empty")),
        (None, _) => None,
    };
    Ok(crate::etcd::client::Access { tls, user })
}

/// The zone as a host name: lower case, without the final dot.
fn zone_host(zone: &Name) -> String {
    zone.to_ascii().trim_end_matches('.').to_ascii_lowercase()
}

fn parse_forward(a: &ServeArgs) -> Result<Option<crate::dns::forward::ForwardConfig>, ConfigError> {
    let rules = a
        .forward
        .iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            crate::dns::forward::parse_rule(s).map_err(|e| err(format!("--forward {s:?}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if rules.is_empty() {
        if !a.allow_recursion.is_empty() {
            return Err(err(
                "--allow-recursion without --forward: give the upstreams with --forward ADDR",
            ));
        }
        return Ok(None);
    }
    Ok(Some(crate::dns::forward::ForwardConfig {
        rules,
        allow: acl_flag("allow-recursion", &a.allow_recursion)?,
        timeout: parse_duration_flag("forward-timeout", &a.forward_timeout)?,
        budget: parse_duration_flag("forward-budget", &a.forward_budget)?,
        cache: a.forward_cache,
        cache_bytes: parse_size("forward-cache-size", &a.forward_cache_size)?,
        max_inflight: a.forward_max_inflight.max(1),
        max_per_client: a.forward_max_per_client.max(1),
    }))
}

/// An ACL flag: unset means the trusted default (loopback and the private networks of
/// interfaces without the default route), `none` means nobody, else the networks given.
fn acl_flag(flag: &str, values: &[String]) -> Result<crate::dns::acl::Acl, ConfigError> {
    use crate::dns::acl::{trusted_local_networks, Acl};
    let values: Vec<String> = values
        .iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if values.is_empty() {
        return Ok(Acl::only(trusted_local_networks()));
    }
    if values.iter().any(|s| s == "none") {
        if values.len() > 1 {
            return Err(err(format!(
                "--{flag}: `none` cannot be combined with networks ({})",
                values.join(",")
            )));
        }
        return Ok(Acl::nobody());
    }
    Ok(Acl::only(parse_nets(flag, &values)?))
}

/// A size in bytes: `32MiB`, `512KiB`, `1GiB`, `64MB`, `1000`.
fn parse_size(flag: &str, s: &str) -> Result<usize, ConfigError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        _ => usize::MAX,
    };
    match digits.parse::<usize>() {
        Ok(n) if mult != usize::MAX => n
            .checked_mul(mult)
            .ok_or_else(|| err(format!("--{flag} {s:?} is too large"))),
        _ => Err(err(format!(
            "--{flag} {s:?} is not a size (e.g. 32MiB, 512KiB, 1GiB, or a number of bytes)"
        ))),
    }
}

//! `rollcall status`: roles and nodes of a running server, like `serf members` but with the
//! leases: address, port, age, time to expiry and how the lease is held (session or renewals).
//! `--watch` redraws on every change, using the blocking query.

use std::time::Duration;

use crate::api::model::{NodeOut, RoleOut, RolesOut};
use crate::cli::StatusArgs;

/// Validated settings of `rollcall status`.
#[derive(Clone, Debug)]
pub struct StatusConfig {
    /// Every `--api` server, in the order they are tried (http or https, a host, no query).
    pub apis: Vec<String>,
    pub token: Option<String>,
    /// TLS for https:// servers (None: every --api is http://).
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// Only this role (a valid label).
    pub role: Option<String>,
    pub json: bool,
    pub watch: bool,
}

impl StatusConfig {
    /// Checks every flag once; the error says which flag and what to do.
    pub fn from_args(args: StatusArgs) -> Result<StatusConfig, String> {
        // The same URL rules as `register`: http or https, a host, no query.
        let apis = crate::client::api_urls(&args.client.api)?;
        let urls: Vec<&str> = apis.iter().map(String::as_str).collect();
        let tls = crate::client::tls_for(&args.client.tls.files(), &urls)?;
        let token = crate::config::read_token(args.client.token, args.client.token_file.as_ref())
            .map_err(|e| e.to_string())?;
        let role = match &args.role {
            Some(r) => Some(
                crate::registry::Label::parse(r)
                    .map_err(|e| format!("--role {r:?} {e}"))?
                    .to_string(),
            ),
            None => None,
        };
        Ok(StatusConfig {
            apis,
            token,
            tls,
            role,
            json: args.json,
            watch: args.watch,
        })
    }
}

pub async fn run(args: StatusArgs) -> Result<u8, (u8, String)> {
    let StatusConfig {
        apis,
        token,
        tls,
        role,
        json,
        watch,
    } = StatusConfig::from_args(args).map_err(|e| (2, e))?;
    let first = apis[0].clone();
    // Several servers: the first that answers.
    let mut api = first;
    if apis.len() > 1 {
        let probe = crate::client::http(
            Duration::from_secs(2),
            Some(Duration::from_secs(2)),
            tls.as_ref(),
        )
        .build()
        .map_err(|e| (1, e.to_string()))?;
        for a in &apis {
            if probe
                .get(format!("{a}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                api = a.clone();
                break;
            }
        }
    }
    // Like `register`: rollcall is reached directly, never through an HTTP proxy.
    let client = crate::client::http(Duration::from_secs(5), None, tls.as_ref())
        .build()
        .map_err(|e| (1, e.to_string()))?;
    let get = |url: String| {
        let mut req = client.get(url);
        if let Some(t) = &token {
            req = req.bearer_auth(t);
        }
        req
    };
    let unreachable = |e: FetchError| (1, e.explain(&api));
    let mut index = 0u64;
    loop {
        // Which roles, at which index (blocking after the first round with --watch).
        let wait = if watch && index > 0 {
            format!("?index={index}&wait=60s")
        } else {
            String::new()
        };
        let (new_index, roles): (u64, Vec<String>) = match &role {
            Some(r) => {
                let out: RoleOut = fetch(get(format!("{api}/v1/roles/{r}{wait}")))
                    .await
                    .map_err(unreachable)?;
                (out.index, vec![r.clone()])
            }
            None => {
                let out: RolesOut = fetch(get(format!("{api}/v1/roles{wait}")))
                    .await
                    .map_err(unreachable)?;
                (out.index, out.roles.into_keys().collect())
            }
        };
        if watch && new_index == index {
            continue; // the wait ended without a change
        }
        index = new_index;
        let mut nodes: Vec<NodeOut> = Vec::new();
        for r in &roles {
            let out: RoleOut = fetch(get(format!("{api}/v1/roles/{r}")))
                .await
                .map_err(unreachable)?;
            nodes.extend(out.nodes);
        }
        let mut text = String::new();
        if json {
            let doc = serde_json::json!({ "index": index, "nodes": nodes });
            text = serde_json::to_string(&doc).expect("serializes") + "\n";
        } else {
            if watch {
                // Clear the screen between redraws on a terminal only: a pipe or a file
                // gets the tables one after another, without escape codes.
                if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                    text.push_str("\x1b[2J\x1b[H");
                }
            }
            text.push_str(&table(index, &nodes));
        }
        // A closed stdout (`rollcall status --watch | head`) ends the command quietly.
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        if out
            .write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            return Ok(0);
        }
        if !watch {
            return Ok(0);
        }
    }
}

/// Why a request to the API failed: not reached, or answered with an error.
enum FetchError {
    Unreachable(String),
    /// Reached, but TLS failed: the sentence says what to do.
    Tls(String),
    Answered(reqwest::StatusCode, String),
}

impl FetchError {
    /// One sentence: the cause, and what to do.
    fn explain(&self, api: &str) -> String {
        match self {
            FetchError::Unreachable(why) => format!(
                "cannot reach rollcall at {api}: {why} (is `rollcall serve` running? see --api)"
            ),
            FetchError::Tls(why) => format!("cannot talk to rollcall at {api}: {why}"),
            FetchError::Answered(status, msg) if status.as_u16() == 401 => format!(
                "rollcall at {api} answered {status}: {msg} (give the server's token with --token or --token-file)"
            ),
            FetchError::Answered(status, msg) => {
                format!("rollcall at {api} answered {status}: {msg}")
            }
        }
    }
}

async fn fetch<T: serde::de::DeserializeOwned>(
    req: reqwest::RequestBuilder,
) -> Result<T, FetchError> {
    let resp =
        req.timeout(Duration::from_secs(90)).send().await.map_err(
            |e| match crate::tls::explain(&e) {
                Some(sentence) => FetchError::Tls(sentence),
                None => FetchError::Unreachable(crate::client::chain(&e)),
            },
        )?;
    let status = resp.status();
    if !status.is_success() {
        let msg = crate::client::error_message(&resp.text().await.unwrap_or_default());
        return Err(FetchError::Answered(status, msg));
    }
    resp.json()
        .await
        .map_err(|e| FetchError::Unreachable(format!("an answer that is not rollcall's: {e}")))
}

/// `1h02m`, `3m05s`, `4.2s`.
fn human(secs: f64) -> String {
    let s = secs.max(0.0);
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

/// `1 node`, `0 nodes`, `2 roles`.
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// The table `rollcall status` prints.
pub fn table(index: u64, nodes: &[NodeOut]) -> String {
    let header = [
        "ROLE",
        "NODE",
        "ADDRESS",
        "PORT",
        "SERVICE",
        "AGE",
        "EXPIRES IN",
        "LEASE",
    ];
    let rows: Vec<[String; 8]> = nodes
        .iter()
        .map(|n| {
            [
                n.role.clone(),
                n.node.clone(),
                n.addr.clone(),
                n.port.map_or("-".into(), |p| p.to_string()),
                n.service.clone(),
                human(n.age),
                human(n.expires_in),
                if n.session {
                    "session".into()
                } else {
                    format!("renewals (ttl {}s)", n.ttl)
                },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        l.push('\n');
        l
    };
    out.push_str(&line(&header));
    for r in &rows {
        out.push_str(&line(&r.iter().map(String::as_str).collect::<Vec<_>>()));
    }
    let roles: std::collections::BTreeSet<&str> = nodes.iter().map(|n| n.role.as_str()).collect();
    out.push_str(&format!(
        "{} in {}, index {index}\n",
        count(nodes.len(), "node"),
        count(roles.len(), "role")
    ));
    out
}

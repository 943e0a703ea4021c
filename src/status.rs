//! `rollcall status`: roles and nodes of a running server, like `serf members` but with the
//! leases: address, port, age, time to expiry and how the lease is held (session or renewals).
//! `--watch` redraws on every change, using the blocking query.

use std::time::Duration;

use crate::api::model::{NodeOut, RoleOut, RolesOut};
use crate::cli::StatusArgs;

pub async fn run(args: StatusArgs) -> Result<u8, (u8, String)> {
    let apis: Vec<String> = args
        .api
        .iter()
        .map(|a| a.trim().trim_end_matches('/').to_owned())
        .filter(|a| !a.is_empty())
        .collect();
    if let Some(api) = apis
        .iter()
        .find(|a| !a.starts_with("http://") && !a.starts_with("https://"))
    {
        return Err((
            2,
            format!("--api {api:?} is not an http:// URL (e.g. http://127.0.0.1:8053)"),
        ));
    }
    let Some(first) = apis.first().cloned() else {
        return Err((2, "--api is empty: give e.g. http://127.0.0.1:8053".into()));
    };
    // Several servers: the first that answers.
    let mut api = first;
    if apis.len() > 1 {
        let probe = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
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
    let role = match &args.role {
        Some(r) => Some(
            crate::registry::Label::parse(r)
                .map_err(|e| (2, format!("--role {r:?} {e}")))?
                .to_string(),
        ),
        None => None,
    };
    let client = reqwest::Client::builder()
        .build()
        .map_err(|e| (1, e.to_string()))?;
    let get = |url: String| {
        let mut req = client.get(url);
        if let Some(t) = &args.token {
            req = req.bearer_auth(t);
        }
        req
    };
    let unreachable = |e: reqwest::Error| {
        (
            1,
            format!("cannot reach rollcall at {api}: {e} (is `rollcall serve` running? see --api)"),
        )
    };
    let mut index = 0u64;
    loop {
        // Which roles, at which index (blocking after the first round with --watch).
        let wait = if args.watch && index > 0 {
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
        if args.watch && new_index == index {
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
        if args.json {
            let doc = serde_json::json!({ "index": index, "nodes": nodes });
            text = serde_json::to_string(&doc).expect("serializes") + "\n";
        } else {
            if args.watch {
                text.push_str("\x1b[2J\x1b[H"); // clear the screen
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
        if !args.watch {
            return Ok(0);
        }
    }
}

async fn fetch<T: serde::de::DeserializeOwned>(
    req: reqwest::RequestBuilder,
) -> Result<T, reqwest::Error> {
    req.timeout(Duration::from_secs(90))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await
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
        "{} nodes in {} roles, index {index}\n",
        nodes.len(),
        roles.len()
    ));
    out
}

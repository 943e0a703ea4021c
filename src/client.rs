//! What the three client subcommands (`register`, `hipache-sync`, `status`) share to talk to
//! the API: one rule for `--api` URLs (http:// or https://), one HTTP client set-up (never
//! through a proxy: rollcall is reached directly; one rustls config for https, see `tls.rs`),
//! one way to connect a WebSocket, one way to read an error answer, one error chain (TLS
//! failures told as sentences).

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

/// One `--api` URL, validated (http or https, a host, no query or fragment), returned without
/// a trailing `/`.
pub fn api_url(api: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(api)
        .map_err(|e| format!("--api {api:?} is not a URL ({e}): use e.g. http://127.0.0.1:8053"))?;
    match url.scheme() {
        "http" | "https" => {}
        other => {
            return Err(format!(
                "--api {api:?} has the scheme {other:?}: use http://HOST:PORT or https://HOST:PORT"
            ))
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!(
            "--api {api:?} has no host: use e.g. http://127.0.0.1:8053"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "--api {api:?}: give the base URL only, without ?query or #fragment"
        ));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// The TLS config of a client command: built when a URL is https:// or a TLS flag is given,
/// else None (and nothing is read).
pub fn tls_for(
    files: &crate::tls::ClientFiles,
    urls: &[&str],
) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    let needed = urls.iter().any(|u| u.starts_with("https://"));
    crate::tls::client_config(files, needed)
}

/// Every `--api` value (comma-separated or repeated), validated; at least one.
pub fn api_urls(values: &[String]) -> Result<Vec<String>, String> {
    let urls = values
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(api_url)
        .collect::<Result<Vec<_>, _>>()?;
    if urls.is_empty() {
        return Err(
            "--api is empty: give the URL of a rollcall server, e.g. http://127.0.0.1:8053".into(),
        );
    }
    Ok(urls)
}

/// The HTTP client of a client subcommand: no proxy, a connect timeout, `timeout` per
/// request when given, and the command's TLS config for https:// URLs.
pub fn http(
    connect: Duration,
    timeout: Option<Duration>,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> reqwest::ClientBuilder {
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(connect);
    if let Some(tls) = tls {
        b = b.use_preconfigured_tls((**tls).clone());
    }
    match timeout {
        Some(t) => b.timeout(t),
        None => b,
    }
}

/// A connection to an API server for a WebSocket: plain TCP, or TLS over it.
pub type Stream = tokio_util::either::Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// Connects to the host and port of a `ws://` or `wss://` URL (TLS with `tls` for wss; no
/// Nagle: sessions send small pings). Errors are sentences (TLS ones say what to do).
pub async fn connect(
    url: &reqwest::Url,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Stream, String> {
    let host = url
        .host_str()
        .ok_or_else(|| format!("{url} has no host"))?
        .trim_matches(['[', ']'])
        .to_owned();
    let port = url
        .port_or_known_default()
        .ok_or_else(|| format!("{url} has no port"))?;
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    if !matches!(url.scheme(), "wss" | "https") {
        return Ok(tokio_util::either::Either::Left(tcp));
    }
    let config = tls.ok_or_else(|| format!("{url}: no TLS set-up for an https:// server"))?;
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| format!("{host} is not a name TLS can check ({e})"))?;
    tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map(tokio_util::either::Either::Right)
        .map_err(|e| chain(&e))
}

/// The sentence of an API error answer (`{"error": "..."}`), or the body as it is.
pub fn error_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| body.to_owned())
        .trim()
        .to_owned()
}

/// An error and its sources on one line (reqwest's outermost message alone says little). A
/// TLS failure anywhere in the chain is told as a sentence that says what to do, first.
pub fn chain(e: &(dyn StdError + 'static)) -> String {
    if let Some(r) = crate::tls::find_rustls_error(e) {
        return crate::tls::sentence(r);
    }
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let next = c.to_string();
        if !s.contains(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_urls_are_http_or_https_base_urls() {
        assert_eq!(
            api_url("http://10.0.0.1:8053/").unwrap(),
            "http://10.0.0.1:8053"
        );
        assert_eq!(
            api_url("https://rc.example:8443/").unwrap(),
            "https://rc.example:8443"
        );
        assert!(api_url("ftp://x").unwrap_err().contains("scheme"));
        assert!(api_url("http://x/?a=1").unwrap_err().contains("base URL"));
        assert!(api_url("nonsense").unwrap_err().contains("not a URL"));
        let two = api_urls(&["http://a:1".into(), " http://b:2 ".into(), "".into()]).unwrap();
        assert_eq!(two, ["http://a:1", "http://b:2"]);
        assert!(api_urls(&[]).is_err());
        assert_eq!(
            error_message(r#"{"error":" no such node "}"#),
            "no such node"
        );
        assert_eq!(error_message("plain text"), "plain text");
    }
}

/// Exponential backoff with jitter, shared by the client subcommands: each wait is drawn from
/// [step/2, step] (so that many clients do not retry in step), and the step doubles from
/// `start` up to the cap given at each call.
#[derive(Debug)]
pub struct Backoff {
    start: Duration,
    step: Duration,
}

impl Backoff {
    pub fn new(start: Duration) -> Backoff {
        Backoff { start, step: start }
    }

    /// Back to the first step (after a success).
    pub fn reset(&mut self) {
        self.step = self.start;
    }

    /// The next wait, at most `cap`.
    pub fn next(&mut self, cap: Duration) -> Duration {
        let step = self.step.min(cap);
        self.step = (self.step * 2).min(cap);
        let us = step.as_micros().max(2) as u64;
        Duration::from_micros(rand::random_range(us / 2..=us))
    }
}

#[cfg(test)]
mod backoff_tests {
    use super::Backoff;
    use std::time::Duration;

    #[test]
    fn grows_with_jitter_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100));
        let cap = Duration::from_secs(1);
        let waits: Vec<_> = (0..8).map(|_| b.next(cap)).collect();
        assert!(waits[0] >= Duration::from_millis(50) && waits[0] <= Duration::from_millis(100));
        assert!(waits.windows(2).take(3).all(|w| w[1] >= w[0] / 2));
        assert!(waits.iter().all(|w| *w <= cap));
        assert!(waits[7] >= cap / 2);
        b.reset();
        assert!(b.next(cap) <= Duration::from_millis(100));
        // A smaller cap later applies at once.
        let mut b = Backoff::new(Duration::from_secs(1));
        assert!(b.next(Duration::from_millis(10)) <= Duration::from_millis(10));
    }
}

//! TLS for the HTTP API, both ends, with rustls on the ring provider (no OpenSSL, nothing but
//! a C compiler at build time).
//!
//! - The server's side: [`ServerFiles`] (`--tls-cert`, `--tls-key`, `--tls-client-ca`) build a
//!   `rustls::ServerConfig`; `server.rs` keeps it in an `ArcSwap` that SIGHUP replaces (a bad
//!   new set of files keeps the old config), and `api/serve.rs` uses whatever is current for
//!   each new handshake. With a client CA, a client certificate is asked for but not required:
//!   the handshake succeeds without one and the API refuses writes from such connections.
//! - The clients' side: [`client_config`] (`--ca-file`, `--client-cert`, `--client-key`) builds
//!   the one `rustls::ClientConfig` that reqwest and the agent's WebSocket both use, and
//!   [`explain`] turns a rustls error found anywhere in an error chain into a sentence that says
//!   what to do.
//!
//! Only PEM files are read. Keys: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).

use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The protocol the API speaks inside TLS (ALPN): HTTP/1.1 only, as in plain text.
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// ring, not aws-lc-rs: it builds with only a C compiler (aws-lc-sys wants cmake and takes
/// minutes on 2 cores). rustls 0.23.48 deprecates it for lacking post-quantum key exchange;
/// the classic groups (X25519, P-256, P-384) are what every client here offers anyway.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate of a PEM file (a chain, or a CA bundle); an error names the flag.
pub fn load_certs(flag: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let text = std::fs::read(path).map_err(|e| format!("--{flag} {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "--{flag} {}: not a PEM certificate file ({e})",
                path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "--{flag} {}: no certificate in it (expected PEM: -----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The private key of a PEM file; an error names the flag.
pub fn load_key(flag: &str, path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let text = std::fs::read(path).map_err(|e| format!("--{flag} {}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|e| {
        format!(
            "--{flag} {}: no private key in it ({e}; expected PEM: -----BEGIN PRIVATE KEY-----, \
             RSA PRIVATE KEY or EC PRIVATE KEY)",
            path.display()
        )
    })
}

/// A root store of every certificate in a PEM file.
fn roots_from(flag: &str, path: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(flag, path)? {
        roots.add(cert).map_err(|e| {
            format!(
                "--{flag} {}: not a usable CA certificate ({e})",
                path.display()
            )
        })?;
    }
    Ok(roots)
}

// ---------------------------------------------------------------------------------------------
// The server's side.

/// `rollcall serve`'s TLS files, as given; read again on every SIGHUP.
#[derive(Clone, Debug)]
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Clients must present a certificate signed by one of these for writes.
    pub client_ca: Option<PathBuf>,
}

impl ServerFiles {
    /// Reads the files and builds the server config; an error says which file and why.
    pub fn load(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        let certs = load_certs("tls-cert", &self.cert)?;
        let key = load_key("tls-key", &self.key)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up: {e}"))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let roots = roots_from("tls-client-ca", ca)?;
                // Asked for, not required: reads stay open to browsers and Prometheus; the
                // API refuses writes on connections without a verified certificate.
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            format!(
                "--tls-cert {} and --tls-key {} do not make a usable pair: {e} (is the key the \
                 certificate's own?)",
                self.cert.display(),
                self.key.display()
            )
        })?;
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        Ok(Arc::new(config))
    }
}

// ---------------------------------------------------------------------------------------------
// The clients' side.

/// The client's TLS flags, as given (`ApiArgs` and `rollcall check`).
#[derive(Clone, Debug, Default)]
pub struct ClientFiles {
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl ClientFiles {
    /// Whether any TLS flag is given.
    pub fn any(&self) -> bool {
        self.ca_file.is_some() || self.client_cert.is_some() || self.client_key.is_some()
    }
}

/// The one rustls config of a client command: the servers it trusts (`--ca-file`, else the
/// system's CAs) and the certificate it shows (`--client-cert`/`--client-key`). None when no
/// URL needs TLS and no TLS flag is given (nothing to read then).
pub fn client_config(
    files: &ClientFiles,
    needed: bool,
) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    if !needed && !files.any() {
        return Ok(None);
    }
    build_client(
        ["ca-file", "client-cert", "client-key"],
        files.ca_file.as_deref(),
        files.client_cert.as_deref(),
        files.client_key.as_deref(),
    )
    .map(Some)
}

/// The rustls config rollcall serve speaks to https:// etcd endpoints with: `--etcd-cacert`
/// (else the system's CAs), `--etcd-cert` and `--etcd-key` for etcd's `--client-cert-auth`.
pub fn etcd_client_config(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    build_client(["etcd-cacert", "etcd-cert", "etcd-key"], ca, cert, key)
}

type CertAndKey = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// The client certificate and key flags read as a pair; `flags` names them in errors.
fn pair_of(
    [cert_flag, key_flag]: [&str; 2],
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Option<CertAndKey>, String> {
    match (cert, key) {
        (Some(c), Some(k)) => Ok(Some((load_certs(cert_flag, c)?, load_key(key_flag, k)?))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(format!(
            "--{cert_flag} is given without --{key_flag}: give both"
        )),
        (None, Some(_)) => Err(format!(
            "--{key_flag} is given without --{cert_flag}: give both"
        )),
    }
}

/// A client config (the API's clients and etcd's alike): trust `ca` (else the system's CAs),
/// show `cert`/`key` when given. `flags` are the flag names errors speak of.
fn build_client(
    [ca_flag, cert_flag, key_flag]: [&str; 3],
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let pair = pair_of([cert_flag, key_flag], cert, key)?;
    let roots = match ca {
        Some(ca) => roots_from(ca_flag, ca)?,
        None => {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::warn!(
                    "no CA certificates found on this system: https:// servers can only be \
                     trusted with --{ca_flag}"
                );
            }
            roots
        }
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .with_root_certificates(roots);
    let mut config = match pair {
        Some((certs, key)) => builder.with_client_auth_cert(certs, key).map_err(|e| {
            format!(
                "--{cert_flag} and --{key_flag} do not make a usable pair: {e} (is the key \
                 the certificate's own?)"
            )
        })?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

/// [`sentence`] for rollcall serve's link to etcd: the etcd flags instead of the API's.
pub fn etcd_sentence(e: &rustls::Error) -> String {
    sentence(e)
        .replace("--ca-file", "--etcd-cacert")
        .replace(
            "--client-cert and --client-key",
            "--etcd-cert and --etcd-key",
        )
        .replace("the server's --tls-client-ca", "etcd's --trusted-ca-file")
        .replace(
            "use http:// for a plain-HTTP server, or start it with --tls-cert and --tls-key",
            "use http:// in --etcd for an etcd without TLS (its --listen-client-urls say which)",
        )
        .replace(
            "renew it on the server (rollcall serve reads --tls-cert again on SIGHUP)",
            "renew it on etcd",
        )
        .replace("the server", "etcd")
        .replace("this client", "rollcall")
}

/// The rustls error somewhere in an error chain (reqwest, hyper, io and tungstenite wrap it;
/// `io::Error::source` skips its payload, so each io error is opened by hand).
pub fn find_rustls_error<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(r) = find_rustls_error(inner) {
                    return Some(r);
                }
            }
        }
        cur = err.source();
    }
    None
}

/// What a TLS failure means for the user of a client command, and what to do about it.
pub fn sentence(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match e {
        E::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature | C::InvalidPurpose => format!(
                "the server's certificate is not signed by a CA this client trusts ({c:?}): give \
                 --ca-file with the CA that signed it (without --ca-file, only the system's CAs \
                 are trusted)"
            ),
            C::NotValidForName | C::NotValidForNameContext { .. } => format!(
                "the server's certificate is not valid for the host in the URL ({}): use a name \
                 or address the certificate lists, or reissue it with this one",
                short(c)
            ),
            C::Expired | C::ExpiredContext { .. } => format!(
                "the server's certificate has expired ({}): renew it on the server (rollcall \
                 serve reads --tls-cert again on SIGHUP)",
                short(c)
            ),
            C::NotValidYet | C::NotValidYetContext { .. } => format!(
                "the server's certificate is not valid yet ({}): check the clocks, or the \
                 certificate's dates",
                short(c)
            ),
            C::Revoked => "the server's certificate is revoked: renew it on the server".into(),
            other => format!("the server's certificate was refused: {other:?}"),
        },
        E::AlertReceived(alert) => match alert {
            A::CertificateRequired
            | A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::UnsupportedCertificate
            | A::AccessDenied
            | A::DecryptError => format!(
                "the server refused this client's certificate (TLS alert {alert:?}): give \
                 --client-cert and --client-key with a certificate signed by the server's \
                 --tls-client-ca, valid today"
            ),
            _ => format!("the server ended the TLS handshake (TLS alert {alert:?})"),
        },
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => format!(
            "the server does not speak TLS there ({e}): use http:// for a plain-HTTP server, or \
             start it with --tls-cert and --tls-key"
        ),
        other => format!("TLS failed: {other}"),
    }
}

/// The certificate error without its (long) list of valid names or its timestamps.
fn short(c: &rustls::CertificateError) -> String {
    let s = format!("{c:?}");
    s.split([' ', '{']).next().unwrap_or(&s).to_owned()
}

/// A sentence for a TLS failure anywhere in `e`'s chain; None when it is not about TLS.
pub fn explain(e: &(dyn StdError + 'static)) -> Option<String> {
    find_rustls_error(e).map(sentence)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_say_what_to_do() {
        use rustls::CertificateError as C;
        let s = sentence(&rustls::Error::InvalidCertificate(C::UnknownIssuer));
        assert!(s.contains("--ca-file"), "{s}");
        let s = sentence(&rustls::Error::InvalidCertificate(C::Expired));
        assert!(s.contains("has expired"), "{s}");
        let s = sentence(&rustls::Error::InvalidCertificate(C::NotValidForName));
        assert!(s.contains("not valid for the host"), "{s}");
        let s = sentence(&rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateRequired,
        ));
        assert!(s.contains("--client-cert"), "{s}");
        // Wrapped the way reqwest and tokio-rustls wrap it: io::Error around rustls::Error.
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(C::UnknownIssuer),
        );
        let outer: Box<dyn StdError + Send + Sync> = Box::new(io);
        assert!(explain(&*outer).is_some_and(|s| s.contains("--ca-file")));
        assert!(explain(&std::io::Error::other("plain")).is_none());
    }

    #[test]
    fn etcd_sentences_name_the_etcd_flags() {
        use rustls::CertificateError as C;
        let s = etcd_sentence(&rustls::Error::InvalidCertificate(C::UnknownIssuer));
        assert!(
            s.contains("--etcd-cacert") && !s.contains("--ca-file"),
            "{s}"
        );
        let s = etcd_sentence(&rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateRequired,
        ));
        assert!(s.contains("--etcd-cert and --etcd-key"), "{s}");
        assert!(s.contains("etcd's --trusted-ca-file"), "{s}");
        assert!(etcd_client_config(None, Some(Path::new("/x")), None)
            .unwrap_err()
            .contains("without --etcd-key"));
    }

    #[test]
    fn client_flags_come_in_pairs() {
        let files = ClientFiles {
            client_cert: Some("/x".into()),
            ..ClientFiles::default()
        };
        assert!(client_config(&files, true)
            .unwrap_err()
            .contains("without --client-key"));
        assert!(client_config(&ClientFiles::default(), false)
            .unwrap()
            .is_none());
        let missing = ClientFiles {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..ClientFiles::default()
        };
        assert!(client_config(&missing, true)
            .unwrap_err()
            .starts_with("--ca-file /nonexistent/ca.pem"));
    }
}

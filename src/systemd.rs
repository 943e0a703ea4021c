//! systemd's readiness protocol (`sd_notify`), without libsystemd: when `NOTIFY_SOCKET` is set
//! (a unit with `Type=notify`), `rollcall serve` sends `READY=1` once every socket is bound and
//! the registrations are loaded, `RELOADING=1` and `READY=1` around a SIGHUP reload of the zone
//! files, and `STOPPING=1` when it begins to stop. Nothing happens without `NOTIFY_SOCKET`.

use std::os::unix::net::UnixDatagram;

/// Sends one notification (`READY=1`, `STATUS=...`); errors are logged once and dropped: the
/// service works the same whether or not systemd hears it.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = (|| {
        let sock = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // An abstract socket (systemd's usual choice).
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), &path)?;
        }
        Ok::<(), std::io::Error>(())
    })();
    if let Err(e) = result {
        tracing::warn!(socket = ?path, "cannot notify systemd ({state}): {e}");
    }
}

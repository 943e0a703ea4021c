//! `rollcall serve`: binds the sockets, starts the registry, the DNS transports and the API,
//! and stops them in order. Tests start the same thing in-process with [`start`] on port 0.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::config::ServeConfig;
use crate::dns::{self, zones::ZoneError, Builder, ZoneSettings};
use crate::journal::{Journal, JournalError, Loaded, LogJournal, MemoryJournal};
use crate::registry::Registry;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("address {addr} ({what}) is in use: another server? pick another --{flag}")]
    InUse {
        addr: SocketAddr,
        what: &'static str,
        flag: &'static str,
    },
    #[error("cannot listen on {addr} ({what}): {source}: pick another --{flag}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        flag: &'static str,
        source: io::Error,
    },
    #[error("zone file {0}: fix it, or move it out of --zones")]
    Zone(#[from] ZoneError),
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// A running server.
pub struct Running {
    /// The first of `dns_addrs`.
    pub dns_addr: SocketAddr,
    /// Every DNS address bound, in --dns-listen order (port 0 resolved).
    pub dns_addrs: Vec<SocketAddr>,
    pub http_addr: SocketAddr,
    dns_stats: Arc<crate::dns::stats::DnsStats>,
    pub registry: Registry,
    builder: Arc<Mutex<Builder>>,
    config: ServeConfig,
    reserved: Arc<arc_swap::ArcSwap<std::collections::BTreeSet<String>>>,
    /// The API's TLS config (None: plain HTTP); SIGHUP swaps it.
    tls: Option<api::serve::TlsConfig>,
    /// The API's tokens; SIGHUP swaps them when they come from --token-file.
    tokens: Arc<arc_swap::ArcSwap<api::tokens::Tokens>>,
    shutdown: CancellationToken,
    registry_task: tokio::task::JoinHandle<()>,
    http_task: tokio::task::JoinHandle<()>,
    /// DNS over TCP runs on a runtime of its own: a flood of API requests cannot starve it.
    tcp_thread: std::thread::JoinHandle<()>,
    udp_threads: Vec<std::thread::JoinHandle<()>>,
    /// Dropping a `Running` without `stop` stops it too (its threads would outlive it).
    _stop_on_drop: tokio_util::sync::DropGuard,
}

fn bind_error(
    e: io::Error,
    addr: SocketAddr,
    what: &'static str,
    flag: &'static str,
) -> StartError {
    if e.kind() == io::ErrorKind::AddrInUse {
        StartError::InUse { addr, what, flag }
    } else {
        StartError::Bind {
            addr,
            what,
            flag,
            source: e,
        }
    }
}

/// Binds DNS over UDP and TCP on the same port (with port 0, a free one for both).
fn bind_dns(
    addr: SocketAddr,
    threads: usize,
) -> Result<(Vec<std::net::UdpSocket>, std::net::TcpListener), StartError> {
    let mut attempts = 0;
    loop {
        let udp = dns::udp::bind(addr, threads)
            .map_err(|e| bind_error(e, addr, "DNS over UDP", "dns-listen"))?;
        let port = udp[0]
            .local_addr()
            .map_err(|e| bind_error(e, addr, "DNS over UDP", "dns-listen"))?
            .port();
        let tcp_addr = SocketAddr::new(addr.ip(), port);
        let tcp = socket2::Socket::new(
            socket2::Domain::for_address(tcp_addr),
            socket2::Type::STREAM,
            None,
        )
        .and_then(|s| {
            s.set_reuse_address(true)?;
            if tcp_addr.is_ipv6() {
                s.set_only_v6(true)?;
            }
            s.bind(&tcp_addr.into())?;
            s.listen(1024)?;
            s.set_nonblocking(true)?;
            Ok(std::net::TcpListener::from(s))
        });
        match tcp {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() == 0 && attempts < 10 => {
                attempts += 1;
                tracing::debug!(error = %e, "tcp port taken, trying another");
            }
            Err(e) => return Err(bind_error(e, tcp_addr, "DNS over TCP", "dns-listen")),
        }
    }
}

/// Starts everything; returns once every socket is bound and the first snapshot is published.
pub async fn start(config: ServeConfig) -> Result<Running, StartError> {
    let shutdown = CancellationToken::new();
    if let Some(n) = crate::net::raise_fd_limit() {
        tracing::debug!(limit = n, "open files limit");
    }
    let dns_stats = Arc::new(crate::dns::stats::DnsStats::default());
    let load_started = std::time::Instant::now();
    let statics = dns::zones::load_dir(&config.zones_dir)?;
    dns_stats.zone_load(true, load_started.elapsed());
    if statics.is_empty() {
        let dir = std::path::absolute(&config.zones_dir).unwrap_or(config.zones_dir.clone());
        if dir.is_dir() {
            tracing::info!(zones = %dir.display(), "no zone files (*.zone) in the zones dir: serving registered roles only");
        } else {
            tracing::info!(zones = %dir.display(), "the zones dir does not exist: serving registered roles only (give --zones DIR for static records)");
        }
    }
    for z in &statics {
        tracing::info!(zone = %z.origin, file = %std::path::absolute(&z.path).unwrap_or_else(|_| z.path.clone()).display(), records = z.record_count, "loaded zone file");
    }
    let mut udp = Vec::new();
    let mut tcps = Vec::new();
    let mut dns_addrs = Vec::new();
    for &addr in &config.dns_listen {
        let (u, t) = bind_dns(addr, config.dns_threads)?;
        dns_addrs.push(
            t.local_addr()
                .map_err(|e| bind_error(e, addr, "DNS over TCP", "dns-listen"))?,
        );
        udp.extend(u);
        tcps.push(t);
    }
    let dns_addr = dns_addrs[0];
    let http = TcpListener::bind(config.http_listen)
        .await
        .map_err(|e| bind_error(e, config.http_listen, "HTTP API", "http-listen"))?;
    let http_addr = http
        .local_addr()
        .map_err(|e| bind_error(e, config.http_listen, "HTTP API", "http-listen"))?;

    let (journal, loaded): (Box<dyn Journal>, Loaded) = match &config.data_dir {
        Some(dir) => {
            let (journal, loaded) = LogJournal::open(dir)?;
            for d in &loaded.dropped {
                tracing::warn!(data_dir = %dir.display(), "dropped a damaged record: {d}");
            }
            if let Some(kept) = &journal.kept_damaged {
                tracing::warn!(copy = %kept.display(), "the data dir's log was damaged: the original is kept beside the rewritten log");
            }
            if let Some(why) = &journal.compaction_deferred {
                tracing::warn!(data_dir = %dir.display(), "could not compact the log at start ({why}); appending to it instead: free some space");
            }
            let shown = std::path::absolute(dir).unwrap_or(dir.clone());
            tracing::info!(data_dir = %shown.display(), nodes = loaded.nodes.len(), "opened the data dir");
            (Box::new(journal), loaded)
        }
        None => {
            tracing::info!(
                "no data dir (--data-dir ''): registrations live only as long as the process"
            );
            (Box::new(MemoryJournal), Loaded::default())
        }
    };

    let ns_addr = Some(dns_addr.ip()).filter(|ip: &IpAddr| !ip.is_unspecified());
    let settings = ZoneSettings {
        zone: config.zone.clone(),
        record_ttl: config.record_ttl,
        negative_ttl: config.negative_ttl,
        ns_name: config.ns_name.clone(),
        ns_addr,
    };
    let builder = Arc::new(Mutex::new(Builder::new(settings, statics)));
    let cell = builder.lock().unwrap().cell();
    let reserved = Arc::new(arc_swap::ArcSwap::from_pointee(reserved_roles(
        &config,
        &builder
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .statics_names(),
    )));
    let (registry, registry_task) = match &config.etcd {
        Some(etcd) => {
            tracing::info!(endpoints = %etcd.endpoints.join(","), prefix = %etcd.prefix, "etcd mode: registrations live in etcd, shared with every server on it");
            Registry::start_etcd(
                etcd.clone(),
                config.etcd_access.clone(),
                api::registration_check(Arc::new(config.access.clone()), reserved.clone()),
                journal,
                loaded,
                Box::new(builder.clone()),
                config.limits.clone(),
                shutdown.clone(),
            )
        }
        None => Registry::start_at(
            journal,
            loaded,
            Box::new(builder.clone()),
            config.limits.clone(),
            shutdown.clone(),
            crate::clock::unix_ms(),
        ),
    };

    let _ = dns_stats.snapshot.set(cell.clone());
    let rate_limit = Arc::new(dns::rrl::RateLimit::new(config.rate_limit.clone()));
    let forward = config.forward.clone().map(|f| {
        for r in &f.rules {
            let ups: Vec<String> = r.upstreams.iter().map(|u| u.to_string()).collect();
            if ups.is_empty() {
                tracing::info!(domain = %r.domain, "never forwarded");
            } else {
                tracing::info!(domain = %r.domain, upstreams = %ups.join(","), "forwarding");
            }
        }
        tracing::info!(allow_recursion = %f.allow, "names outside our zones are forwarded for these clients only");
        let f = Arc::new(dns::forward::start(
            f,
            &dns_addrs,
            rate_limit.clone(),
            dns_stats.udp_thread(),
            shutdown.clone(),
        ));
        let _ = dns_stats.forward.set(f.stats.clone());
        f
    });
    if config.rate_limit.limit > 0 {
        tracing::info!(exempt = %config.rate_limit.exempt, limit = config.rate_limit.limit, "UDP responses rate limited per /24 (/56), except for these sources");
    }
    let policy = Arc::new(dns::policy::Policy {
        allow_query: config.allow_query.clone(),
        rate_limit,
        forward,
    });
    let udp_threads = dns::udp::spawn(
        udp,
        cell.clone(),
        policy.clone(),
        dns_stats.clone(),
        shutdown.clone(),
    );
    let tcp_thread = {
        let (cell, policy, dns_stats, shutdown) =
            (cell, policy, dns_stats.clone(), shutdown.clone());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| bind_error(e, dns_addr, "DNS over TCP", "dns-listen"))?;
        let listeners = {
            let _guard = runtime.enter();
            tcps.into_iter()
                .zip(&dns_addrs)
                .map(|(t, a)| {
                    TcpListener::from_std(t)
                        .map_err(|e| bind_error(e, *a, "DNS over TCP", "dns-listen"))
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        // One thread and runtime for DNS over TCP, whatever the number of addresses.
        std::thread::Builder::new()
            .name("dns-tcp".into())
            .spawn(move || {
                runtime.block_on(futures_util::future::join_all(listeners.into_iter().map(
                    |tcp| {
                        dns::tcp::serve(
                            tcp,
                            cell.clone(),
                            policy.clone(),
                            dns_stats.clone(),
                            shutdown.clone(),
                        )
                    },
                )));
            })
            .expect("spawning a thread")
    };

    let state = AppState::new(registry.clone(), config.access.clone(), shutdown.clone())
        .with_reserved_roles(reserved.clone())
        .with_dns_stats(dns_stats.clone())
        .with_max_wait(config.max_wait)
        .with_max_waiters_per_client(config.max_waits_per_client);
    let tls = config
        .tls
        .as_ref()
        .map(|t| Arc::new(arc_swap::ArcSwap::new(t.initial.clone())));
    let tokens = state.access.tokens.clone();
    let api_metrics = state.api_metrics.clone();
    let http_task = tokio::spawn(api::serve::serve(
        http,
        api::router(state),
        shutdown.clone(),
        tls.clone(),
        api_metrics,
    ));

    for a in &dns_addrs {
        tracing::info!(udp = %a, tcp = %a, threads = config.dns_threads, zone = %config.zone, "listening for DNS");
    }
    match &config.tls {
        Some(t) => tracing::info!(
            http = %http_addr,
            cert = %t.files.cert.display(),
            client_ca = %t.files.client_ca.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            "listening for HTTP (HTTPS only: plain-HTTP requests get 400)"
        ),
        None => tracing::info!(http = %http_addr, "listening for HTTP"),
    }
    if let Some(path) = &config.token_file {
        let t = tokens.load();
        tracing::info!(token_file = %path.display(), tokens = t.len(), scoped = t.scoped(), "API tokens from the token file");
    }
    let stop_on_drop = shutdown.clone().drop_guard();
    Ok(Running {
        dns_addr,
        dns_addrs,
        http_addr,
        dns_stats,
        registry,
        builder,
        config,
        reserved,
        tls,
        tokens,
        shutdown,
        registry_task,
        http_task,
        tcp_thread,
        udp_threads,
        _stop_on_drop: stop_on_drop,
    })
}

/// The labels directly below the dynamic zone's apex that static names use (the zone files'
/// names in it, and the name server's own name): a role of that name would hide them.
fn reserved_roles(
    config: &ServeConfig,
    statics: &[Box<[u8]>],
) -> std::collections::BTreeSet<String> {
    let zone = dns::encode::wire_name(&config.zone);
    let mut out = std::collections::BTreeSet::new();
    let ns = dns::encode::wire_name(&config.ns_name);
    for name in statics.iter().map(|n| &**n).chain(std::iter::once(&*ns)) {
        if name.len() <= zone.len() || !name.ends_with(&zone) {
            continue;
        }
        // The last label before the zone's: walk the labels of the part above the apex.
        let above = &name[..name.len() - zone.len()];
        let (mut at, mut last) = (0, None);
        while at < above.len() {
            let len = usize::from(above[at]);
            last = above.get(at + 1..at + 1 + len);
            at += 1 + len;
        }
        if let Some(l) = last.and_then(|l| std::str::from_utf8(l).ok()) {
            out.insert(l.to_owned());
        }
    }
    out
}

impl StartError {
    /// The process exit code: 2 for what the configuration says (a zone file), 1 for what
    /// the machine refuses (an address in use, the data dir locked or failing).
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Zone(_) => 2,
            StartError::InUse { .. } | StartError::Bind { .. } | StartError::Journal(_) => 1,
        }
    }
}

impl Running {
    /// Re-reads the zone files. On error the old zones stay served.
    pub fn reload_zones(&self) -> Result<usize, ZoneError> {
        let started = std::time::Instant::now();
        let statics = dns::zones::load_dir(&self.config.zones_dir)
            .inspect_err(|_| self.dns_stats.zone_load(false, started.elapsed()))?;
        self.dns_stats.zone_load(true, started.elapsed());
        let n = statics.len();
        let mut b = self.builder.lock().unwrap_or_else(|p| p.into_inner());
        b.set_statics(statics);
        let reserved = reserved_roles(&self.config, &b.statics_names());
        drop(b);
        if let Ok(view) = self.registry.view() {
            for role in view
                .roles
                .iter()
                .filter(|(_, r)| !r.nodes.is_empty())
                .map(|(n, _)| n)
            {
                if reserved.contains(role.as_str()) {
                    tracing::warn!(%role, "a registered role has the name of a static name of the zone files: its nodes hide it until they leave; new registrations under it are refused");
                }
            }
        }
        self.reserved.store(Arc::new(reserved));
        Ok(n)
    }

    /// Reads --tls-cert, --tls-key and --tls-client-ca again; new handshakes use them, open
    /// connections keep theirs. On error the old config stays. None without TLS.
    pub fn reload_tls(&self) -> Option<Result<(), String>> {
        let (tls, files) = (self.tls.as_ref()?, &self.config.tls.as_ref()?.files);
        Some(files.load().map(|c| tls.store(c)))
    }

    /// Reads --token-file again (the number of tokens); on error the old tokens stay. None
    /// without a token file.
    pub fn reload_tokens(&self) -> Option<Result<usize, String>> {
        let path = self.config.token_file.as_ref()?;
        Some(api::tokens::Tokens::load(path).map(|t| {
            let n = t.len();
            self.tokens.store(Arc::new(t));
            n
        }))
    }

    /// Everything SIGHUP reloads: zone files, the TLS files, the token file. Each part that
    /// fails keeps what it had and is logged; returns whether all succeeded.
    pub fn reload(&self) -> bool {
        let mut ok = true;
        match self.reload_zones() {
            Ok(n) => tracing::info!(zones = n, "reloaded zone files"),
            Err(e) => {
                ok = false;
                tracing::error!("zone reload failed, still serving the previous zones: {e}");
            }
        }
        match self.reload_tls() {
            None => {}
            Some(Ok(())) => {
                tracing::info!("reloaded the TLS certificate and key: new connections use them")
            }
            Some(Err(e)) => {
                ok = false;
                tracing::error!("TLS reload failed, still serving the previous certificate: {e}");
            }
        }
        match self.reload_tokens() {
            None => {}
            Some(Ok(n)) => tracing::info!(tokens = n, "reloaded the token file"),
            Some(Err(e)) => {
                ok = false;
                tracing::error!("token file reload failed, the previous tokens stay: {e}");
            }
        }
        ok
    }

    /// A token that stops the server when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops everything and waits (at most a few seconds) for it to finish.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let wait = async {
            let _ = self.http_task.await;
            let _ = self.registry_task.await;
        };
        if tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .is_err()
        {
            tracing::warn!("shutdown took longer than 5 s; exiting anyway");
        }
        let mut threads = self.udp_threads;
        threads.push(self.tcp_thread);
        let _ =
            tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| drop(t.join())))
                .await;
    }
}

/// Runs until `shutdown` fires, reloading zone files on SIGHUP.
pub async fn serve(config: ServeConfig, shutdown: CancellationToken) -> Result<(), StartError> {
    let running = start(config).await?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .expect("installing a SIGHUP handler");
    crate::systemd::notify("READY=1\nSTATUS=serving");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = hup.recv() => {
                crate::systemd::notify("RELOADING=1");
                if running.reload() {
                    crate::systemd::notify("READY=1\nSTATUS=serving");
                } else {
                    crate::systemd::notify("READY=1\nSTATUS=serving the previous settings: part of the last reload failed (see the log)");
                }
            }
        }
    }
    crate::systemd::notify("STOPPING=1");
    running.stop().await;
    tracing::info!("stopped");
    Ok(())
}

//! Churn load for the DNS benchmark (`benches/dns-bench.sh --churn`): while dnsperf asks
//! rollcall for the dataset's names, this keeps its HTTP API busy the way a live cluster does.
//!
//! * renewals: `PUT` of already registered nodes with their unchanged data, round-robin over the
//!   instances of `--services` (the dataset's services.tsv, i.e. the very nodes dnsperf asks
//!   about), at `--renew-rate` per second;
//! * registrations: new nodes `c<seq>` in role `--role` (default `churn`, a role dnsperf does not
//!   ask about, so the benchmark's answers keep their size) with ttl `--register-ttl` (1 s), at
//!   `--register-rate` per second. They are never renewed, so they expire: in steady state as
//!   many expiries per second as registrations.
//!
//! Requests go over keep-alive HTTP/1.1 connections (at most `--connections` in flight; a request
//! that would exceed that is skipped and counted as `behind`). Expiries are measured from the
//! server's side: once a second `GET /v1/roles` gives the live count of the churn role, and
//! expired = registered - live.
//!
//! Runs for `--duration` seconds, or until SIGINT/SIGTERM, then prints one line of `key=value`
//! (achieved rates, errors, latency percentiles) on stdout.
//!
//! Usage: churn --api http://127.0.0.1:8053 [--services services.tsv] [--renew-rate 5000]
//!              [--register-rate 100] [--register-ttl 1] [--duration 0]

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::sync::Semaphore;
use tokio::time::MissedTickBehavior;

#[derive(Parser, Debug)]
#[command(about = "HTTP API churn (renewals, registrations, expiries) for the DNS benchmark")]
struct Args {
    /// Base URL of rollcall's HTTP API.
    #[arg(long, default_value = "http://127.0.0.1:8053")]
    api: String,
    /// Nodes to renew: `role<TAB>fqdn<TAB>ipv4<TAB>port` lines (the dataset's services.tsv).
    /// Without it, `--renew-nodes` nodes of role `renew` are registered first and renewed.
    #[arg(long)]
    services: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 1000)]
    renew_nodes: usize,
    /// Lease (s) sent with renewals; the dataset's nodes are registered with 86400.
    #[arg(long, default_value_t = 86400)]
    renew_ttl: u32,
    /// Weight sent with renewals (benches/candidate.sh registers with 10).
    #[arg(long, default_value_t = 10)]
    renew_weight: u32,
    #[arg(long, default_value_t = 5000.0)]
    renew_rate: f64,
    #[arg(long, default_value_t = 100.0)]
    register_rate: f64,
    #[arg(long, default_value_t = 1)]
    register_ttl: u32,
    /// Role of the registered (and expiring) nodes.
    #[arg(long, default_value = "churn")]
    role: String,
    /// Most requests in flight (= keep-alive connections).
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Seconds to run; 0: until SIGINT/SIGTERM.
    #[arg(long, default_value_t = 0.0)]
    duration: f64,
}

#[derive(Default)]
struct Stats {
    renew_ok: AtomicU64,
    register_ok: AtomicU64,
    errors: AtomicU64,
    behind: AtomicU64,
    renew_us: Mutex<Vec<u32>>,
    register_us: Mutex<Vec<u32>>,
}

struct Target {
    url: String,
    body: String,
}

fn load_targets(args: &Args) -> anyhow::Result<Vec<Target>> {
    let body = |addr: &str, port: &str| {
        format!(
            r#"{{"addr":"{addr}","port":{port},"weight":{},"ttl":{}}}"#,
            args.renew_weight, args.renew_ttl
        )
    };
    let mut out = Vec::new();
    if let Some(path) = &args.services {
        for line in std::fs::read_to_string(path)?.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let f: Vec<&str> = line.split('\t').collect();
            anyhow::ensure!(f.len() >= 4, "{}: bad line {line:?}", path.display());
            let node = f[1].split('.').next().unwrap_or_default();
            out.push(Target {
                url: format!("{}/v1/roles/{}/nodes/{node}", args.api, f[0]),
                body: body(f[2], f[3]),
            });
        }
    } else {
        for i in 0..args.renew_nodes {
            out.push(Target {
                url: format!("{}/v1/roles/renew/nodes/r{i}", args.api),
                body: body(&format!("10.199.{}.{}", i / 250, 1 + i % 250), "8080"),
            });
        }
    }
    anyhow::ensure!(!out.is_empty(), "no nodes to renew");
    Ok(out)
}

async fn put(client: &reqwest::Client, url: &str, body: String) -> Result<Duration, String> {
    let t0 = Instant::now();
    let resp = client
        .put(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let _ = resp.bytes().await;
    if status.is_success() {
        Ok(t0.elapsed())
    } else {
        Err(format!("{url}: HTTP {status}"))
    }
}

/// Live nodes of `role` according to `GET /v1/roles`.
async fn live_count(client: &reqwest::Client, api: &str, role: &str) -> Option<u64> {
    let v: serde_json::Value = client
        .get(format!("{api}/v1/roles"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some(v["roles"][role].as_u64().unwrap_or(0))
}

fn percentile(v: &mut [u32], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    f64::from(v[i]) / 1000.0
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let api = args.api.trim_end_matches('/').to_string();
    let targets = Arc::new(load_targets(&args)?);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(10))
        .build()?;
    if args.services.is_none() {
        for t in targets.iter() {
            put(&client, &t.url, t.body.clone())
                .await
                .map_err(anyhow::Error::msg)?;
        }
    }
    let stats = Arc::new(Stats::default());
    let permits = Arc::new(Semaphore::new(args.connections));
    use tokio::signal::unix::{signal, SignalKind};
    let (mut sigterm, mut sigint) = (
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
    );
    let deadline =
        (args.duration > 0.0).then(|| Instant::now() + Duration::from_secs_f64(args.duration));

    let start = Instant::now();
    let (mut renew_sent, mut register_sent) = (0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut sample = tokio::time::interval(Duration::from_secs(1));
    sample.set_missed_tick_behavior(MissedTickBehavior::Skip);
    // (seconds since start, registrations acknowledged, live churn nodes)
    let samples: Arc<Mutex<Vec<(f64, u64, u64)>>> = Arc::default();
    let mut first_error: Option<String> = None;
    let (err_tx, mut err_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    // a backlog of more than 100 ms is dropped, not sent as a burst
    let max_backlog = |rate: f64| (rate * 0.1).max(1.0) as u64;

    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = sample.tick() => {
                // in a task of its own, so that the dispatcher never waits for it
                let (client, api, role) = (client.clone(), api.clone(), args.role.clone());
                let (stats, samples) = (stats.clone(), samples.clone());
                tokio::spawn(async move {
                    let registered = stats.register_ok.load(Relaxed);
                    if let Some(live) = live_count(&client, &api, &role).await {
                        samples.lock().unwrap().push((start.elapsed().as_secs_f64(), registered, live));
                    }
                });
                continue;
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
        while let Ok(e) = err_rx.try_recv() {
            first_error.get_or_insert(e);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let t = start.elapsed().as_secs_f64();
        // registrations first: they are few, and the expiries depend on them
        for (kind, rate, sent) in [
            (1, args.register_rate, &mut register_sent),
            (0, args.renew_rate, &mut renew_sent),
        ] {
            let due = (rate * t) as u64;
            if due.saturating_sub(*sent) > max_backlog(rate) {
                stats
                    .behind
                    .fetch_add(due - *sent - max_backlog(rate), Relaxed);
                *sent = due - max_backlog(rate);
            }
            while *sent < due {
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    break; // all connections busy: try again next tick
                };
                let seq = *sent;
                *sent += 1;
                let (url, body) = if kind == 0 {
                    let tg = &targets[(seq % targets.len() as u64) as usize];
                    (tg.url.clone(), tg.body.clone())
                } else {
                    (
                        format!("{api}/v1/roles/{}/nodes/c{seq}", args.role),
                        format!(
                            r#"{{"addr":"10.{}.{}.{}","port":8080,"ttl":{}}}"#,
                            200 + (seq >> 16) % 50,
                            (seq >> 8) & 255,
                            seq & 255,
                            args.register_ttl
                        ),
                    )
                };
                let (client, stats, err_tx) = (client.clone(), stats.clone(), err_tx.clone());
                tokio::spawn(async move {
                    match put(&client, &url, body).await {
                        Ok(d) => {
                            let us = d.as_micros().min(u32::MAX as u128) as u32;
                            if kind == 0 {
                                stats.renew_ok.fetch_add(1, Relaxed);
                                stats.renew_us.lock().unwrap().push(us);
                            } else {
                                stats.register_ok.fetch_add(1, Relaxed);
                                stats.register_us.lock().unwrap().push(us);
                            }
                        }
                        Err(e) => {
                            stats.errors.fetch_add(1, Relaxed);
                            let _ = err_tx.send(e);
                        }
                    }
                    drop(permit);
                });
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    // let the requests in flight finish (a few ms; at most 2 s)
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        permits.acquire_many(args.connections as u32),
    )
    .await;
    while let Ok(e) = err_rx.try_recv() {
        first_error.get_or_insert(e);
    }

    let samples = std::mem::take(&mut *samples.lock().unwrap());
    let expiry_rate = match (samples.iter().find(|s| s.0 >= 1.5), samples.last()) {
        (Some(a), Some(b)) if b.0 > a.0 => {
            let expired = |s: &(f64, u64, u64)| s.1.saturating_sub(s.2) as f64;
            (expired(b) - expired(a)) / (b.0 - a.0)
        }
        _ => f64::NAN,
    };
    let live_max = samples.iter().map(|s| s.2).max().unwrap_or(0);
    let mut renew_us = std::mem::take(&mut *stats.renew_us.lock().unwrap());
    let mut register_us = std::mem::take(&mut *stats.register_us.lock().unwrap());
    println!(
        "elapsed_s={elapsed:.2} renewals_per_s={:.0} registrations_per_s={:.0} expiries_per_s={:.0} \
         errors={} behind={} renew_p50_ms={:.3} renew_p99_ms={:.3} register_p99_ms={:.3} \
         live_churn_max={live_max} renew_targets={}",
        stats.renew_ok.load(Relaxed) as f64 / elapsed,
        stats.register_ok.load(Relaxed) as f64 / elapsed,
        expiry_rate,
        stats.errors.load(Relaxed),
        stats.behind.load(Relaxed),
        percentile(&mut renew_us, 0.5),
        percentile(&mut renew_us, 0.99),
        percentile(&mut register_us, 0.99),
        targets.len(),
    );
    if let Some(e) = first_error {
        eprintln!("churn: first error: {e}");
    }
    Ok(())
}

//! The writer: makes redis hold the wanted lists, one MULTI/EXEC per change, and repairs them.

use super::*;

/// Makes redis hold the wanted lists.
pub(crate) struct Writer {
    pub(crate) cfg: SyncConfig,
    pub(crate) client: redis::Client,
    pub(crate) conn: Option<MultiplexedConnection>,
    pub(crate) link: Link,
    /// The list last written (to tell a change of the role from a list changed behind us).
    pub(crate) last_written: Option<Vec<String>>,
}

/// Why a write happens, for the log.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Reason {
    /// Start, or reconnection to redis or rollcall: everything is rewritten.
    Full,
    /// The role changed.
    Change,
    /// The list in redis differs although the role did not change (redis lost it, or someone
    /// edited it).
    Repair,
}

impl Writer {
    pub(crate) async fn run(
        mut self,
        mut rx: watch::Receiver<Option<Wanted>>,
        cancel: CancellationToken,
    ) {
        let mut backoff = crate::client::Backoff::new(BACKOFF_MIN);
        // Rewrite everything on the next successful write.
        let mut full = true;
        let mut written_epoch = 0u64;
        loop {
            let wanted = rx.borrow_and_update().clone();
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.sync(wanted.as_ref(), full || wanted.as_ref().is_some_and(|w| w.epoch != written_epoch)) => r,
            };
            match result {
                Ok(new_conn) => {
                    backoff.reset();
                    if let Some(w) = &wanted {
                        written_epoch = w.epoch;
                        full = false;
                    } else if new_conn {
                        // Nothing known yet: the first list will be written in full anyway.
                        full = true;
                    }
                }
                Err(e) => {
                    self.conn = None;
                    self.link.down(&self.cfg.redis_shown, &e);
                    full = true;
                    if !pause(backoff.next(BACKOFF_MAX), &cancel).await {
                        return;
                    }
                    continue;
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(REDIS_CHECK) => {}
            }
        }
    }

    /// Connects when needed, then makes every list equal `wanted` (all of them when `full`).
    /// Returns whether a new connection was made.
    pub(crate) async fn sync(
        &mut self,
        wanted: Option<&Wanted>,
        full: bool,
    ) -> Result<bool, String> {
        let mut new_conn = false;
        if self.conn.is_none() {
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(CONNECT_TIMEOUT)
                .set_response_timeout(REDIS_TIMEOUT);
            let mut conn = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(|e| e.to_string())?;
            let _: String = redis::cmd("PING")
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            self.conn = Some(conn);
            new_conn = true;
            self.link.up(&self.cfg.redis_shown);
        }
        let Some(wanted) = wanted else {
            if !new_conn {
                let conn = self.conn.as_mut().expect("connected above");
                let _: String = redis::cmd("PING")
                    .query_async(conn)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            return Ok(new_conn);
        };
        let full = full || new_conn;
        self.write(&wanted.list, full)
            .await
            .map_err(|e| e.to_string())?;
        Ok(new_conn)
    }

    /// Writes `list` to every frontend whose list differs (every frontend when `full`), in one
    /// transaction.
    pub(crate) async fn write(&mut self, list: &[String], full: bool) -> redis::RedisResult<()> {
        let cfg = &self.cfg;
        let conn = self.conn.as_mut().expect("connected before write");
        let stale: Vec<&String> = if full {
            cfg.frontends.iter().collect()
        } else {
            let mut p = redis::pipe();
            for host in &cfg.frontends {
                p.lrange(cfg.list_key(host), 0, -1);
            }
            match p.query_async::<Vec<Vec<String>>>(conn).await {
                Ok(current) => cfg
                    .frontends
                    .iter()
                    .zip(current)
                    .filter(|(_, cur)| cur.as_slice() != list)
                    .map(|(h, _)| h)
                    .collect(),
                // Not a list (WRONGTYPE) or the like: rewrite everything, which fixes it.
                Err(e) if !(e.is_io_error() || e.is_timeout() || e.is_connection_dropped()) => {
                    cfg.frontends.iter().collect()
                }
                Err(e) => return Err(e),
            }
        };
        if stale.is_empty() {
            return Ok(());
        }
        // Dead marks of hosts that reach a wildcard frontend are keyed by the requested host.
        let mut extra_dead = Vec::new();
        for host in &stale {
            if host.starts_with('*') {
                extra_dead.extend(wildcard_dead_keys(conn, &cfg.prefix, host).await?);
            }
        }
        let mut tx = redis::pipe();
        tx.atomic();
        for host in &stale {
            let key = cfg.list_key(host);
            tx.del(&key).ignore();
            tx.rpush(&key, list).ignore();
            tx.del(cfg.dead_key(host)).ignore();
        }
        if !extra_dead.is_empty() {
            tx.del(&extra_dead).ignore();
        }
        let started = Instant::now();
        tx.query_async::<()>(conn).await?;
        let reason = if full {
            Reason::Full
        } else if self.last_written.as_deref() == Some(list) {
            Reason::Repair
        } else {
            Reason::Change
        };
        let keys: Vec<String> = stale.iter().map(|h| cfg.list_key(h)).collect();
        let keys = keys.join(" ");
        let backends = list.len() - 1;
        let noun = if backends == 1 { "backend" } else { "backends" };
        // Rounded to 10 µs: `ms=0.47` in the log, not `ms=0.47237100000000004`.
        let ms = (started.elapsed().as_secs_f64() * 100_000.0).round() / 100.0;
        match reason {
            Reason::Full => tracing::info!(
                keys,
                backends,
                ms,
                "wrote the full state: {backends} {noun}"
            ),
            Reason::Change => {
                tracing::info!(keys, backends, ms, "role changed: {backends} {noun}")
            }
            Reason::Repair => tracing::warn!(
                keys,
                backends,
                ms,
                "the list in redis differed from the role (redis restarted or flushed, or \
                 someone edited it): restored {backends} {noun}"
            ),
        }
        tracing::debug!(list = ?list, "written");
        self.last_written = Some(list.to_vec());
        Ok(())
    }
}

/// Escapes redis glob characters.
pub(crate) fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Frontend keys hipache would try before reaching the wildcard `ours` (`*` or `*.domain`)
/// for the requested `host`: the exact name and every more specific wildcard.
pub(crate) fn more_specific(host: &str, ours: &str) -> Vec<String> {
    let suffix = &ours[1..]; // "" for "*", ".domain" for "*.domain"
    let mut v = vec![host.to_owned()];
    let mut rest = host;
    while let Some(i) = rest.find('.') {
        let parent = &rest[i..];
        if parent.len() <= suffix.len() {
            break;
        }
        v.push(format!("*{parent}"));
        rest = &rest[i + 1..];
    }
    v
}

/// `dead:<host>` keys of requested hosts that reach the wildcard frontend `ours` (no exact
/// or more specific frontend of their own).
pub(crate) async fn wildcard_dead_keys(
    conn: &mut MultiplexedConnection,
    prefix: &str,
    ours: &str,
) -> redis::RedisResult<Vec<String>> {
    let dead_prefix = format!("{prefix}dead:");
    let pattern = format!("{}*{}", glob_escape(&dead_prefix), glob_escape(&ours[1..]));
    let mut found = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        found.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    found.retain(|k| k != &format!("{dead_prefix}{ours}"));
    if found.is_empty() {
        return Ok(found);
    }
    let mut p = redis::pipe();
    for key in &found {
        let host = &key[dead_prefix.len()..];
        let keys: Vec<String> = more_specific(host, ours)
            .iter()
            .map(|h| format!("{prefix}frontend:{h}"))
            .collect();
        p.exists(keys);
    }
    let owned: Vec<u64> = p.query_async(conn).await?;
    Ok(found
        .into_iter()
        .zip(owned)
        .filter(|(_, n)| *n == 0)
        .map(|(k, _)| k)
        .collect())
}

//! The follower: reads the role from the rollcall API with blocking queries and publishes the
//! list hipache should see.

use super::*;

/// Follows the role on the rollcall API and publishes the wanted list.
pub(crate) struct Follower {
    pub(crate) cfg: SyncConfig,
    pub(crate) http: reqwest::Client,
    pub(crate) tx: watch::Sender<Option<Wanted>>,
    /// The `--api` server followed now (index into `cfg.role_urls`).
    pub(crate) at: std::sync::atomic::AtomicUsize,
}

impl Follower {
    pub(crate) async fn run(self, cancel: CancellationToken) {
        let mut link = Link::new("rollcall");
        let mut backoff = crate::client::Backoff::new(BACKOFF_MIN);
        let mut epoch = 0u64;
        // None: the next read is a plain one (start, or after an error).
        let mut index: Option<u64> = None;
        loop {
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.fetch(index) => r,
            };
            match result {
                Ok(role) => {
                    // A plain read follows a (re)connection; an index that went backwards
                    // means rollcall restarted between two queries.
                    let reconnected =
                        link.up(&self.cfg.api) || index.is_none_or(|i| role.index < i);
                    if reconnected {
                        epoch += 1;
                    }
                    index = Some(role.index);
                    backoff.reset();
                    let list = self.cfg.hipache_list(&role.nodes);
                    self.tx.send_if_modified(|cur| {
                        let changed = reconnected || cur.as_ref().is_none_or(|w| w.list != list);
                        if changed {
                            tracing::debug!(
                                index = role.index,
                                nodes = role.nodes.len(),
                                "role read"
                            );
                            *cur = Some(Wanted { list, epoch });
                        }
                        changed
                    });
                }
                Err(e) => {
                    link.down(&self.cfg.api, &e);
                    index = None;
                    let n = self.cfg.role_urls.len();
                    if n > 1 {
                        // Sticky: move on only when the server in use fails.
                        use std::sync::atomic::Ordering::Relaxed;
                        let at = (self.at.load(Relaxed) + 1) % n;
                        self.at.store(at, Relaxed);
                        tracing::warn!(to = %self.cfg.role_urls[at], "following the role on the next rollcall server");
                        if at != 0 {
                            continue; // back off only after a whole pass failed
                        }
                    }
                    if !pause(backoff.next(BACKOFF_MAX), &cancel).await {
                        return;
                    }
                }
            }
        }
    }

    /// Reads the role; with an index, waits (blocking query) until it changes past it.
    pub(crate) async fn fetch(&self, index: Option<u64>) -> Result<RoleOut, String> {
        let at = self.at.load(std::sync::atomic::Ordering::Relaxed);
        let mut url = self.cfg.role_urls[at % self.cfg.role_urls.len()].clone();
        let timeout = match index {
            Some(i) => {
                let wait = self.cfg.wait();
                url.query_pairs_mut()
                    .append_pair("index", &i.to_string())
                    .append_pair("wait", &format!("{}ms", wait.as_millis()));
                wait + HTTP_GRACE
            }
            None => HTTP_GRACE,
        };
        let mut req = self.http.get(url).timeout(timeout);
        if let Some(t) = &self.cfg.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| chain(&e))?;
        let status = resp.status();
        if !status.is_success() {
            let msg = crate::client::error_message(&resp.text().await.unwrap_or_default());
            return Err(format!("the API answered {status}: {msg}"));
        }
        resp.json::<RoleOut>()
            .await
            .map_err(|e| format!("the API's answer is not a role: {}", chain(&e)))
    }
}

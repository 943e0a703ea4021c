//! The keeper: registers the node, holds its session (or renews by PUT), backs off while the
//! server is away, and deregisters when stopped.

use super::*;

// ---------------------------------------------------------------------------------------------
// The keeper: keeps the node registered until stopped, then deregisters it.

/// What the agent is doing; each change is logged once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    Starting,
    WaitingForCheck,
    CheckFailing,
    /// Server unreachable or failing: retrying with backoff.
    Retrying,
    /// The server refused the registration (4xx): retrying slowly.
    Rejected,
    /// Registered, holding a session.
    Session,
    /// Registered, renewing by PUT.
    Renewing,
}

pub(crate) enum PutError {
    Retry(String),
    Rejected(String),
}

pub(crate) enum SessionError {
    /// The node is not registered (its lease ran out between PUT and session): PUT again.
    NotFound,
    /// The server cannot be reached: back off.
    Unreachable(String),
    /// The server (or something in between) does not do sessions: renew by PUT.
    Unsupported(String),
}

pub(crate) enum HoldEnd {
    /// Asked to stop; the session is still open.
    Stopped(Ws),
    /// The check fails; the session is still open.
    CheckFailed(Ws),
    /// The session ended; the socket, when the server may still consider it live.
    Ended(String, Option<Ws>),
}

/// How a pause ended.
pub(crate) enum Wake {
    Stop,
    Check,
    Elapsed,
}

pub(crate) struct Keeper {
    plan: Arc<Plan>,
    http: reqwest::Client,
    state: State,
    /// A PUT may have landed: deregister on the way out.
    registered: bool,
    /// A session given up on while the server may still hold it: closed only after the next
    /// session is open, so that its late close cannot remove the node in between.
    stale: Option<Ws>,
    /// The server in use (an index into `plan.apis`).
    at: usize,
}

impl Keeper {
    pub(crate) fn new(plan: Arc<Plan>, http: reqwest::Client) -> Keeper {
        Keeper {
            plan,
            http,
            state: State::Starting,
            registered: false,
            stale: None,
            at: 0,
        }
    }

    pub(crate) fn api(&self) -> &str {
        &self.plan.apis[self.at]
    }

    /// Moves to the next server (with several), saying why.
    pub(crate) fn move_on(&mut self, why: &str) {
        if !self.plan.failover() {
            return;
        }
        let from = self.at;
        self.at = (self.at + 1) % self.plan.apis.len();
        tracing::warn!(from = %self.plan.apis[from], to = %self.api(), "moving to the next rollcall server ({why})");
    }

    pub(crate) fn auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.plan.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Logs a change of state (and nothing when the state stays the same).
    pub(crate) fn enter(&mut self, next: State, detail: &str) {
        let prev = self.state;
        if prev == next {
            return;
        }
        self.state = next;
        let p = &self.plan;
        let beat = fmt_dur(p.beat());
        let again = matches!(prev, State::Retrying | State::Rejected);
        match next {
            State::Starting => {}
            // A gate without --check: `rollcall docker`'s (the container's state and health).
            State::WaitingForCheck if p.check.is_none() => tracing::info!(
                role = %p.role, node = %p.node,
                "waiting for the container's health check to pass before registering"
            ),
            State::CheckFailing if p.check.is_none() => tracing::info!(
                role = %p.role, node = %p.node,
                "not registered while {detail}"
            ),
            State::WaitingForCheck => tracing::info!(
                check = %p.check.as_ref().map(|c| c.to_string()).unwrap_or_default(),
                "waiting for the check to pass before registering"
            ),
            State::CheckFailing => tracing::warn!(
                check = %p.check.as_ref().map(|c| c.to_string()).unwrap_or_default(),
                "check fails ({detail}): not registered until it passes again"
            ),
            State::Retrying => tracing::warn!(
                api = %p.apis[self.at],
                "cannot register ({detail}); retrying with backoff"
            ),
            State::Rejected => tracing::error!(
                api = %p.apis[self.at],
                "the server refused the registration ({detail}); retrying every {}s at most \
                 — fix the flags or the server's settings",
                REJECTED_CAP.as_secs()
            ),
            State::Session => tracing::info!(
                role = %p.role, node = %p.node, addr = detail, ttl = p.ttl, api = %p.apis[self.at],
                "{}registered; holding a session (ping every {beat})",
                if again { "server is back: " } else { "" }
            ),
            State::Renewing if !p.sessions => tracing::info!(
                role = %p.role, node = %p.node, addr = detail, ttl = p.ttl, api = %p.apis[self.at],
                "{}registered; renewing by PUT every {beat}",
                if again { "server is back: " } else { "" }
            ),
            State::Renewing => tracing::warn!(
                role = %p.role, node = %p.node,
                "registered, but no session ({detail}): renewing by PUT every {beat}, \
                 trying the session again every {}s",
                SESSION_RETRY.as_secs()
            ),
        }
    }

    /// PUTs to the current server, then to each other one while they fail (a pass).
    pub(crate) async fn put(&mut self) -> Result<String, PutError> {
        let mut result = self.put_once().await;
        for _ in 1..self.plan.apis.len() {
            match &result {
                Err(PutError::Retry(why)) => {
                    let why = why.clone();
                    self.move_on(&why);
                    result = self.put_once().await;
                }
                _ => break,
            }
        }
        result
    }

    pub(crate) async fn put_once(&mut self) -> Result<String, PutError> {
        // Until the answer is in, the PUT may have landed (even if this future is dropped).
        let before = self.registered;
        self.registered = true;
        let req = self
            .auth(self.http.put(self.plan.node_url(self.api())))
            .timeout(self.plan.request_timeout())
            .json(&self.plan.body);
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                if e.is_connect() {
                    // Never reached the server: nothing changed there.
                    self.registered = before;
                }
                return Err(PutError::Retry(chain(&e)));
            }
        };
        let status = resp.status();
        if status.is_success() {
            let v: serde_json::Value = resp.json().await.unwrap_or_default();
            return Ok(v["addr"].as_str().unwrap_or("?").to_owned());
        }
        let msg = crate::client::error_message(&resp.text().await.unwrap_or_default());
        let detail = format!("HTTP {status}: {msg}");
        if status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429 {
            // A refused request changes nothing.
            self.registered = before;
            Err(PutError::Rejected(detail))
        } else {
            Err(PutError::Retry(detail))
        }
    }

    pub(crate) async fn deregister(&mut self) {
        // The current server first, then the others while they fail: one answer is enough.
        let mut last = String::new();
        for attempt in 0..self.plan.apis.len() {
            if attempt > 0 {
                self.move_on(&last);
            }
            let req = self
                .auth(self.http.delete(self.plan.node_url(self.api())))
                .timeout(DEREGISTER_TIMEOUT);
            match req.send().await {
                Ok(r) if r.status().is_success() || r.status().as_u16() == 404 => {
                    tracing::info!(role = %self.plan.role, node = %self.plan.node, "deregistered");
                    self.registered = false;
                    return;
                }
                Ok(r) if r.status().is_server_error() => last = format!("HTTP {}", r.status()),
                Ok(r) => {
                    tracing::warn!(
                        status = %r.status(),
                        "the server refused the deregistration: the node goes when its session \
                         closes or its lease runs out"
                    );
                    self.registered = false;
                    return;
                }
                Err(e) => last = chain(&e),
            }
        }
        tracing::warn!(
            "could not deregister ({last}): the node goes when its session closes or its lease \
             runs out"
        );
        self.registered = false;
    }

    pub(crate) async fn open_session(&self) -> Result<Ws, SessionError> {
        let mut req = self
            .plan
            .session_url(self.api())
            .into_client_request()
            .map_err(|e| SessionError::Unsupported(e.to_string()))?;
        if let Some(t) = &self.plan.token {
            let v = format!("Bearer {t}")
                .parse()
                .map_err(|_| SessionError::Unsupported("bad token".into()))?;
            req.headers_mut()
                .insert(tungstenite::http::header::AUTHORIZATION, v);
        }
        let url = reqwest::Url::parse(&req.uri().to_string())
            .map_err(|e| SessionError::Unsupported(e.to_string()))?;
        let tls = self.plan.tls.clone();
        let connect = async move {
            let stream = crate::client::connect(&url, tls.as_ref())
                .await
                .map_err(SessionError::Unreachable)?;
            Ok(tokio_tungstenite::client_async_with_config(req, stream, None).await)
        };
        let limit = self.plan.request_timeout();
        match tokio::time::timeout(limit, connect).await {
            Err(_) => Err(SessionError::Unreachable(format!(
                "no session handshake within {limit:?}"
            ))),
            Ok(Err(e)) => Err(e),
            Ok(Ok(r)) => match r {
                Ok((ws, _)) => Ok(ws),
                Err(tungstenite::Error::Http(resp)) if resp.status().as_u16() == 404 => {
                    Err(SessionError::NotFound)
                }
                Err(tungstenite::Error::Http(resp)) if resp.status().is_server_error() => {
                    Err(SessionError::Unreachable(format!(
                        "the session request got HTTP {}",
                        resp.status()
                    )))
                }
                Err(tungstenite::Error::Http(resp)) => Err(SessionError::Unsupported(format!(
                    "the session request got HTTP {}",
                    resp.status()
                ))),
                Err(
                    e @ (tungstenite::Error::Io(_)
                    | tungstenite::Error::ConnectionClosed
                    | tungstenite::Error::AlreadyClosed),
                ) => Err(SessionError::Unreachable(chain(&e))),
                Err(e) => Err(SessionError::Unsupported(chain(&e))),
            },
        }
    }

    /// Sleeps `d`, waking early when asked to stop or when the check changes.
    pub(crate) async fn pause(
        d: Duration,
        stop: &CancellationToken,
        check: &mut Option<watch::Receiver<CheckState>>,
    ) -> Wake {
        tokio::select! {
            _ = stop.cancelled() => Wake::Stop,
            _ = check_changed(check) => Wake::Check,
            _ = tokio::time::sleep(d) => Wake::Elapsed,
        }
    }

    /// Holds a session: pings every ttl/3, and gives up on a server silent for a whole ttl.
    pub(crate) async fn hold(
        &mut self,
        mut ws: Ws,
        stop: &CancellationToken,
        check: &mut Option<watch::Receiver<CheckState>>,
    ) -> HoldEnd {
        let beat = self.plan.beat().max(Duration::from_millis(100));
        let mut ticker = tokio::time::interval_at(Instant::now() + beat, beat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = Instant::now();
        // With several servers, a ping left unanswered until the next one is enough to move
        // on: the lease (renewed by each answered ping) then still has a third of its ttl.
        let mut pinged: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return HoldEnd::Stopped(ws),
                _ = check_changed(check) => {
                    if !check.as_mut().is_some_and(|rx| rx.borrow_and_update().passes()) {
                        return HoldEnd::CheckFailed(ws);
                    }
                }
                _ = ticker.tick() => {
                    if heard.elapsed() > self.plan.ttl()
                        || (self.plan.failover() && pinged.is_some_and(|p| heard < p))
                    {
                        return HoldEnd::Ended(
                            format!("no answer from the server for {:.1}s", heard.elapsed().as_secs_f64()),
                            Some(ws),
                        );
                    }
                    pinged = Some(Instant::now());
                    let ping = ws.send(Message::Ping(tungstenite::Bytes::new()));
                    match tokio::time::timeout(beat, ping).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return HoldEnd::Ended(chain(&e), None),
                        Err(_) => return HoldEnd::Ended("a ping could not be sent".into(), Some(ws)),
                    }
                }
                msg = ws.next() => match msg {
                    Some(Ok(Message::Close(frame))) => {
                        let why = frame
                            .map(|f| f.reason.to_string())
                            .filter(|r| !r.is_empty())
                            .unwrap_or_else(|| "the server closed the session".into());
                        return HoldEnd::Ended(why, None);
                    }
                    None => return HoldEnd::Ended("the connection closed".into(), None),
                    Some(Err(e)) => return HoldEnd::Ended(chain(&e), None),
                    Some(Ok(_)) => heard = Instant::now(),
                },
            }
        }
    }

    pub(crate) async fn close(ws: Ws) {
        let mut ws = ws;
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    }

    /// Keeps the node registered until `stop`, then deregisters it. Returns whether it was
    /// (or may have been) registered when stopped, i.e. whether resolvers may still hold it.
    pub(crate) async fn keep(
        mut self,
        stop: CancellationToken,
        mut check: Option<watch::Receiver<CheckState>>,
    ) -> bool {
        let mut backoff = crate::client::Backoff::new(BACKOFF_START);
        let cap = self.plan.backoff_cap();
        // In PUT-renewal mode: no session attempt before this.
        let mut session_after: Option<Instant> = None;
        'outer: loop {
            if stop.is_cancelled() {
                break;
            }
            // 1. The check gate.
            if let Some(rx) = check.as_mut() {
                let now = rx.borrow_and_update().clone();
                if !now.passes() {
                    if self.registered {
                        self.deregister().await;
                    }
                    if let Some(ws) = self.stale.take() {
                        Self::close(ws).await;
                    }
                    match now {
                        CheckState::Fail(why) => self.enter(State::CheckFailing, &why),
                        _ => self.enter(State::WaitingForCheck, ""),
                    }
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = check_changed(&mut check) => {}
                    }
                    continue;
                }
            }

            // 2. Register. Asked to stop meanwhile: a PUT in flight may finish (bounded), so
            // that whether it landed, not a guess, decides the deregistration and the drain.
            let limit = self.plan.request_timeout();
            let put = {
                let fut = self.put();
                tokio::pin!(fut);
                tokio::select! {
                    r = &mut fut => Some(r),
                    _ = stop.cancelled() => {
                        let _ = tokio::time::timeout(limit, &mut fut).await;
                        None
                    }
                }
            };
            let Some(put) = put else { break };
            let addr = match put {
                Ok(addr) => addr,
                Err(e) => {
                    let wait = match e {
                        PutError::Retry(why) => {
                            self.enter(State::Retrying, &why);
                            backoff.next(cap)
                        }
                        PutError::Rejected(why) => {
                            self.enter(State::Rejected, &why);
                            backoff.next(REJECTED_CAP)
                        }
                    };
                    if let Wake::Stop = Self::pause(wait, &stop, &mut check).await {
                        break;
                    }
                    continue;
                }
            };

            // 3. The session (PUT renewals only when the plan says so).
            if !self.plan.sessions {
                self.enter(State::Renewing, &addr);
            } else if session_after.is_none_or(|t| Instant::now() >= t) {
                let opened = tokio::select! {
                    _ = stop.cancelled() => break,
                    r = self.open_session() => r,
                };
                match opened {
                    Ok(ws) => {
                        session_after = None;
                        if let Some(old) = self.stale.take() {
                            drop(old);
                        }
                        self.enter(State::Session, &addr);
                        let since = Instant::now();
                        match self.hold(ws, &stop, &mut check).await {
                            HoldEnd::Stopped(ws) => {
                                self.deregister().await;
                                Self::close(ws).await;
                                return true;
                            }
                            HoldEnd::CheckFailed(ws) => {
                                self.deregister().await;
                                Self::close(ws).await;
                                continue;
                            }
                            HoldEnd::Ended(why, ws) => {
                                self.stale = ws;
                                self.move_on(&why);
                                // The next session is news worth a log line.
                                self.state = State::Starting;
                                tracing::info!("session ended ({why}); registering again");
                                // A session that keeps ending at once must not spin.
                                if since.elapsed() < self.plan.ttl() {
                                    let wait = backoff.next(cap);
                                    if let Wake::Stop = Self::pause(wait, &stop, &mut check).await {
                                        break;
                                    }
                                } else {
                                    backoff.reset();
                                }
                                continue;
                            }
                        }
                    }
                    Err(SessionError::NotFound) => {
                        let wait = backoff.next(cap);
                        if let Wake::Stop = Self::pause(wait, &stop, &mut check).await {
                            break;
                        }
                        continue;
                    }
                    Err(SessionError::Unreachable(why)) => {
                        self.move_on(&why);
                        self.enter(State::Retrying, &why);
                        let wait = backoff.next(cap);
                        if let Wake::Stop = Self::pause(wait, &stop, &mut check).await {
                            break;
                        }
                        continue;
                    }
                    Err(SessionError::Unsupported(why)) => {
                        session_after = Some(Instant::now() + SESSION_RETRY);
                        self.enter(State::Renewing, &why);
                    }
                }
            } else {
                self.enter(State::Renewing, "session unavailable");
            }

            // 4. No session: renew by PUT every ttl/3 until a session attempt is due again.
            backoff.reset();
            loop {
                match Self::pause(self.plan.beat(), &stop, &mut check).await {
                    Wake::Stop => break 'outer,
                    Wake::Check => continue 'outer,
                    Wake::Elapsed => {}
                }
                if self.plan.sessions && session_after.is_none_or(|t| Instant::now() >= t) {
                    continue 'outer;
                }
                let put = tokio::select! {
                    _ = stop.cancelled() => break 'outer,
                    r = self.put() => r,
                };
                if put.is_err() {
                    // Step 2 will tell what is wrong, and back off.
                    continue 'outer;
                }
            }
        }
        let was = self.registered;
        if was {
            self.deregister().await;
        }
        if let Some(ws) = self.stale.take() {
            Self::close(ws).await;
        }
        was
    }
}

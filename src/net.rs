//! Small helpers shared by the listeners: accept loops that back off instead of spinning and
//! flooding the log when descriptors run out, and the descriptor limit raised at start.

use std::time::{Duration, Instant};

/// Backoff for an accept loop: 10 ms after the first failure, doubling to 1 s; one log line
/// per burst of failures (with how many there were), not one per failure.
pub struct AcceptBackoff {
    what: &'static str,
    delay: Duration,
    failures: u64,
    logged: Option<Instant>,
}

impl AcceptBackoff {
    pub fn new(what: &'static str) -> AcceptBackoff {
        AcceptBackoff {
            what,
            delay: Duration::ZERO,
            failures: 0,
            logged: None,
        }
    }

    /// Called after a failed accept: logs (at most every 10 s) and sleeps.
    pub async fn failed(&mut self, e: &std::io::Error) {
        self.failures += 1;
        if self
            .logged
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            let hint = if e.raw_os_error() == Some(libc::EMFILE)
                || e.raw_os_error() == Some(libc::ENFILE)
            {
                ": out of file descriptors (raise `ulimit -n`, or LimitNOFILE= in the unit)"
            } else {
                ""
            };
            tracing::warn!(listener = self.what, error = %e, failures = self.failures, "accept failed{hint}; backing off");
            self.logged = Some(Instant::now());
        }
        self.delay = (self.delay * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
        tokio::time::sleep(self.delay).await;
    }

    /// Called after a successful accept.
    pub fn ok(&mut self) {
        if self.failures > 0 {
            tracing::info!(
                listener = self.what,
                failures = self.failures,
                "accepting again"
            );
            self.failures = 0;
            self.delay = Duration::ZERO;
            self.logged = None;
        }
    }
}

/// Raises the soft limit on open files to the hard limit; returns the new soft limit.
pub fn raise_fd_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    #[allow(clippy::unnecessary_cast)]
    Some(lim.rlim_cur as u64)
}

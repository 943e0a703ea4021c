//! The DNS policy for one client, the same over UDP and TCP: whether it may query at all
//! (`--allow-query`), whether it may have names forwarded (`--allow-recursion`, then RA is set
//! on every answer it gets, authoritative ones included), and what a name outside our zones
//! gets. Rate limiting (UDP only) is applied by the UDP transport and the forwarder to every
//! response they send.

use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::acl::Acl;
use super::forward::Forwarder;
use super::rrl::RateLimit;

pub struct Policy {
    pub allow_query: Acl,
    pub rate_limit: Arc<RateLimit>,
    pub forward: Option<Arc<Forwarder>>,
}

/// What one client may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Client {
    pub may_query: bool,
    pub may_recurse: bool,
}

/// What to do with a name outside our zones, for this client.
pub enum NotOurs<'a> {
    /// Forward it (the client may recurse).
    Forward(&'a Forwarder),
    /// REFUSED (already in the response buffer).
    Refuse,
}

impl Policy {
    /// The policy for a client at `ip` (None: an address family we do not know; it may query
    /// if everyone may, and never recurse).
    pub fn client(&self, ip: Option<IpAddr>) -> Client {
        let may_query = match ip {
            Some(ip) => self.allow_query.allows(ip),
            None => self.allow_query.is_everyone(),
        };
        let may_recurse =
            may_query && ip.is_some_and(|ip| self.forward.as_ref().is_some_and(|f| f.allowed(ip)));
        Client {
            may_query,
            may_recurse,
        }
    }

    /// A name outside our zones: forward it, or REFUSED (counted when forwarding is on and the
    /// client is outside `--allow-recursion`).
    pub fn not_ours(&self, client: Client) -> NotOurs<'_> {
        match &self.forward {
            Some(f) if client.may_recurse => NotOurs::Forward(f),
            Some(f) => {
                f.stats.refused_acl.fetch_add(1, Relaxed);
                NotOurs::Refuse
            }
            None => NotOurs::Refuse,
        }
    }

    /// Marks an answer for a client that may recurse: recursion available.
    pub fn finish(&self, client: Client, out: &mut [u8]) {
        if client.may_recurse && out.len() > 3 {
            out[3] |= 0x80;
        }
    }
}

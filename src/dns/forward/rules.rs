//! `--forward` rules: which upstreams a name goes to (the most specific domain wins, as in
//! dnsmasq; a domain with no upstream is never forwarded).

use std::net::{IpAddr, SocketAddr};

use hickory_proto::rr::Name;

/// One `--forward` rule.
#[derive(Clone, Debug)]
pub struct Rule {
    /// Lower case, fully qualified (`.` for every name).
    pub domain: Name,
    /// Empty: never forward names under `domain`.
    pub upstreams: Vec<SocketAddr>,
}

/// Parses one `--forward` value: `[DOMAIN=]ADDR[:PORT][,ADDR[:PORT]...]`.
pub fn parse_rule(s: &str) -> Result<Rule, String> {
    let (domain, addrs) = match s.split_once('=') {
        Some((d, a)) => (d.trim(), a.trim()),
        None => (".", s.trim()),
    };
    let mut domain = Name::from_ascii(if domain.is_empty() { "." } else { domain })
        .map_err(|e| format!("{domain:?} is not a domain name: {e}"))?
        .to_lowercase();
    domain.set_fqdn(true);
    let upstreams = addrs
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| {
            a.parse::<SocketAddr>()
                .or_else(|_| a.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                .or_else(|_| {
                    a.trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<IpAddr>()
                        .map(|ip| SocketAddr::new(ip, 53))
                })
                .map_err(|_| {
                    format!(
                        "{a:?} is not an address (e.g. 10.0.0.53, 10.0.0.53:5353 or [fd00::53]:53)"
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if upstreams.is_empty() && domain.is_root() {
        return Err("no upstream address: give e.g. 10.0.0.53 or corp=10.0.0.53".into());
    }
    Ok(Rule { domain, upstreams })
}

/// The rules, with their domains in lower-case wire form and their upstreams as indices into
/// the forwarder's upstream list.
pub(super) struct Rules {
    rules: Vec<(Vec<u8>, Vec<usize>)>,
}

impl Rules {
    pub(super) fn new(rules: Vec<(Vec<u8>, Vec<usize>)>) -> Rules {
        Rules { rules }
    }

    /// The upstreams of the most specific rule covering `name` (lower-case wire form); None
    /// when no rule covers it or the rule says never.
    pub(super) fn upstreams(&self, name: &[u8]) -> Option<&[usize]> {
        self.rules
            .iter()
            .filter(|(d, _)| is_under(name, d))
            .max_by_key(|(d, _)| d.len())
            .map(|(_, u)| u.as_slice())
            .filter(|u| !u.is_empty())
    }
}

/// Whether the wire name `name` equals `domain` or lies under it (both lower case, no
/// compression).
pub(super) fn is_under(name: &[u8], domain: &[u8]) -> bool {
    let mut at = 0;
    loop {
        if name.get(at..) == Some(domain) {
            return true;
        }
        match name.get(at) {
            Some(&0) | None => return false,
            Some(&len) => at += 1 + usize::from(len),
        }
    }
}

/// A name's lower-case wire form.
pub(super) fn wire_name(n: &Name) -> Vec<u8> {
    let mut out = Vec::new();
    for label in n.to_lowercase().iter() {
        out.push(label.len() as u8);
        out.extend_from_slice(label);
    }
    out.push(0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_like_dnsmasq() {
        let r = parse_rule("10.0.0.53").unwrap();
        assert!(r.domain.is_root());
        assert_eq!(r.upstreams, ["10.0.0.53:53".parse().unwrap()]);
        let r = parse_rule("Corp.Example=10.0.0.1:5353,[fd00::53]:53,fd00::54").unwrap();
        assert_eq!(r.domain.to_ascii(), "corp.example.");
        assert_eq!(r.upstreams.len(), 3);
        assert_eq!(r.upstreams[2], "[fd00::54]:53".parse().unwrap());
        let never = parse_rule("local.test=").unwrap();
        assert!(never.upstreams.is_empty());
        assert!(parse_rule("").is_err());
        assert!(parse_rule("corp=not-an-address")
            .unwrap_err()
            .contains("not an address"));
    }

    #[test]
    fn the_most_specific_rule_wins_on_label_boundaries() {
        let w = |s: &str| wire_name(&Name::from_ascii(s).unwrap());
        let rules = Rules::new(vec![
            (w("."), vec![0]),
            (w("corp.example."), vec![1]),
            (w("local.corp.example."), vec![]),
        ]);
        assert_eq!(rules.upstreams(&w("www.test.")), Some(&[0][..]));
        assert_eq!(rules.upstreams(&w("a.corp.example.")), Some(&[1][..]));
        assert_eq!(rules.upstreams(&w("corp.example.")), Some(&[1][..]));
        // "xcorp.example" is not under "corp.example".
        assert_eq!(rules.upstreams(&w("xcorp.example.")), Some(&[0][..]));
        assert_eq!(rules.upstreams(&w("a.local.corp.example.")), None);
    }
}

//! Bearer tokens and what each may do: `--token` (one token that may do everything) or
//! `--token-file FILE`, which is either the old form (its first line is that one token) or a
//! token table (TOML), told apart by one rule: a file with a line `[[token]]` is a table.
//!
//! ```toml
//! [[token]]
//! name = "appservers"          # optional: shown in logs and refusals, never the secret
//! secret = "9f6c...e1"         # what clients send: Authorization: Bearer <secret>
//! roles = ["appserver"]        # role globs it may write (register, renew, session,
//!                              # deregister); "*" is any run of characters; [] = none
//! read = true                  # may read when the server has --token-reads (default true)
//! ```
//!
//! The table is immutable; the server swaps in a new one on SIGHUP (a bad file keeps the old
//! one). Matching walks every entry in constant time per entry, so a reply's timing does not
//! tell how much of a secret was right, nor which entry was tried.

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

/// The tokens the server accepts; empty: none needed.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    entries: Vec<Entry>,
}

#[derive(Clone, Debug)]
struct Entry {
    secret: Box<[u8]>,
    scope: Scope,
}

/// What the token a request came with may do; put into the request's extensions by the auth
/// middleware, checked by the write handlers once the role is parsed.
#[derive(Clone, Debug)]
pub struct Scope {
    /// How refusals name the token: `token "appservers"` (or `the token`).
    pub name: Option<Arc<str>>,
    pub read: bool,
    /// Role globs it may write; None: every role (`--token`, the old one-line file).
    pub roles: Option<Arc<[String]>>,
}

impl Scope {
    fn everything() -> Scope {
        Scope {
            name: None,
            read: true,
            roles: None,
        }
    }

    pub fn label(&self) -> String {
        match &self.name {
            Some(n) => format!("token {n:?}"),
            None => "this token".into(),
        }
    }

    /// Whether this token may write `role` (a parsed, lower-case label); else a sentence that
    /// names the role and what the token may write.
    pub fn may_write(&self, role: &str) -> Result<(), String> {
        let Some(globs) = &self.roles else {
            return Ok(());
        };
        if globs
            .iter()
            .any(|g| glob_match(g.as_bytes(), role.as_bytes()))
        {
            return Ok(());
        }
        let allowed = if globs.is_empty() {
            "no role: it is read-only".to_owned()
        } else {
            format!("only roles matching {}", globs.join(", "))
        };
        Err(format!(
            "{} may not write role {role}: it may write {allowed} (--token-file); use a token \
             whose roles include {role}",
            self.label()
        ))
    }
}

/// `*` matches any run of characters (none included); everything else matches itself.
pub fn glob_match(glob: &[u8], s: &[u8]) -> bool {
    match glob.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| glob_match(rest, &s[i..])),
        Some((c, rest)) => s.first() == Some(c) && glob_match(rest, &s[1..]),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    token: Vec<FileEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    name: Option<String>,
    secret: String,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default = "yes")]
    read: bool,
}

fn yes() -> bool {
    true
}

impl Tokens {
    /// One token that may do everything (`--token`).
    pub fn single(secret: &str) -> Tokens {
        Tokens {
            entries: vec![Entry {
                secret: secret.as_bytes().into(),
                scope: Scope::everything(),
            }],
        }
    }

    /// Shared and swappable, as `Access::tokens` holds them.
    pub fn shared(self) -> Arc<arc_swap::ArcSwap<Tokens>> {
        Arc::new(arc_swap::ArcSwap::from_pointee(self))
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether any token is limited to some roles (then refusals are worth logging).
    pub fn scoped(&self) -> bool {
        self.entries.iter().any(|e| e.scope.roles.is_some())
    }

    /// Reads `--token-file`: a token table when a line is `[[token]]`, else the old form
    /// (the first line is the one token).
    pub fn load(path: &Path) -> Result<Tokens, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--token-file {}: {e}", path.display()))?;
        Tokens::parse(&text).map_err(|e| format!("--token-file {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Tokens, String> {
        if !text.lines().any(|l| l.trim() == "[[token]]") {
            let t = text.lines().next().unwrap_or("").trim();
            if t.is_empty() {
                return Err("the token is empty: put the token on the first line, or a \
                            [[token]] table (see the README's Scoped tokens)"
                    .into());
            }
            return Ok(Tokens::single(t));
        }
        let file: File = toml::from_str(text)
            .map_err(|e| format!("not a valid token table: {}", e.message().trim_end()))?;
        let mut entries: Vec<Entry> = Vec::new();
        for (i, t) in file.token.into_iter().enumerate() {
            let which = match &t.name {
                Some(n) => format!("token {n:?}"),
                None => format!("[[token]] number {}", i + 1),
            };
            let secret = t.secret.trim();
            if secret.is_empty() || !secret.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "{which}: the secret must be one word of printable characters"
                ));
            }
            if entries.iter().any(|e| *e.secret == *secret.as_bytes()) {
                return Err(format!("{which}: the same secret is given twice"));
            }
            let mut roles = Vec::new();
            for r in &t.roles {
                let g = r.trim().to_ascii_lowercase();
                let ok = !g.is_empty()
                    && g.len() <= 63
                    && g.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'*'
                    });
                if !ok {
                    return Err(format!(
                        "{which}: role {r:?} is not a role glob: use role names (a-z 0-9 -) \
                         with * for any run of characters, e.g. \"appserver\" or \"front*\""
                    ));
                }
                roles.push(g);
            }
            entries.push(Entry {
                secret: secret.as_bytes().into(),
                scope: Scope {
                    name: t.name.map(Arc::from),
                    read: t.read,
                    roles: Some(roles.into()),
                },
            });
        }
        if entries.is_empty() {
            return Err("the token table has no [[token]] with a secret".into());
        }
        Ok(Tokens { entries })
    }

    /// The scope of the token given, if it is one of ours. Every entry is compared, each in
    /// constant time.
    pub fn find(&self, given: &[u8]) -> Option<Scope> {
        let mut found = None;
        for e in &self.entries {
            if constant_time_eq(given, &e.secret) && found.is_none() {
                found = Some(e.scope.clone());
            }
        }
        found
    }
}

/// Compares in time that depends on the lengths only.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &x) in b.iter().enumerate() {
        diff |= usize::from(x ^ a.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match(b"appserver", b"appserver"));
        assert!(!glob_match(b"appserver", b"appserver2"));
        assert!(glob_match(b"front*", b"frontserver"));
        assert!(glob_match(b"front*", b"front"));
        assert!(glob_match(b"*", b"anything"));
        assert!(glob_match(b"*-prod", b"web-prod"));
        assert!(!glob_match(b"*-prod", b"web-prod2"));
        assert!(glob_match(b"a*b*c", b"aXXbYc"));
        assert!(!glob_match(b"a*b*c", b"aXXcYb"));
    }

    #[test]
    fn one_bare_line_is_the_old_form() {
        let t = Tokens::parse("s3cret\nignored\n").unwrap();
        assert_eq!(t.len(), 1);
        let s = t.find(b"s3cret").unwrap();
        assert!(s.may_write("anything").is_ok() && s.read);
        assert!(t.find(b"ignored").is_none());
        // A base64 token (ending in =) is still the old form.
        assert!(Tokens::parse("dGVzdA==\n")
            .unwrap()
            .find(b"dGVzdA==")
            .is_some());
        assert!(Tokens::parse("\n").unwrap_err().contains("empty"));
    }

    #[test]
    fn a_table_scopes_each_token() {
        let t = Tokens::parse(
            r#"
            # comments are fine
            [[token]]
            name = "apps"
            secret = "app-secret"
            roles = ["appserver"]

            [[token]]
            secret = "front-secret"
            roles = ["front*", "Proxy"]
            read = false

            [[token]]
            name = "reader"
            secret = "read-only"
            "#,
        )
        .unwrap();
        assert_eq!(t.len(), 3);
        let apps = t.find(b"app-secret").unwrap();
        assert!(apps.may_write("appserver").is_ok());
        let e = apps.may_write("frontserver").unwrap_err();
        assert!(
            e.contains("token \"apps\" may not write role frontserver")
                && e.contains("only roles matching appserver"),
            "{e}"
        );
        let front = t.find(b"front-secret").unwrap();
        assert!(front.may_write("frontserver").is_ok() && front.may_write("proxy").is_ok());
        assert!(!front.read);
        let reader = t.find(b"read-only").unwrap();
        assert!(reader
            .may_write("appserver")
            .unwrap_err()
            .contains("read-only"));
        assert!(t.find(b"nope").is_none() && t.find(b"").is_none());
        assert!(t.scoped());
    }

    #[test]
    fn bad_tables_are_refused_with_the_reason() {
        let bad = |text: &str| Tokens::parse(text).unwrap_err();
        assert!(bad("[[token]]\nroles = []\n").contains("secret"));
        assert!(bad("[[token]]\nsecret = \"a b\"\n").contains("one word"));
        assert!(bad("[[token]]\nsecret = \"x\"\nrole = [\"a\"]\n").contains("role"));
        assert!(bad("[[token]]\nsecret = \"x\"\nroles = [\"a.b\"]\n").contains("role glob"));
        assert!(bad("[[token]]\nsecret = \"x\"\n[[token]]\nsecret = \"x\"\n").contains("twice"));
    }
}

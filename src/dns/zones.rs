//! Static zone data: every `*.zone` file of the zones directory, parsed with hickory-proto's
//! RFC 1035 parser and pre-encoded into answer templates.
//!
//! Loading is all-or-nothing: a directory with one bad file is rejected with the file and line
//! named, so a SIGHUP reload either installs every new file or keeps serving the old set.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hickory_proto::rr::{Name, RData, Record, RecordSet, RecordType, RrKey};
use hickory_proto::serialize::txt::Parser;

use super::encode::{encode_records, wire_name};
use super::snapshot::{Entry, Map, RrSet, Soa};

pub struct StaticZone {
    pub origin: Name,
    pub path: PathBuf,
    pub soa: Soa,
    /// The apex's own RRsets but the SOA (whose serial the builder sets), pre-encoded.
    pub apex: Vec<RrSet>,
    /// Every name below the apex (and empty non-terminals), pre-encoded.
    pub names: Arc<Map<Box<[u8]>, Entry>>,
    pub record_count: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("{path}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ZoneError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

/// Loads every `*.zone` file in `dir`, sorted by name. A missing directory is an empty set.
pub fn load_dir(dir: &Path) -> Result<Vec<StaticZone>, ZoneError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(ZoneError {
                path: dir.to_owned(),
                line: None,
                message: format!("cannot read the zones directory: {e}"),
            })
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "zone") && p.is_file())
        .collect();
    paths.sort();
    let mut zones: Vec<StaticZone> = Vec::with_capacity(paths.len());
    for path in paths {
        let zone = load_file(&path)?;
        if let Some(other) = zones.iter().find(|z| z.origin == zone.origin) {
            return Err(ZoneError {
                path,
                line: None,
                message: format!(
                    "zone {} is already defined by {}",
                    zone.origin,
                    other.path.display()
                ),
            });
        }
        zones.push(zone);
    }
    Ok(zones)
}

/// Parses one zone file; the origin defaults to the file name without `.zone`.
pub fn load_file(path: &Path) -> Result<StaticZone, ZoneError> {
    let err = |line, message: String| ZoneError {
        path: path.to_owned(),
        line,
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(None, format!("cannot read: {e}")))?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let origin = Name::from_ascii(format!("{stem}.")).ok();
    let (origin, records) =
        match Parser::new(text.as_str(), Some(path.to_owned()), origin.clone()).parse() {
            Ok(parsed) => parsed,
            Err(e) => return Err(err(error_line(&text, path, origin), e.to_string())),
        };
    // The apex is where the SOA is (the parser's origin is the *last* $ORIGIN of the file, so
    // a file that moves $ORIGIN further down would otherwise change zones).
    let origin = records
        .keys()
        .filter(|k| k.record_type == RecordType::SOA)
        .map(|k| Name::from(k.name.clone()))
        .min_by_key(|n| n.num_labels())
        .unwrap_or(origin)
        .to_lowercase();

    let mut soa = None;
    let mut names: Map<Box<[u8]>, Entry> = Map::default();
    let mut apex: Vec<RrSet> = Vec::new();
    let mut record_count = 0;
    for (key, set) in &records {
        let name = Name::from(key.name.clone());
        let line_of = |rtype: RecordType| owner_line(&text, &origin, &name, rtype);
        if !origin.zone_of(&name) {
            return Err(err(
                line_of(key.record_type),
                format!("{name} is outside the zone {origin}"),
            ));
        }
        record_count += set.records_count();
        if key.record_type == RecordType::SOA {
            if name != origin {
                return Err(err(
                    line_of(RecordType::SOA),
                    format!("SOA at {name}: it belongs at the apex {origin}"),
                ));
            }
            if let Some(Record {
                data: RData::SOA(s),
                ttl,
                ..
            }) = set.records_without_rrsigs().next()
            {
                soa = Some(Soa {
                    mname: s.mname.clone(),
                    rname: s.rname.clone(),
                    serial: s.serial,
                    refresh: s.refresh,
                    retry: s.retry,
                    expire: s.expire,
                    minimum: s.minimum,
                    ttl: *ttl,
                });
            }
        }
        if key.record_type == RecordType::CNAME
            && records
                .keys()
                .any(|k| k.name == key.name && k.record_type != RecordType::CNAME)
        {
            return Err(err(
                line_of(RecordType::CNAME),
                format!("{name} has a CNAME and other data (RFC 1034 3.6.2)"),
            ));
        }
        let answers: Vec<Record> = set.records_without_rrsigs().cloned().collect();
        let additionals = glue(&records, &answers);
        let template = encode_records(&name, key.record_type, &answers, &additionals)
            .map_err(|m| err(line_of(key.record_type), m))?;
        if name == origin {
            if key.record_type != RecordType::SOA {
                apex.push(RrSet {
                    rtype: u16::from(key.record_type),
                    rotations: Arc::from([template]),
                });
            }
            continue;
        }
        let entry = names.entry(wire_name(&name)).or_default();
        entry.sets.push(RrSet {
            rtype: u16::from(key.record_type),
            rotations: Arc::from([template]),
        });
        // Empty non-terminals between the name and the apex.
        let mut parent = name.base_name();
        while parent.num_labels() > origin.num_labels() {
            names.entry(wire_name(&parent)).or_default();
            parent = parent.base_name();
        }
    }
    let soa = soa.ok_or_else(|| {
        err(
            None,
            format!("no SOA record at the apex {origin}: add one (see zones/cluster.zone)"),
        )
    })?;
    Ok(StaticZone {
        origin,
        path: path.to_owned(),
        soa,
        apex,
        names: Arc::new(names),
        record_count,
    })
}

/// The line (1-based) of the first record of `name` with type `rtype`, for errors found after
/// parsing. Follows `$ORIGIN`, `@`, relative names and owner-less continuation lines; a record
/// split over parentheses is found by its first line.
fn owner_line(text: &str, origin: &Name, name: &Name, rtype: RecordType) -> Option<usize> {
    let mut current = origin.clone();
    let mut owner: Option<Name> = None;
    let want = rtype.to_string();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split(';').next().unwrap_or("");
        if line.trim().is_empty() {
            continue;
        }
        let mut tokens = line.split_whitespace();
        if !line.starts_with([' ', '\t']) {
            let first = tokens.next()?;
            if first.eq_ignore_ascii_case("$ORIGIN") {
                if let Some(o) = tokens.next().and_then(|o| Name::from_ascii(o).ok()) {
                    current = o.to_lowercase();
                }
                continue;
            }
            if first.starts_with('$') {
                continue;
            }
            owner = if first == "@" {
                Some(current.clone())
            } else if first.ends_with('.') {
                Name::from_ascii(first).ok()
            } else {
                Name::from_ascii(format!("{first}.{current}")).ok()
            };
        }
        let is_owner = owner
            .as_ref()
            .is_some_and(|o| o.to_lowercase() == name.to_lowercase());
        if is_owner && tokens.take(4).any(|t| t.eq_ignore_ascii_case(&want)) {
            return Some(i + 1);
        }
    }
    None
}

/// Addresses of the in-zone targets of NS, MX and SRV records.
fn glue(records: &BTreeMap<RrKey, RecordSet>, answers: &[Record]) -> Vec<Record> {
    let mut out = Vec::new();
    for r in answers {
        let target = match &r.data {
            RData::NS(ns) => &ns.0,
            RData::MX(mx) => &mx.exchange,
            RData::SRV(srv) => &srv.target,
            _ => continue,
        };
        for rtype in [RecordType::A, RecordType::AAAA] {
            let key = RrKey::new(target.to_lowercase().into(), rtype);
            if let Some(set) = records.get(&key) {
                out.extend(set.records_without_rrsigs().cloned());
            }
        }
    }
    out
}

/// hickory's parser does not say where it failed: find the first line whose prefix of the
/// file fails with the same error. Once the bad line is in a prefix, every longer prefix
/// fails with that same (first) error, and no shorter one does: a binary search over the
/// line ends, O(log n) parses (a 4,000-record file: 12 parses, not 4,000).
fn error_line(text: &str, path: &Path, origin: Option<Name>) -> Option<usize> {
    let fails_the_same = |end: usize, full: &str| {
        matches!(
            Parser::new(&text[..end], Some(path.to_owned()), origin.clone()).parse(),
            Err(e) if e.to_string() == full
        )
    };
    let full = Parser::new(text, Some(path.to_owned()), origin.clone())
        .parse()
        .err()?
        .to_string();
    let ends: Vec<usize> = text
        .match_indices('\n')
        .map(|(i, _)| i + 1)
        .chain([text.len()])
        .collect();
    // The first index whose prefix fails the same way (the last one always does).
    let (mut lo, mut hi) = (0, ends.len() - 1);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if fails_the_same(ends[mid], &full) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    fails_the_same(ends[lo], &full).then_some(lo + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_bad_line_of_a_big_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.zone");
        let mut text = String::from(
            "$TTL 60\n@ IN SOA ns hostmaster 1 60 10 3600 1\n@ IN NS ns\nns IN A 127.0.0.1\n",
        );
        for i in 0..4000 {
            text.push_str(&format!("h{i} IN A 10.0.{}.{}\n", i / 250, i % 250 + 1));
        }
        text.push_str("bad IN A 10.0.0.300\n");
        for i in 0..100 {
            text.push_str(&format!("t{i} IN A 10.1.0.{}\n", i + 1));
        }
        std::fs::write(&path, text).unwrap();
        let e = load_file(&path).err().expect("bad address must fail");
        assert_eq!(e.line, Some(4005), "{e}");
    }

    #[test]
    fn reports_file_and_line_of_a_bad_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.zone");
        std::fs::write(
            &path,
            "$TTL 60\n@ IN SOA ns hostmaster 1 60 10 3600 1\n@ IN NS ns\nns IN A 127.0.0.1\nproxy IN A 10.0.0.300\n",
        )
        .unwrap();
        let e = load_file(&path).err().expect("bad address must fail");
        assert_eq!(e.line, Some(5), "{e}");
        assert!(e.to_string().contains("cluster.zone:5"), "{e}");
    }

    #[test]
    fn errors_found_after_parsing_name_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.zone");
        let head = "$ORIGIN cluster.\n$TTL 60\n@ IN SOA ns.cluster. h.cluster. (\n  1 60 10 3600 1 )\n@ IN NS ns.cluster.\nns IN A 127.0.0.1\n";
        for (tail, line, what) in [
            (
                "bar IN A 10.0.0.2\n     IN CNAME x.cluster.\n",
                8,
                "CNAME and other data",
            ),
            (
                "; a comment\n$ORIGIN example.org.\nfoo IN A 10.0.0.1\n",
                9,
                "outside the zone",
            ),
            (
                "sub IN SOA ns.cluster. h.cluster. 1 60 10 3600 1\n",
                7,
                "belongs at the apex",
            ),
        ] {
            std::fs::write(&path, format!("{head}{tail}")).unwrap();
            let e = load_file(&path).err().expect("must fail");
            assert_eq!(e.line, Some(line), "{e}");
            assert!(e.to_string().contains(what), "{e}");
        }
        // A later $ORIGIN inside the zone is fine: the apex stays where the SOA is.
        std::fs::write(
            &path,
            format!("{head}$ORIGIN sub.cluster.\nwww IN A 10.0.0.3\n"),
        )
        .unwrap();
        let z = load_file(&path).expect("a later $ORIGIN inside the zone loads");
        assert_eq!(z.origin.to_string(), "cluster.");
        assert!(z
            .names
            .contains_key(&wire_name(&Name::from_ascii("www.sub.cluster.").unwrap())));
    }

    #[test]
    fn loads_names_and_empty_non_terminals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("example.zone");
        std::fs::write(
            &path,
            "$TTL 60\n@ IN SOA ns hostmaster 7 60 10 3600 2\n@ IN NS ns\nns IN A 127.0.0.1\nwww.deep IN A 10.0.0.1\n",
        )
        .unwrap();
        let z = load_file(&path).unwrap();
        assert_eq!(z.origin, Name::from_ascii("example.").unwrap());
        assert_eq!(z.soa.serial, 7);
        assert_eq!(z.soa.minimum, 2);
        assert!(z
            .names
            .contains_key(&wire_name(&Name::from_ascii("www.deep.example.").unwrap())));
        let ent = &z.names[&wire_name(&Name::from_ascii("deep.example.").unwrap())];
        assert!(ent.sets.is_empty());
        let ns = z
            .apex
            .iter()
            .find(|s| s.rtype == u16::from(RecordType::NS))
            .unwrap();
        assert_eq!(
            ns.rotations[0].additional_ends.len(),
            1,
            "NS glue for ns.example."
        );
    }

    #[test]
    fn an_rrset_too_big_for_one_message_is_an_error_not_a_panic() {
        // Before: the encoder's error reached an `expect` (at load, or at every publish for the
        // apex) and stopped the server.
        let dir = tempfile::tempdir().unwrap();
        let txt = format!("\"{}\"", "x".repeat(250));
        for owner in ["big", "@"] {
            let path = dir.path().join("x.zone");
            let mut zone = String::from("$ORIGIN example.\n$TTL 60\n@ IN SOA ns hostmaster 7 60 10 3600 2\n@ IN NS ns\nns IN A 127.0.0.1\n");
            for i in 0..300 {
                zone.push_str(&format!("{owner} IN TXT {txt} \"{i}\"\n"));
            }
            std::fs::write(&path, zone).unwrap();
            let e = load_file(&path).err().expect("a 75 KB RRset is refused");
            assert!(e.message.contains("do not fit in one DNS message"), "{e}");
            assert!(e.to_string().contains("x.zone"), "{e}");
        }
    }

    #[test]
    fn a_zone_without_soa_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.zone");
        std::fs::write(&path, "$TTL 60\nwww IN A 10.0.0.1\n").unwrap();
        let e = load_file(&path).err().unwrap();
        assert!(e.message.contains("no SOA"), "{e}");
    }
}

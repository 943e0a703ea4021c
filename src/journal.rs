//! The journal of the embedded registry owner: what makes registrations survive a restart.
//!
//! Only the embedded writer (`registry::writer`) calls it. It is not the seam for other
//! owners (an etcd-backed owner keeps no journal): that seam is the registry's command protocol.
//! The journal knows only its own record type ([`StoredRecord`]), never the registry's.
//!
//! [`LogJournal`] is an append-only log in the data directory. [`MemoryJournal`] keeps nothing
//! (`--data-dir ''`, unit tests).
//!
//! # Format
//!
//! A file starts with frames right away. A frame is a 12-byte header, `FF 52 43 4C` ("\xffRCL"),
//! the payload length (u32 LE) and the payload's CRC32 (u32 LE), then the payload: one JSON
//! record. JSON is UTF-8 and never holds the byte 0xFF, so a frame start can never hide inside a
//! payload: replay resynchronises after damage by looking for the next 0xFF, and a candidate whose
//! claimed payload holds a 0xFF is rejected without checksumming it. Every byte is examined a
//! bounded number of times, whatever the damage (see `replay`). Files written by rollcall 0.1
//! (frames without the magic) are still read, and rewritten in this format at start.
//!
//! # Durability
//!
//! Records of a batch are gathered and written with one `write` in [`Journal::commit`], before
//! the writer replies to anyone. Registrations and deregistrations are fsynced before the reply;
//! renewals reach the OS before the reply (they survive `kill -9`) and are fsynced at most a
//! second later. Any failed write or fsync marks the journal *broken*: the torn bytes are cut
//! off, [`Journal::commit`] fails until the writer has rewritten the whole live set
//! ([`Journal::compact`]) successfully, and the writer acknowledges nothing in between.
//!
//! # Size
//!
//! [`Journal::wants_compaction`] follows the log, renewals included: the log is rewritten from
//! the live set when it holds more than 4 records per live node (plus 1,024), or when it has
//! grown past 4 times its size after the last rewrite (plus 1 MiB).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use crate::clock::unix_ms;

/// One entry of the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum StoredRecord {
    Put(StoredNode),
    Renew {
        role: String,
        node: String,
        expires_unix_ms: u64,
    },
    Del {
        role: String,
        node: String,
    },
    /// When the records before it were written, by the wall clock and by the boot clock: lets
    /// a restart on the same boot measure its downtime without trusting the wall clock.
    Clock {
        unix_ms: u64,
        boot_id: String,
        boottime_ms: u64,
    },
}

/// A registration as stored: everything needed to bring the node back after a restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredNode {
    pub role: String,
    pub node: String,
    pub addr: String,
    pub port: Option<u16>,
    pub service: String,
    pub ttl: u32,
    pub weight: u16,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    pub expires_unix_ms: u64,
    pub registered_unix_ms: u64,
}

/// What [`LogJournal::open`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Live registrations, their expiry already in this process's wall-clock frame and never
    /// more than their ttl away.
    pub nodes: Vec<StoredNode>,
    /// Records that could not be read (torn or corrupt), in words, for the log.
    pub dropped: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("data directory {dir} is locked by another rollcall (pid file {dir}/lock): stop it, or pick another --data-dir")]
    Locked { dir: PathBuf },
    #[error("data directory {dir}: {source}")]
    Io { dir: PathBuf, source: io::Error },
}

/// What the embedded writer needs from its journal.
pub trait Journal: Send + 'static {
    /// Queues one record; it is written by the next [`Journal::commit`].
    fn append(&mut self, rec: &StoredRecord);
    /// Writes the queued records, and fsyncs when `durable` is set (or when the last sync is
    /// older than a second). An error means nothing of this batch may be acknowledged; the
    /// journal then stays broken (every commit fails) until a [`Journal::compact`] succeeds.
    fn commit(&mut self, durable: bool) -> io::Result<()>;
    /// True when the log should be rewritten from the live set (`live` nodes), or is broken.
    fn wants_compaction(&self, live: usize) -> bool;
    /// Replaces the log with `live`, durably; queued records are dropped (the live set holds
    /// them). On success the journal is healthy again.
    fn compact(&mut self, live: &mut dyn Iterator<Item = StoredNode>) -> io::Result<()>;
    /// False after a failed write or sync, until a compaction succeeds.
    fn healthy(&self) -> bool;
}

/// Keeps nothing: registrations live only as long as the process.
#[derive(Default)]
pub struct MemoryJournal;

impl Journal for MemoryJournal {
    fn append(&mut self, _: &StoredRecord) {}
    fn commit(&mut self, _: bool) -> io::Result<()> {
        Ok(())
    }
    fn wants_compaction(&self, _: usize) -> bool {
        false
    }
    fn compact(&mut self, _: &mut dyn Iterator<Item = StoredNode>) -> io::Result<()> {
        Ok(())
    }
    fn healthy(&self) -> bool {
        true
    }
}

const LOG: &str = "registrations.log";
const LAZY_SYNC: Duration = Duration::from_secs(1);
const MAGIC: [u8; 4] = [0xff, b'R', b'C', b'L'];
const FRAME_HEADER: usize = 12;
/// Frames of rollcall 0.1: u32 length, u32 CRC32, payload.
const V1_HEADER: usize = 8;
const MAX_RECORD: usize = 1 << 20;
/// Clock records are written at most this often.
const CLOCK_EVERY: Duration = Duration::from_secs(1);

pub struct LogJournal {
    dir: PathBuf,
    file: File,
    _lock: File,
    /// Records queued since the last commit.
    pending: Vec<u8>,
    pending_records: usize,
    /// Length of the file's intact content: a failed write is cut back to it.
    end: u64,
    unsynced: bool,
    broken: bool,
    last_sync: Instant,
    last_clock: Option<Instant>,
    records_in_log: usize,
    bytes_at_compaction: u64,
    /// Where the damaged log found at start was kept.
    pub kept_damaged: Option<PathBuf>,
    /// Why the log could not be compacted at start (a full disk?); appends then go after its
    /// intact part.
    pub compaction_deferred: Option<String>,
}

fn create_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(0o600);
    o
}

impl LogJournal {
    /// Opens (creating) `dir`, takes its lock, reads every intact record and compacts the log.
    /// A damaged log is kept beside the new one (`registrations.log.damaged-<unix ms>`); a disk
    /// too full to compact defers compaction instead of refusing to start.
    pub fn open(dir: &Path) -> Result<(LogJournal, Loaded), JournalError> {
        let io_err = |source| JournalError::Io {
            dir: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let lock = create_options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.join("lock"))
            .map_err(io_err)?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(JournalError::Locked {
                dir: dir.to_owned(),
            });
        }
        let _ = lock.set_len(0);
        let _ = (&lock).write_all(format!("{}\n", std::process::id()).as_bytes());

        let path = dir.join(LOG);
        let mut data = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut data).map_err(io_err)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        let replayed = replay(&data);
        let mut loaded = Loaded {
            nodes: Vec::new(),
            dropped: replayed.dropped,
        };
        let now = unix_ms();
        loaded.nodes = restore_leases(replayed.live, replayed.clock.as_ref(), now, boot_clock());
        drop(std::mem::take(&mut data));

        let mut kept_damaged = None;
        if !loaded.dropped.is_empty() {
            // Keep the evidence: a hard link costs no space, and the rewrite below replaces only
            // the name `registrations.log`.
            let kept = dir.join(format!("{LOG}.damaged-{now}"));
            match std::fs::hard_link(&path, &kept) {
                Ok(()) => kept_damaged = Some(kept),
                Err(e) => tracing::warn!(error = %e, "could not keep a copy of the damaged log"),
            }
        }

        let mut journal = LogJournal {
            dir: dir.to_owned(),
            file: File::open("/dev/null").map_err(io_err)?,
            _lock: lock,
            pending: Vec::with_capacity(64 * 1024),
            pending_records: 0,
            end: 0,
            unsynced: false,
            broken: false,
            last_sync: Instant::now(),
            last_clock: None,
            records_in_log: 0,
            bytes_at_compaction: 0,
            kept_damaged,
            compaction_deferred: None,
        };
        match journal.compact(&mut loaded.nodes.iter().cloned()) {
            Ok(()) => {}
            // The new log is in place but its directory could not be synced: the writer
            // rewrites it again before it acknowledges anything.
            Err(e) if journal.bytes_at_compaction > 0 => {
                journal.compaction_deferred = Some(e.to_string());
            }
            Err(e) if replayed.format_v2 => {
                // No room for a fresh copy: append to the log we have, after its intact part.
                let _ = std::fs::remove_file(dir.join(format!("{LOG}.tmp")));
                let file = OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .map_err(io_err)?;
                file.set_len(replayed.good_end as u64).map_err(io_err)?;
                journal.file = file;
                journal.end = replayed.good_end as u64;
                journal.records_in_log = replayed.records;
                journal.bytes_at_compaction = replayed.good_end as u64;
                journal.broken = false;
                journal.compaction_deferred = Some(e.to_string());
            }
            Err(e) => return Err(io_err(e)),
        }
        Ok((journal, loaded))
    }

    fn write_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.file.write_all(&self.pending) {
            // Cut off what a partial write left, so that no torn frame sits before the next
            // append; the journal stays broken until a rewrite anyway.
            let _ = self.file.set_len(self.end);
            return Err(e);
        }
        self.end += self.pending.len() as u64;
        self.records_in_log += self.pending_records;
        self.pending.clear();
        self.pending_records = 0;
        self.unsynced = true;
        Ok(())
    }

    fn fail(&mut self, e: io::Error) -> io::Error {
        self.broken = true;
        self.pending.clear();
        self.pending_records = 0;
        e
    }
}

impl Journal for LogJournal {
    fn append(&mut self, rec: &StoredRecord) {
        encode_frame(rec, &mut self.pending);
        self.pending_records += 1;
    }

    fn commit(&mut self, durable: bool) -> io::Result<()> {
        if self.broken {
            self.pending.clear();
            self.pending_records = 0;
            return Err(io::Error::other(
                "the data dir failed earlier and is not rewritten yet",
            ));
        }
        if !self.pending.is_empty() && self.last_clock.is_none_or(|t| t.elapsed() >= CLOCK_EVERY) {
            encode_frame(&clock_record(), &mut self.pending);
            self.pending_records += 1;
            self.last_clock = Some(Instant::now());
        }
        if let Err(e) = self.write_pending() {
            return Err(self.fail(e));
        }
        if self.unsynced && (durable || self.last_sync.elapsed() >= LAZY_SYNC) {
            if let Err(e) = self.file.sync_data() {
                return Err(self.fail(e));
            }
            self.unsynced = false;
            self.last_sync = Instant::now();
        }
        Ok(())
    }

    fn wants_compaction(&self, live: usize) -> bool {
        self.broken
            || self.records_in_log > 4 * live + 1024
            || self.end > 4 * self.bytes_at_compaction + (1 << 20)
    }

    fn compact(&mut self, live: &mut dyn Iterator<Item = StoredNode>) -> io::Result<()> {
        self.pending.clear();
        self.pending_records = 0;
        let mut buf = Vec::new();
        let mut records = 0;
        for n in live {
            encode_frame(&StoredRecord::Put(n), &mut buf);
            records += 1;
        }
        encode_frame(&clock_record(), &mut buf);
        records += 1;
        let tmp = self.dir.join(format!("{LOG}.tmp"));
        let written = (|| {
            let mut f = create_options()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(self.fail(e));
        }
        if let Err(e) = std::fs::rename(&tmp, self.dir.join(LOG)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(self.fail(e));
        }
        // From the rename on, the new file is the log: append to it whatever happens next.
        match OpenOptions::new().append(true).open(self.dir.join(LOG)) {
            Ok(f) => self.file = f,
            Err(e) => return Err(self.fail(e)),
        }
        self.end = buf.len() as u64;
        self.records_in_log = records;
        self.bytes_at_compaction = self.end;
        self.unsynced = false;
        self.last_sync = Instant::now();
        self.last_clock = Some(Instant::now());
        // The rename is durable only once the directory is synced.
        if let Err(e) = File::open(&self.dir).and_then(|d| d.sync_all()) {
            return Err(self.fail(e));
        }
        self.broken = false;
        Ok(())
    }

    fn healthy(&self) -> bool {
        !self.broken
    }
}

fn encode_frame(rec: &StoredRecord, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[0; 8]);
    serde_json::to_writer(&mut *out, rec).expect("a StoredRecord always serializes");
    let payload = &out[start + FRAME_HEADER..];
    let len = (payload.len() as u32).to_le_bytes();
    let crc = crc32fast::hash(payload).to_le_bytes();
    out[start + 4..start + 8].copy_from_slice(&len);
    out[start + 8..start + 12].copy_from_slice(&crc);
}

/// The boot this process runs in and the time since it began (`CLOCK_BOOTTIME`, which counts
/// suspend and never jumps with the wall clock).
fn boot_clock() -> Option<(String, u64)> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return None;
    }
    Some((
        id.trim().to_owned(),
        ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000,
    ))
}

fn clock_record() -> StoredRecord {
    let (boot_id, boottime_ms) = boot_clock().unwrap_or_default();
    StoredRecord::Clock {
        unix_ms: unix_ms(),
        boot_id,
        boottime_ms,
    }
}

/// Turns stored expiries into expiries in the wall-clock frame of `now`, never more than a
/// node's ttl away, and drops the expired.
///
/// When the last clock record was written during this boot, the downtime is measured with the
/// boot clock and each lease keeps what it had left when the log was last written, minus the
/// downtime: a wall clock that was wrong before the restart (or is now) moves no lease. Across
/// a reboot only the wall clock is left, and the ttl bounds how wrong it can make a lease.
fn restore_leases(
    live: BTreeMap<(String, String), StoredNode>,
    clock: Option<&(u64, String, u64)>,
    now: u64,
    boot: Option<(String, u64)>,
) -> Vec<StoredNode> {
    // (wall time of the last write in the old frame, downtime) when the boot clock can tell.
    let same_boot = match (clock, boot) {
        (Some((unix, id, then)), Some((boot_id, boottime)))
            if *id == boot_id && boottime >= *then =>
        {
            Some((*unix, boottime - then))
        }
        _ => None,
    };
    live.into_values()
        .filter_map(|mut n| {
            let left = match same_boot {
                Some((written, downtime)) => n
                    .expires_unix_ms
                    .saturating_sub(written)
                    .saturating_sub(downtime),
                None => n.expires_unix_ms.saturating_sub(now),
            };
            let left = left.min(u64::from(n.ttl) * 1000);
            if left == 0 {
                return None;
            }
            n.expires_unix_ms = now + left;
            Some(n)
        })
        .collect()
}

/// What a replay found.
#[derive(Default)]
pub(crate) struct Replayed {
    pub live: BTreeMap<(String, String), StoredNode>,
    /// The last clock record: (unix ms, boot id, boot time ms).
    pub clock: Option<(u64, String, u64)>,
    pub dropped: Vec<String>,
    /// End of the last intact frame.
    pub good_end: usize,
    pub records: usize,
    pub format_v2: bool,
    /// Bytes checksummed or scanned while resynchronising (bounded by a small multiple of the
    /// input, whatever it holds).
    pub work: usize,
}

/// Applies every intact frame of `data`. Damage is skipped by resynchronising on the next
/// intact frame; the length of a frame whose checksum fails is never trusted.
pub(crate) fn replay(data: &[u8]) -> Replayed {
    // A log of rollcall 0.1 opens with an intact old-style frame; anything else (a damaged
    // first frame included) is read as the current format.
    let v1 = !data.starts_with(&MAGIC) && v1_frame_at(data, 0, &mut 0).is_some();
    let mut out = Replayed {
        format_v2: !v1,
        ..Replayed::default()
    };
    if !out.format_v2 {
        replay_v1(data, &mut out);
        return out;
    }
    let mut pos = 0;
    let mut damage_from: Option<usize> = None;
    while pos < data.len() {
        match frame_at(data, pos, &mut out.work) {
            Ok(payload) => {
                pos = take_frame(&mut out, pos, FRAME_HEADER, payload, &mut damage_from);
            }
            Err(skip_to) => {
                damage_from.get_or_insert(pos);
                pos = skip_to;
            }
        }
    }
    if let Some(from) = damage_from {
        out.dropped.push(format!(
            "torn or damaged tail at byte {from} ({} bytes)",
            data.len() - from
        ));
    }
    out
}

/// The payload of an intact frame at `pos`, or where to look for the next frame.
fn frame_at<'a>(data: &'a [u8], pos: usize, work: &mut usize) -> Result<&'a [u8], usize> {
    let next = |from: usize, work: &mut usize| -> usize {
        let rest = data.get(from..).unwrap_or_default();
        let found = rest.iter().position(|&b| b == 0xff);
        *work += found.unwrap_or(rest.len());
        found.map_or(data.len(), |i| from + i)
    };
    if data.get(pos..pos + 4) != Some(&MAGIC[..]) {
        return Err(next(pos + 1, work));
    }
    let Some(header) = data.get(pos + 4..pos + FRAME_HEADER) else {
        return Err(data.len());
    };
    let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().unwrap());
    let start = pos + FRAME_HEADER;
    if len > MAX_RECORD {
        return Err(next(pos + 1, work));
    }
    let Some(payload) = data.get(start..start + len) else {
        return Err(next(pos + 1, work));
    };
    // A payload never holds 0xFF: if this one does, it is no payload, and the next frame can
    // start no earlier than that byte (nor inside this header).
    if let Some(i) = payload.iter().position(|&b| b == 0xff) {
        *work += i;
        return Err(next(pos + 1, work).min(start + i));
    }
    *work += len;
    if crc32fast::hash(payload) != crc {
        return Err(next(pos + 1, work));
    }
    Ok(payload)
}

/// Applies the intact frame at `pos` (reporting the damage before it, if any); returns where
/// the next frame starts.
fn take_frame(
    out: &mut Replayed,
    pos: usize,
    header: usize,
    payload: &[u8],
    damage_from: &mut Option<usize>,
) -> usize {
    if let Some(from) = damage_from.take() {
        out.dropped.push(format!(
            "damaged bytes {from}..{pos} ({} bytes) skipped",
            pos - from
        ));
    }
    match serde_json::from_slice::<StoredRecord>(payload) {
        Ok(rec) => apply(rec, out),
        Err(e) => out
            .dropped
            .push(format!("record at byte {pos} is unreadable: {e}")),
    }
    out.good_end = pos + header + payload.len();
    out.records += 1;
    out.good_end
}

fn apply(rec: StoredRecord, out: &mut Replayed) {
    match rec {
        StoredRecord::Put(n) => {
            out.live.insert((n.role.clone(), n.node.clone()), n);
        }
        StoredRecord::Renew {
            role,
            node,
            expires_unix_ms,
        } => {
            if let Some(n) = out.live.get_mut(&(role, node)) {
                n.expires_unix_ms = expires_unix_ms;
            }
        }
        StoredRecord::Del { role, node } => {
            out.live.remove(&(role, node));
        }
        StoredRecord::Clock {
            unix_ms,
            boot_id,
            boottime_ms,
        } => out.clock = Some((unix_ms, boot_id, boottime_ms)),
    }
}

/// A frame of rollcall 0.1 at `pos`: u32 length, u32 CRC32, then a JSON record.
fn v1_frame_at<'a>(data: &'a [u8], pos: usize, work: &mut usize) -> Option<&'a [u8]> {
    let header = data.get(pos..pos + V1_HEADER)?;
    let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().unwrap());
    if len == 0 || len > MAX_RECORD {
        return None;
    }
    let payload = data.get(pos + V1_HEADER..pos + V1_HEADER + len)?;
    if !payload.starts_with(b"{\"op\":\"") {
        return None;
    }
    *work += len;
    (crc32fast::hash(payload) == crc).then_some(payload)
}

/// Replays a log of rollcall 0.1 (no magic). A frame whose checksum fails is skipped by
/// resynchronising one byte further (its length is not trusted); a candidate must open with
/// `{"op":"` before it is checksummed.
fn replay_v1(data: &[u8], out: &mut Replayed) {
    let mut pos = 0;
    let mut damage_from: Option<usize> = None;
    while pos < data.len() {
        match v1_frame_at(data, pos, &mut out.work) {
            Some(payload) => {
                pos = take_frame(out, pos, V1_HEADER, payload, &mut damage_from);
            }
            None => {
                damage_from.get_or_insert(pos);
                pos += 1;
                if out.work > 8 * data.len() {
                    // Old frames have no marker to resynchronise on cheaply: past this much
                    // work the rest is given up (and kept in the damaged copy) rather than
                    // costing seconds per MiB.
                    break;
                }
            }
        }
    }
    if let Some(from) = damage_from {
        out.dropped.push(format!(
            "torn or damaged tail at byte {from} ({} bytes)",
            data.len() - from
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, expires: u64) -> StoredNode {
        StoredNode {
            role: "app".into(),
            node: name.into(),
            addr: "10.0.0.1".into(),
            port: Some(80),
            service: "http".into(),
            ttl: 60,
            weight: 1,
            meta: BTreeMap::new(),
            expires_unix_ms: expires,
            registered_unix_ms: 0,
        }
    }

    fn names(l: &Loaded) -> Vec<&str> {
        l.nodes.iter().map(|n| n.node.as_str()).collect()
    }

    #[test]
    fn survives_reopen_and_skips_deleted_and_expired() {
        let dir = tempfile::tempdir().unwrap();
        let far = unix_ms() + 60_000;
        {
            let (mut s, l) = LogJournal::open(dir.path()).unwrap();
            assert!(l.nodes.is_empty());
            s.append(&StoredRecord::Put(node("a", far)));
            s.append(&StoredRecord::Put(node("b", far)));
            s.append(&StoredRecord::Put(node("old", 1)));
            s.append(&StoredRecord::Del {
                role: "app".into(),
                node: "b".into(),
            });
            s.commit(true).unwrap();
        }
        let (s, l) = LogJournal::open(dir.path()).unwrap();
        assert_eq!(names(&l), ["a"]);
        assert!(l.dropped.is_empty());
        assert!(s.kept_damaged.is_none());
    }

    #[test]
    fn renewals_reach_the_file_on_commit_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let far = unix_ms() + 50_000;
        {
            let (mut s, _) = LogJournal::open(dir.path()).unwrap();
            s.append(&StoredRecord::Put(node("a", far)));
            s.commit(true).unwrap();
            for i in 1..=100 {
                s.append(&StoredRecord::Renew {
                    role: "app".into(),
                    node: "a".into(),
                    expires_unix_ms: far + i,
                });
            }
            s.append(&StoredRecord::Put(node("b", far)));
            s.append(&StoredRecord::Renew {
                role: "app".into(),
                node: "a".into(),
                expires_unix_ms: far + 5000,
            });
            s.commit(false).unwrap(); // written to the OS (no fsync): survives a process crash
        }
        let (_s, l) = LogJournal::open(dir.path()).unwrap();
        let a = l.nodes.iter().find(|n| n.node == "a").unwrap();
        // Restored in this process's frame: what was left then (55 s), less a little downtime.
        let left = a.expires_unix_ms - unix_ms();
        assert!((50_000..=55_000).contains(&left), "{left}");
        assert!(l.nodes.iter().any(|n| n.node == "b"));
    }

    #[test]
    fn second_open_is_refused_while_locked() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, _) = LogJournal::open(dir.path()).unwrap();
        let err = LogJournal::open(dir.path())
            .err()
            .expect("second open must fail");
        assert!(matches!(err, JournalError::Locked { .. }), "{err}");
    }

    #[test]
    fn files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = LogJournal::open(dir.path()).unwrap();
        s.append(&StoredRecord::Put(node("a", unix_ms() + 60_000)));
        s.commit(true).unwrap();
        for f in [LOG, "lock"] {
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{f} is {mode:o}");
        }
    }

    fn log_of(nodes: usize) -> (tempfile::TempDir, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let far = unix_ms() + 60_000;
        {
            let (mut s, _) = LogJournal::open(dir.path()).unwrap();
            for i in 0..nodes {
                s.append(&StoredRecord::Put(node(&format!("n{i}"), far)));
            }
            s.commit(true).unwrap();
        }
        let data = std::fs::read(dir.path().join(LOG)).unwrap();
        (dir, data)
    }

    /// Where each node's frame starts in a log made by `log_of`: `at[i]` is node n{i}'s
    /// (the log opens with the clock record of the rewrite at open).
    fn frames(data: &[u8]) -> Vec<usize> {
        let mut at = vec![];
        let mut pos = 0;
        while pos < data.len() {
            let len = u32::from_le_bytes(data[pos + 4..pos + 8].try_into().unwrap()) as usize;
            pos += FRAME_HEADER + len;
            at.push(pos);
        }
        at.truncate(at.len() - 1);
        at
    }

    #[test]
    fn torn_tail_and_a_bad_payload_keep_every_other_record() {
        let (dir, mut data) = log_of(5);
        let at = frames(&data);
        data[at[2] + 20] ^= 0x01; // n2's payload
        let mut torn = Vec::new();
        encode_frame(
            &StoredRecord::Put(node("torn", unix_ms() + 60_000)),
            &mut torn,
        );
        data.extend_from_slice(&torn[..torn.len() / 2]);
        std::fs::write(dir.path().join(LOG), &data).unwrap();

        let (s, l) = LogJournal::open(dir.path()).unwrap();
        assert_eq!(names(&l), ["n0", "n1", "n3", "n4"]);
        assert_eq!(l.dropped.len(), 2, "{:?}", l.dropped);
        // The damaged original is kept beside the compacted log, byte for byte.
        let kept = s.kept_damaged.as_ref().expect("damaged log kept");
        assert_eq!(std::fs::read(kept).unwrap(), data);
        let now = std::fs::read(dir.path().join(LOG)).unwrap();
        assert_ne!(now, data);
    }

    #[test]
    fn a_flipped_bit_in_a_length_loses_one_record_only() {
        // The red team's finding: a length made huge by one bit swallowed 54 % of the log.
        let (dir, mut data) = log_of(100);
        let at = frames(&data);
        data[at[10] + 6] ^= 0x40; // n10's length, third byte: +4 MiB
        std::fs::write(dir.path().join(LOG), &data).unwrap();
        let (_s, l) = LogJournal::open(dir.path()).unwrap();
        assert_eq!(l.nodes.len(), 99, "{:?}", l.dropped);
        assert!(!names(&l).contains(&"n10"));

        // The same with a length made shorter: the checksum fails, the length is not trusted.
        let (dir, mut data) = log_of(100);
        let at = frames(&data);
        data[at[20] + 4] ^= 0x04;
        std::fs::write(dir.path().join(LOG), &data).unwrap();
        let (_s, l) = LogJournal::open(dir.path()).unwrap();
        assert_eq!(l.nodes.len(), 99, "{:?}", l.dropped);
    }

    #[test]
    fn a_torn_frame_from_a_full_disk_does_not_swallow_the_next_record() {
        // A partial write left half a frame; later appends must still be read back.
        let (dir, mut data) = log_of(3);
        let mut torn = Vec::new();
        encode_frame(
            &StoredRecord::Put(node("torn", unix_ms() + 60_000)),
            &mut torn,
        );
        data.extend_from_slice(&torn[..torn.len() - 5]);
        encode_frame(
            &StoredRecord::Put(node("after", unix_ms() + 60_000)),
            &mut data,
        );
        std::fs::write(dir.path().join(LOG), &data).unwrap();
        let (_s, l) = LogJournal::open(dir.path()).unwrap();
        assert_eq!(names(&l), ["after", "n0", "n1", "n2"]);
    }

    #[test]
    fn resynchronising_costs_a_bounded_amount_of_work() {
        // Adversarial garbage: magics claiming the largest record, back to back, with a valid
        // record at the very end; and random bytes.
        let mut data = Vec::new();
        encode_frame(
            &StoredRecord::Put(node("first", unix_ms() + 60_000)),
            &mut data,
        );
        for _ in 0..100_000 {
            data.extend_from_slice(&MAGIC);
            data.extend_from_slice(&(MAX_RECORD as u32).to_le_bytes());
            data.extend_from_slice(&[0x41; 4]);
            data.extend_from_slice(b"{\"op\":\"put\"");
        }
        let mut rng = 0x9E3779B97F4A7C15u64;
        for _ in 0..1_000_000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            data.push(if rng.is_multiple_of(7) {
                0xff
            } else {
                rng as u8
            });
        }
        encode_frame(
            &StoredRecord::Put(node("last", unix_ms() + 60_000)),
            &mut data,
        );
        let r = replay(&data);
        assert!(r.live.contains_key(&("app".into(), "first".into())));
        assert!(r.live.contains_key(&("app".into(), "last".into())));
        assert!(
            r.work <= 4 * data.len(),
            "resync examined {} bytes for {} bytes of input",
            r.work,
            data.len()
        );
    }

    #[test]
    fn logs_of_rollcall_0_1_are_read_and_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let far = unix_ms() + 60_000;
        let mut data = Vec::new();
        for rec in [
            StoredRecord::Put(node("a", far)),
            StoredRecord::Put(node("b", far)),
            StoredRecord::Del {
                role: "app".into(),
                node: "a".into(),
            },
        ] {
            let payload = serde_json::to_vec(&rec).unwrap();
            data.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            data.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            data.extend_from_slice(&payload);
        }
        std::fs::write(dir.path().join(LOG), &data).unwrap();
        let (_s, l) = LogJournal::open(dir.path()).unwrap();
        assert_eq!(names(&l), ["b"]);
        assert!(l.dropped.is_empty(), "{:?}", l.dropped);
        let now = std::fs::read(dir.path().join(LOG)).unwrap();
        assert!(now.starts_with(&MAGIC));
    }

    #[test]
    fn renewal_only_traffic_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let far = unix_ms() + 60_000;
        let (mut s, _) = LogJournal::open(dir.path()).unwrap();
        let live: Vec<StoredNode> = (0..100).map(|i| node(&format!("n{i}"), far)).collect();
        s.compact(&mut live.iter().cloned()).unwrap();
        let live_size = std::fs::metadata(dir.path().join(LOG)).unwrap().len();
        let mut largest = 0;
        for round in 0..200 {
            for n in &live {
                s.append(&StoredRecord::Renew {
                    role: n.role.clone(),
                    node: n.node.clone(),
                    expires_unix_ms: far + round,
                });
            }
            s.commit(false).unwrap();
            if s.wants_compaction(live.len()) {
                s.compact(&mut live.iter().cloned()).unwrap();
            }
            largest = largest.max(std::fs::metadata(dir.path().join(LOG)).unwrap().len());
        }
        // 20,000 renewals of 100 nodes: the log never holds more than ~1,500 records.
        assert!(
            largest < live_size * 4 + (1 << 20),
            "log reached {largest} bytes (live set {live_size})"
        );
        assert!(largest < 300_000, "log reached {largest} bytes");
    }

    #[test]
    fn restore_clamps_leases_to_their_ttl_and_measures_downtime_by_the_boot_clock() {
        let mut live = BTreeMap::new();
        let now = 1_000_000_000_000;
        // Written by a wall clock 24 h ahead: without a boot clock, the ttl (60 s) bounds it.
        live.insert(
            ("app".into(), "ahead".into()),
            node("ahead", now + 86_400_000 + 30_000),
        );
        let r = restore_leases(live.clone(), None, now, None);
        assert_eq!(r[0].expires_unix_ms, now + 60_000);

        // Written by a wall clock an hour behind, 1 s before a restart on the same boot: the lease
        // keeps the 29 s it had left; the wall clock moves nothing.
        let then = now - 3_600_000;
        let mut live = BTreeMap::new();
        live.insert(
            ("app".into(), "behind".into()),
            node("behind", then + 30_000),
        );
        let clock = (then, "boot-1".to_string(), 5_000);
        let r = restore_leases(
            live.clone(),
            Some(&clock),
            now,
            Some(("boot-1".into(), 6_000)),
        );
        assert_eq!(r[0].expires_unix_ms, now + 29_000);
        // Another boot: only the wall clock is left, and that node has expired.
        let r = restore_leases(live, Some(&clock), now, Some(("boot-2".into(), 6_000)));
        assert!(r.is_empty());
    }
}

//! Durability of registrations: the data directory.
//!
//! The registry's writer is the only caller. It appends one record per change, then calls
//! [`Store::commit`] before acknowledging a batch. The store knows only its own record type
//! ([`StoredRecord`]), never the registry. [`LogStore`] is the embedded implementation: an
//! append-only log of length- and CRC-framed JSON records, compacted into a fresh file (write,
//! fsync, rename, fsync dir) on start and when it grows. [`MemoryStore`] keeps nothing and is
//! for `--data-dir ''` and unit tests. An etcd-backed store would implement the same trait.
//!
//! Durability policy: registrations and deregistrations are fsynced before the API answers;
//! renewals are written to the OS at once (they survive `kill -9`) and fsynced at most a second
//! later (a power loss can cost up to 1 s of lease extensions, never a registration).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

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

/// What [`Store::open`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    pub nodes: Vec<StoredNode>,
    /// Records that could not be read (torn or corrupt), in words, for the log.
    pub dropped: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data directory {dir} is locked by another rollcall (pid file {dir}/lock): stop it, or pick another --data-dir")]
    Locked { dir: PathBuf },
    #[error("data directory {dir}: {source}")]
    Io { dir: PathBuf, source: io::Error },
}

/// The seam between the registry and its storage.
pub trait Store: Send + 'static {
    /// Appends one record; it reaches the OS by the next `commit` at the latest and is only
    /// durable after `commit(true)`.
    fn append(&mut self, rec: &StoredRecord) -> io::Result<()>;
    /// Makes appended records durable when `durable` is set, else only when the last sync is
    /// older than the store's lazy-sync interval.
    fn commit(&mut self, durable: bool) -> io::Result<()>;
    /// True when the stored history holds mostly dead records and should be compacted.
    fn wants_compaction(&self) -> bool;
    /// Replaces the stored history with `live`.
    fn compact(&mut self, live: Vec<StoredNode>) -> io::Result<()>;
}

/// Keeps nothing: registrations live only as long as the process.
#[derive(Default)]
pub struct MemoryStore;

impl Store for MemoryStore {
    fn append(&mut self, _: &StoredRecord) -> io::Result<()> {
        Ok(())
    }
    fn commit(&mut self, _: bool) -> io::Result<()> {
        Ok(())
    }
    fn wants_compaction(&self) -> bool {
        false
    }
    fn compact(&mut self, _: Vec<StoredNode>) -> io::Result<()> {
        Ok(())
    }
}

const LOG: &str = "registrations.log";
const LAZY_SYNC: Duration = Duration::from_secs(1);
/// Frame: u32 little-endian payload length, u32 CRC32 of the payload, payload (JSON).
const FRAME_HEADER: usize = 8;
const MAX_RECORD: usize = 1 << 20;

pub struct LogStore {
    dir: PathBuf,
    file: File,
    _lock: File,
    buf: Vec<u8>,
    /// Renewal records not yet written (see `append`).
    pending: Vec<u8>,
    unsynced: bool,
    last_sync: Instant,
    records_in_log: usize,
    live_hint: usize,
}

impl LogStore {
    /// Opens (creating) `dir`, takes its lock, reads every intact record and compacts the log.
    pub fn open(dir: &Path) -> Result<(LogStore, Loaded), StoreError> {
        let io_err = |source| StoreError::Io {
            dir: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.join("lock"))
            .map_err(io_err)?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(StoreError::Locked {
                dir: dir.to_owned(),
            });
        }
        let _ = (&lock).write_all(format!("{}\n", std::process::id()).as_bytes());

        let path = dir.join(LOG);
        let mut loaded = Loaded::default();
        let mut live: BTreeMap<(String, String), StoredNode> = BTreeMap::new();
        match File::open(&path) {
            Ok(f) => {
                let mut data = Vec::new();
                BufReader::new(f).read_to_end(&mut data).map_err(io_err)?;
                replay(&data, &mut live, &mut loaded.dropped);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        let now = unix_ms();
        live.retain(|_, n| n.expires_unix_ms > now);
        loaded.nodes = live.into_values().collect();

        let file = rewrite(dir, &mut loaded.nodes.iter().cloned()).map_err(io_err)?;
        let store = LogStore {
            dir: dir.to_owned(),
            file,
            _lock: lock,
            buf: Vec::with_capacity(256),
            pending: Vec::with_capacity(64 * 1024),
            unsynced: false,
            last_sync: Instant::now(),
            records_in_log: loaded.nodes.len(),
            live_hint: loaded.nodes.len(),
        };
        Ok((store, loaded))
    }
}

impl LogStore {
    fn flush_pending(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            self.file.write_all(&self.pending)?;
            self.pending.clear();
        }
        Ok(())
    }
}

impl Store for LogStore {
    fn append(&mut self, rec: &StoredRecord) -> io::Result<()> {
        if let StoredRecord::Renew { .. } = rec {
            // Renewals are many and only move a deadline: gather them and write them with one
            // syscall in `commit`, which the writer calls before it replies to anyone.
            encode_frame(rec, &mut self.pending);
        } else {
            // Registrations and deregistrations are written at once, after any renewals
            // gathered before them, so that a failure is reported to the request that caused it.
            self.flush_pending()?;
            self.buf.clear();
            encode_frame(rec, &mut self.buf);
            self.file.write_all(&self.buf)?;
        }
        self.unsynced = true;
        self.records_in_log += 1;
        match rec {
            StoredRecord::Put(_) => self.live_hint += 1,
            StoredRecord::Del { .. } => self.live_hint = self.live_hint.saturating_sub(1),
            StoredRecord::Renew { .. } => {}
        }
        Ok(())
    }

    fn commit(&mut self, durable: bool) -> io::Result<()> {
        self.flush_pending()?;
        if self.unsynced && (durable || self.last_sync.elapsed() >= LAZY_SYNC) {
            self.file.sync_data()?;
            self.unsynced = false;
            self.last_sync = Instant::now();
        }
        Ok(())
    }

    fn wants_compaction(&self) -> bool {
        self.records_in_log >= 10_000 && self.records_in_log >= 4 * self.live_hint
    }

    fn compact(&mut self, nodes: Vec<StoredNode>) -> io::Result<()> {
        self.file = rewrite(&self.dir, &mut nodes.iter().cloned())?;
        // The rewrite holds every lease as it is now: gathered renewals are part of it.
        self.pending.clear();
        self.records_in_log = nodes.len();
        self.live_hint = nodes.len();
        self.unsynced = false;
        Ok(())
    }
}

fn encode_frame(rec: &StoredRecord, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    serde_json::to_writer(&mut *out, rec).expect("a StoredRecord always serializes");
    let payload = &out[start + FRAME_HEADER..];
    let len = (payload.len() as u32).to_le_bytes();
    let crc = crc32fast::hash(payload).to_le_bytes();
    out[start..start + 4].copy_from_slice(&len);
    out[start + 4..start + 8].copy_from_slice(&crc);
}

/// Applies every intact frame of `data` to `live`. A bad frame (wrong CRC, undecodable) is
/// skipped using its length when that length is plausible; a torn tail ends the replay.
fn replay(
    data: &[u8],
    live: &mut BTreeMap<(String, String), StoredNode>,
    dropped: &mut Vec<String>,
) {
    let mut pos = 0;
    while pos < data.len() {
        if data.len() - pos < FRAME_HEADER {
            dropped.push(format!(
                "torn record header at byte {pos} ({} bytes)",
                data.len() - pos
            ));
            break;
        }
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(data[pos + 4..pos + 8].try_into().unwrap());
        let body_start = pos + FRAME_HEADER;
        if len > MAX_RECORD || body_start + len > data.len() {
            match resync(data, pos + 1) {
                Some(next) => {
                    dropped.push(format!(
                        "corrupt record at byte {pos}: skipped {} bytes",
                        next - pos
                    ));
                    pos = next;
                    continue;
                }
                None => {
                    dropped.push(format!(
                        "torn or corrupt tail at byte {pos} ({} bytes)",
                        data.len() - pos
                    ));
                    break;
                }
            }
        }
        let payload = &data[body_start..body_start + len];
        if crc32fast::hash(payload) != crc {
            dropped.push(format!("record at byte {pos} fails its checksum"));
            pos = body_start + len;
            continue;
        }
        match serde_json::from_slice::<StoredRecord>(payload) {
            Ok(StoredRecord::Put(n)) => {
                live.insert((n.role.clone(), n.node.clone()), n);
            }
            Ok(StoredRecord::Renew {
                role,
                node,
                expires_unix_ms,
            }) => {
                if let Some(n) = live.get_mut(&(role, node)) {
                    n.expires_unix_ms = expires_unix_ms;
                }
            }
            Ok(StoredRecord::Del { role, node }) => {
                live.remove(&(role, node));
            }
            Err(e) => dropped.push(format!("record at byte {pos} is unreadable: {e}")),
        }
        pos = body_start + len;
    }
}

/// Finds the next offset from `from` where a whole valid frame starts.
fn resync(data: &[u8], from: usize) -> Option<usize> {
    (from..data.len().saturating_sub(FRAME_HEADER)).find(|&p| {
        let len = u32::from_le_bytes(data[p..p + 4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(data[p + 4..p + 8].try_into().unwrap());
        len > 0 && len <= MAX_RECORD && p + FRAME_HEADER + len <= data.len() && {
            let payload = &data[p + FRAME_HEADER..p + FRAME_HEADER + len];
            crc32fast::hash(payload) == crc
                && serde_json::from_slice::<StoredRecord>(payload).is_ok()
        }
    })
}

/// Writes `nodes` to a new log and atomically puts it in place; returns it open for appending.
fn rewrite(dir: &Path, nodes: &mut dyn Iterator<Item = StoredNode>) -> io::Result<File> {
    let tmp = dir.join(format!("{LOG}.tmp"));
    let mut buf = Vec::new();
    for n in nodes {
        encode_frame(&StoredRecord::Put(n), &mut buf);
    }
    let mut f = File::create(&tmp)?;
    f.write_all(&buf)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(LOG))?;
    File::open(dir)?.sync_all()?;
    OpenOptions::new().append(true).open(dir.join(LOG))
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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

    #[test]
    fn survives_reopen_and_skips_deleted_and_expired() {
        let dir = tempfile::tempdir().unwrap();
        let far = unix_ms() + 60_000;
        {
            let (mut s, l) = LogStore::open(dir.path()).unwrap();
            assert!(l.nodes.is_empty());
            s.append(&StoredRecord::Put(node("a", far))).unwrap();
            s.append(&StoredRecord::Put(node("b", far))).unwrap();
            s.append(&StoredRecord::Put(node("old", 1))).unwrap();
            s.append(&StoredRecord::Del {
                role: "app".into(),
                node: "b".into(),
            })
            .unwrap();
            s.commit(true).unwrap();
        }
        let (_s, l) = LogStore::open(dir.path()).unwrap();
        let names: Vec<_> = l.nodes.iter().map(|n| n.node.as_str()).collect();
        assert_eq!(names, ["a"]);
        assert!(l.dropped.is_empty());
    }

    #[test]
    fn gathered_renewals_reach_the_file_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let far = unix_ms() + 60_000;
        {
            let (mut s, _) = LogStore::open(dir.path()).unwrap();
            s.append(&StoredRecord::Put(node("a", far))).unwrap();
            s.commit(true).unwrap();
            for i in 1..=100 {
                s.append(&StoredRecord::Renew {
                    role: "app".into(),
                    node: "a".into(),
                    expires_unix_ms: far + i,
                })
                .unwrap();
            }
            // A registration after gathered renewals keeps the order in the file.
            s.append(&StoredRecord::Put(node("b", far))).unwrap();
            s.append(&StoredRecord::Renew {
                role: "app".into(),
                node: "a".into(),
                expires_unix_ms: far + 500,
            })
            .unwrap();
            s.commit(false).unwrap(); // written to the OS (no fsync): survives a process crash
        }
        let (_s, l) = LogStore::open(dir.path()).unwrap();
        let a = l.nodes.iter().find(|n| n.node == "a").unwrap();
        assert_eq!(a.expires_unix_ms, far + 500);
        assert!(l.nodes.iter().any(|n| n.node == "b"));
    }

    #[test]
    fn second_open_is_refused_while_locked() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, _) = LogStore::open(dir.path()).unwrap();
        let err = LogStore::open(dir.path())
            .err()
            .expect("second open must fail");
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    }

    #[test]
    fn torn_tail_and_garbage_keep_intact_records() {
        let dir = tempfile::tempdir().unwrap();
        let far = unix_ms() + 60_000;
        {
            let (mut s, _) = LogStore::open(dir.path()).unwrap();
            for i in 0..5 {
                s.append(&StoredRecord::Put(node(&format!("n{i}"), far)))
                    .unwrap();
            }
            s.commit(true).unwrap();
        }
        // Corrupt the middle record's payload, and append a torn frame plus garbage.
        let path = dir.path().join(LOG);
        let mut data = std::fs::read(&path).unwrap();
        let frame = data.len() / 5;
        data[2 * frame + 20] ^= 0xff;
        let mut torn = Vec::new();
        encode_frame(&StoredRecord::Put(node("torn", far)), &mut torn);
        data.extend_from_slice(&torn[..torn.len() / 2]);
        std::fs::write(&path, &data).unwrap();

        let (_s, l) = LogStore::open(dir.path()).unwrap();
        let names: Vec<_> = l.nodes.iter().map(|n| n.node.as_str()).collect();
        assert_eq!(names, ["n0", "n1", "n3", "n4"]);
        assert_eq!(l.dropped.len(), 2, "{:?}", l.dropped);
    }
}

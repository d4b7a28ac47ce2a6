//! The Raft log, the vote and the committed log id, in their own SQLite file (`raft.db`).
//!
//! # Correctness requirements (from openraft's `RaftLogStorage`) and how they are met
//!
//! - `append` returns at once and reports completion through its callback only after the
//!   entries are durable. The entries go into an in-memory cache (readable the moment `append`
//!   returns) and to one writer thread, which commits everything queued since its last commit
//!   as one SQLite transaction in WAL mode with `synchronous=FULL` (`COMMIT` returns after the
//!   WAL is fsync'd) and then calls the callbacks in order. So the Raft core never waits for
//!   the disk: the leader replicates an entry while its own fsync runs, and appends that
//!   arrive during an fsync share the next one.
//! - Write IO is serialised: every write (append, vote, truncate, purge, committed hint) goes
//!   through the writer's one FIFO queue; `save_vote`, `truncate_after` and `purge` wait for
//!   their turn to be committed before returning (the vote is durable before it returns).
//! - The committed log id is only a hint for faster recovery (the state machine persists its
//!   own applied id): `save_committed` queues it without waiting; it is written in the
//!   writer's next transaction, and alone it is committed with `synchronous=NORMAL` (no fsync
//!   of its own, made durable by the next append or vote).
//! - Reads are atomic and never miss an appended entry: a reader takes what the cache holds,
//!   then reads the rest in one SQLite read transaction on its own connection. An entry
//!   leaves the cache only after the transaction holding it committed, and truncation/purge
//!   drop cache entries before returning, so an entry is always in one of the two.
//! - Failures of the environment (`db::failure`): on a full disk the writer holds what it took
//!   and tries the same transaction again with back-off, answering nothing meanwhile (openraft
//!   waits for the flush, the node reports the stall), and goes on when space returns; an I/O
//!   error (a failed fsync) ends the process; a corrupt file is an error (the node stops).
//!
//! - The node's incarnation (a random `u64`, [`Incarnation`]) is written to `meta` in the same
//!   transaction as its first vote, so a node that ever voted has one, and a node whose disk
//!   was wiped has none until it votes again under a new one. A log written by a release
//!   without incarnations (a vote but no incarnation) gets one when it is opened.
//!
//! The cache keeps the newest entries (at most [`CACHE_BYTES`], or `log_cache_mib`, of encoded
//! entries once they are flushed), so replication to followers and apply read recent entries from memory
//! instead of decoding them back from SQLite.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;

use super::{Entry, LogId, TypeConfig, Vote, io_err};
use crate::db::failure::{self, Failure};
use crate::metrics::Stall;

/// Encoded bytes of flushed entries kept in memory for readers, unless configured
/// (`log_cache_mib`).
pub const CACHE_BYTES: usize = 64 << 20;

/// SQLite-backed Raft log. Cloning shares the cache, the writer and the reader connection.
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
    writer: mpsc::Sender<Op>,
}

struct Shared {
    /// Entries appended and not yet evicted (all unflushed ones, plus recent flushed ones).
    cache: Mutex<BTreeMap<u64, Entry>>,
    /// The last saved vote (it is also on disk before `save_vote` returns).
    vote: Mutex<Option<Vote>>,
    /// Connection for reads (WAL: readers never block the writer).
    reader: Mutex<Connection>,
    stats: Arc<LogStats>,
    /// The highest entry stamp (`Command::Stamped`) appended or found at open.
    stamp_floor: Arc<AtomicI64>,
    incarnation: Arc<Incarnation>,
}

/// This node's incarnation: a random `u64` naming one life of its Raft log. It is stored with
/// the first vote; until then the node is *blank* and [`Incarnation::value`] is the candidate
/// the next vote stores (a node restarted before it ever voted draws a new one).
#[derive(Debug)]
pub struct Incarnation {
    value: u64,
    stored: std::sync::atomic::AtomicBool,
}

impl Incarnation {
    /// The incarnation (stored, or the candidate of a blank node).
    pub fn value(&self) -> u64 {
        self.value
    }

    /// True while no vote (and so no incarnation) is stored: the node has never voted, or its
    /// disk was wiped.
    pub fn is_blank(&self) -> bool {
        !self.stored.load(Ordering::Acquire)
    }
}

/// A fresh incarnation: random, never 0 (0 reads as "none" in logs).
fn new_incarnation() -> u64 {
    rand::random::<u64>().max(1)
}

/// Counters for `/status` and `/metrics`: entries per append shows how well writes share
/// fsyncs (group commit).
#[derive(Default, Debug)]
pub struct LogStats {
    /// Durable appends, i.e. log fsyncs.
    pub appends: AtomicU64,
    /// Entries written by those appends.
    pub entries: AtomicU64,
    /// Microseconds the writer spent in those transactions (insert + fsync), in all.
    pub write_us: AtomicU64,
    /// Writes held by a full disk (or another failure to wait out), if they are.
    pub stall: Stall,
}

/// One write, in the writer's queue.
enum Op {
    Append {
        entries: Vec<Entry>,
        callback: IOFlushed<TypeConfig>,
    },
    Committed(Vec<u8>),
    Vote(Vec<u8>, oneshot::Sender<std::io::Result<()>>),
    Truncate(i64, oneshot::Sender<std::io::Result<()>>),
    Purge(i64, Vec<u8>, oneshot::Sender<std::io::Result<()>>),
}

/// `synchronous` of appends, votes, truncations and purges: FULL (an fsync before the call
/// completes). The `unsafe-no-fsync` feature (fault-suite builds only, never shipped) turns it
/// OFF, so the power-cut schedules can show they catch a log that does not reach the disk.
#[cfg(not(feature = "unsafe-no-fsync"))]
const DURABLE: &str = "FULL";
#[cfg(feature = "unsafe-no-fsync")]
const DURABLE: &str = "OFF";

fn encode<T: Serialize>(v: &T) -> std::io::Result<Vec<u8>> {
    postcard::to_allocvec(v).map_err(io_err)
}

fn to_sql_err(e: std::io::Error) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(Box::new(e))
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> std::io::Result<T> {
    postcard::from_bytes(b).map_err(|e| io_err(format!("undecodable raft log record: {e}")))
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS log (idx INTEGER PRIMARY KEY, log_id BLOB NOT NULL, entry BLOB NOT NULL);
     CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);";

/// Creates the log of a node whose database was rebuilt from a backup (`cairn restore`): empty,
/// purged through `last` (the restored index, so a joining node gets a snapshot), with a vote
/// for `id` in `last`'s term so that its first election moves to a later term.
pub fn start_after(path: &Path, last: LogId, id: super::NodeId) -> anyhow::Result<()> {
    let conn = Connection::open(path)?;
    conn.execute_batch(SCHEMA)?;
    let vote = Vote::new(last.leader_id.term, id);
    let tx = conn.unchecked_transaction()?;
    for (k, v) in [
        ("last_purged", encode(&last)?),
        ("committed", encode(&Some(last))?),
        ("vote", encode(&vote)?),
    ] {
        tx.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES(?1, ?2)",
            params![k, v],
        )?;
    }
    tx.commit()?;
    Ok(())
}

fn note_stamp(floor: &AtomicI64, e: &Entry) {
    if let openraft::EntryPayload::Normal(c) = &e.payload
        && let Some(s) = c.entry_stamp_ms()
    {
        floor.fetch_max(s, Ordering::Relaxed);
    }
}

impl LogStore {
    /// Opens (creating if needed) the log database at `path` and starts its writer thread
    /// (which ends when the last clone is dropped), caching [`CACHE_BYTES`].
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Self::open_with_cache(path, CACHE_BYTES)
    }

    /// Like [`LogStore::open`], keeping at most `cache_bytes` of flushed entries in memory.
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> anyhow::Result<Self> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", DURABLE)?;
        #[cfg(feature = "unsafe-no-fsync")]
        tracing::warn!("built with unsafe-no-fsync: the Raft log is never fsync'd (tests only)");
        conn.pragma_update(None, "journal_size_limit", crate::db::WAL_SIZE_LIMIT)?;
        conn.execute_batch(SCHEMA)?;
        super::log_format::migrate_local(&conn, path)?;
        let vote: Option<Vote> = conn
            .query_row("SELECT value FROM meta WHERE key = 'vote'", [], |r| {
                r.get::<_, Vec<u8>>(0)
            })
            .optional()?
            .map(|b| decode(&b))
            .transpose()?;
        let last: Option<Vec<u8>> = conn
            .query_row("SELECT entry FROM log ORDER BY idx DESC LIMIT 1", [], |r| {
                r.get(0)
            })
            .optional()?;
        let stored: Option<Vec<u8>> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'incarnation'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        let incarnation = match stored.map(|b| decode::<u64>(&b)).transpose()? {
            Some(value) => Incarnation {
                value,
                stored: true.into(),
            },
            // Written by a release without incarnations: the node voted, so it gets one now
            // (the only node-local migration here).
            None if vote.is_some() => {
                let value = new_incarnation();
                conn.execute(
                    "INSERT INTO meta(key, value) VALUES('incarnation', ?1)",
                    [encode(&value)?],
                )?;
                tracing::info!(
                    incarnation = value,
                    "Raft log without an incarnation: one stored"
                );
                Incarnation {
                    value,
                    stored: true.into(),
                }
            }
            None => Incarnation {
                value: new_incarnation(),
                stored: false.into(),
            },
        };
        let stamp_floor = Arc::new(AtomicI64::new(0));
        if let Some(b) = last {
            note_stamp(&stamp_floor, &decode::<Entry>(&b)?);
        }
        let reader = Connection::open(path)?;
        let shared = Arc::new(Shared {
            stamp_floor,
            incarnation: Arc::new(incarnation),
            cache: Mutex::default(),
            vote: Mutex::new(vote),
            reader: Mutex::new(reader),
            stats: Arc::default(),
        });
        let (tx, rx) = mpsc::channel();
        let s = shared.clone();
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || {
                let writer = Writer::new(conn, s, cache_bytes);
                // A writer that panicked would leave openraft a log that answers nothing: end
                // the process instead, so that it restarts from what is durable.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| writer.run(rx)))
                    .is_err()
                {
                    tracing::error!("FATAL: the Raft log writer panicked; exiting");
                    std::process::exit(70);
                }
            })?;
        Ok(LogStore { shared, writer: tx })
    }

    /// The highest entry stamp in this log (Unix ms, 0 if none), kept current by `append`:
    /// a new leader's log holds every committed entry, so stamping above it keeps time in the
    /// log monotonic across leader changes (`raft::proposer`).
    pub fn stamp_floor(&self) -> Arc<AtomicI64> {
        self.shared.stamp_floor.clone()
    }

    /// This node's incarnation (stored with its first vote).
    pub fn incarnation(&self) -> Arc<Incarnation> {
        self.shared.incarnation.clone()
    }

    /// The store's counters (shared with every clone).
    pub fn stats(&self) -> Arc<LogStats> {
        self.shared.stats.clone()
    }

    fn send(&self, op: Op) -> std::io::Result<()> {
        self.writer
            .send(op)
            .map_err(|_| io_err("raft log writer stopped"))
    }

    /// Queues `op` (built around a reply channel) and waits until it is committed.
    async fn write_and_wait(
        &self,
        op: impl FnOnce(oneshot::Sender<std::io::Result<()>>) -> Op,
    ) -> std::io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(op(tx))?;
        rx.await.map_err(|_| io_err("raft log writer stopped"))?
    }

    async fn with_reader<T, F>(&self, f: F) -> std::io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = shared
                .reader
                .lock()
                .map_err(|_| io_err("log reader mutex poisoned"))?;
            f(&mut guard).map_err(io_err)
        })
        .await
        .map_err(io_err)?
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.shared.cache.lock().expect("log cache")
    }
}

/// The writer thread: drains the queue, commits what it took as one transaction, then
/// answers (callbacks in order) and evicts flushed entries beyond the cache budget.
struct Writer {
    conn: Connection,
    shared: Arc<Shared>,
    /// Flushed entries still in the cache, oldest first, with their encoded size.
    flushed: VecDeque<(LogId, usize)>,
    flushed_bytes: usize,
    budget: usize,
    /// The connection's `synchronous` is `FULL` (else `NORMAL`).
    sync_full: bool,
}

impl Writer {
    fn new(conn: Connection, shared: Arc<Shared>, budget: usize) -> Self {
        Writer {
            conn,
            shared,
            flushed: VecDeque::new(),
            flushed_bytes: 0,
            budget,
            sync_full: true,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Op>) {
        while let Ok(first) = rx.recv() {
            let mut ops = vec![first];
            while let Ok(op) = rx.try_recv() {
                ops.push(op);
            }
            self.commit(ops);
        }
    }

    /// Commits `ops` as one transaction, then answers them. A full disk (or another failure
    /// that `db::failure` says to hold) is retried with back-off until it succeeds, and never
    /// reported to openraft, which treats every storage error as fatal; an I/O error ends the
    /// process; a corrupt file is reported (openraft stops the node).
    fn commit(&mut self, ops: Vec<Op>) {
        let started = std::time::Instant::now();
        let res = loop {
            let mut written: Vec<(LogId, usize)> = Vec::new();
            match self.write(&ops, &mut written) {
                Ok(()) => {
                    self.shared.stats.stall.clear("raft log write");
                    break Ok(written);
                }
                Err(e) => match failure::classify(&e) {
                    Failure::Hold => {
                        let wait = self
                            .shared
                            .stats
                            .stall
                            .hold("raft log write", &failure::describe(&e));
                        std::thread::sleep(wait);
                    }
                    Failure::Exit => super::exit_on_io_error("raft log write", &e),
                    Failure::Corrupt => break Err(super::corrupt("raft log", &e)),
                    Failure::Other => break Err(io_err(e)),
                },
            }
        };
        if let Ok(written) = &res
            && !written.is_empty()
        {
            let stats = &self.shared.stats;
            stats.appends.fetch_add(1, Ordering::Relaxed);
            stats
                .entries
                .fetch_add(written.len() as u64, Ordering::Relaxed);
            stats
                .write_us
                .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        let res = res.map(|written| self.evict(written));
        for op in ops {
            let r = match &res {
                Ok(()) => Ok(()),
                Err(e) => Err(io_err(e)),
            };
            match op {
                Op::Append { callback, .. } => callback.io_completed(r),
                Op::Committed(_) => {}
                Op::Vote(_, reply) | Op::Truncate(_, reply) | Op::Purge(_, _, reply) => {
                    let _ = reply.send(r);
                }
            }
        }
    }

    /// One try at writing `ops` in one transaction (rolled back on error).
    fn write(&mut self, ops: &[Op], written: &mut Vec<(LogId, usize)>) -> rusqlite::Result<()> {
        // Only committed-index hints: no fsync needed.
        let durable = ops.iter().any(|op| !matches!(op, Op::Committed(_)));
        if durable != self.sync_full {
            let mode = if durable { DURABLE } else { "NORMAL" };
            self.conn.pragma_update(None, "synchronous", mode)?;
            self.sync_full = durable;
        }
        let tx = self.conn.transaction()?;
        for op in ops {
            match op {
                Op::Append { entries, .. } => {
                    let mut st = tx.prepare_cached(
                        "INSERT OR REPLACE INTO log(idx, log_id, entry) VALUES(?1, ?2, ?3)",
                    )?;
                    for e in entries {
                        let body = encode(e).map_err(to_sql_err)?;
                        let id = encode(&e.log_id).map_err(to_sql_err)?;
                        st.execute(params![e.log_id.index as i64, id, &body])?;
                        written.push((e.log_id, body.len()));
                    }
                }
                Op::Committed(b) => {
                    tx.execute(
                        "INSERT OR REPLACE INTO meta(key, value) VALUES('committed', ?1)",
                        [b],
                    )?;
                }
                Op::Vote(b, _) => {
                    tx.execute(
                        "INSERT OR REPLACE INTO meta(key, value) VALUES('vote', ?1)",
                        [b],
                    )?;
                    // The first vote stores the incarnation, in the same transaction.
                    let inc = &self.shared.incarnation;
                    if inc.is_blank() {
                        tx.execute(
                            "INSERT OR IGNORE INTO meta(key, value) VALUES('incarnation', ?1)",
                            [encode(&inc.value).map_err(to_sql_err)?],
                        )?;
                    }
                }
                Op::Truncate(after, _) => {
                    tx.execute("DELETE FROM log WHERE idx > ?1", [after])?;
                }
                Op::Purge(upto, b, _) => {
                    tx.execute(
                        "INSERT OR REPLACE INTO meta(key, value) VALUES('last_purged', ?1)",
                        [b],
                    )?;
                    tx.execute("DELETE FROM log WHERE idx <= ?1", [upto])?;
                }
            }
        }
        // synchronous=FULL: returns after the WAL is fsync'd.
        tx.commit()?;
        if ops.iter().any(|op| matches!(op, Op::Vote(..))) {
            self.shared
                .incarnation
                .stored
                .store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Drops the oldest flushed entries from the cache beyond the budget. An entry is only
    /// dropped if the cache still holds that very entry (not a later one at the same index).
    fn evict(&mut self, written: Vec<(LogId, usize)>) {
        for w in written {
            self.flushed_bytes += w.1;
            self.flushed.push_back(w);
        }
        if self.flushed_bytes <= self.budget {
            return;
        }
        let mut cache = self.shared.cache.lock().expect("log cache");
        while self.flushed_bytes > self.budget {
            let Some((id, size)) = self.flushed.pop_front() else {
                break;
            };
            self.flushed_bytes -= size;
            if cache.get(&id.index).is_some_and(|e| e.log_id == id) {
                cache.remove(&id.index);
            }
        }
    }
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let lo = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let hi = match range.end_bound() {
        Bound::Included(&e) => e,
        Bound::Excluded(&e) => {
            if e == 0 {
                return (1, 0);
            }
            e - 1
        }
        Bound::Unbounded => i64::MAX as u64,
    };
    (lo.min(i64::MAX as u64), hi.min(i64::MAX as u64))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, std::io::Error> {
        let (lo, hi) = bounds(&range);
        if lo > hi {
            return Ok(Vec::new());
        }
        // The cache first: an entry missing from it at the low end was flushed before it
        // was evicted, so SQLite (read after this) has it.
        let cached: Vec<Entry> = self
            .cache()
            .range(lo..=hi)
            .map(|(_, e)| e.clone())
            .collect();
        let from_cache = cached.first().map(|e| e.log_id.index);
        if from_cache == Some(lo) {
            return Ok(cached);
        }
        // Below the first cached index (or everything, if nothing is cached) comes from disk.
        let disk_hi = from_cache.map(|i| i as i64 - 1).unwrap_or(hi as i64);
        let raws: Vec<Vec<u8>> = self
            .with_reader(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT entry FROM log WHERE idx >= ?1 AND idx <= ?2 ORDER BY idx",
                )?;
                let rows = st.query_map(params![lo as i64, disk_hi], |r| r.get::<_, Vec<u8>>(0))?;
                rows.collect()
            })
            .await?;
        let mut out = raws
            .iter()
            .map(|b| decode::<Entry>(b))
            .collect::<std::io::Result<Vec<_>>>()?;
        out.extend(cached);
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, std::io::Error> {
        Ok(*self.shared.vote.lock().expect("vote"))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, std::io::Error> {
        let (last_purged, last_raw) = self
            .with_reader(|c| {
                let purged: Option<Vec<u8>> = c
                    .query_row(
                        "SELECT value FROM meta WHERE key = 'last_purged'",
                        [],
                        |r| r.get(0),
                    )
                    .optional()?;
                let last: Option<Vec<u8>> = c
                    .query_row(
                        "SELECT log_id FROM log ORDER BY idx DESC LIMIT 1",
                        [],
                        |r| r.get(0),
                    )
                    .optional()?;
                Ok((purged, last))
            })
            .await?;
        let last_purged: Option<LogId> = last_purged.map(|b| decode(&b)).transpose()?;
        let cached_last = self.cache().last_key_value().map(|(_, e)| e.log_id);
        let last_log_id = match (cached_last, last_raw) {
            (Some(c), _) => Some(c),
            (None, Some(b)) => Some(decode::<LogId>(&b)?),
            (None, None) => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), std::io::Error> {
        let b = encode(vote)?;
        self.write_and_wait(|tx| Op::Vote(b, tx)).await?;
        *self.shared.vote.lock().expect("vote") = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), std::io::Error> {
        // A hint only: queued, not waited for.
        self.send(Op::Committed(encode(&committed)?))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, std::io::Error> {
        let raw: Option<Vec<u8>> = self
            .with_reader(|c| {
                c.query_row("SELECT value FROM meta WHERE key = 'committed'", [], |r| {
                    r.get(0)
                })
                .optional()
            })
            .await?;
        Ok(raw
            .map(|b| decode::<Option<LogId>>(&b))
            .transpose()?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), std::io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        {
            let mut cache = self.cache();
            for e in &entries {
                note_stamp(&self.shared.stamp_floor, e);
                cache.insert(e.log_id.index, e.clone());
            }
        }
        self.send(Op::Append { entries, callback })
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), std::io::Error> {
        let after = last_log_id.map(|l| l.index as i64).unwrap_or(-1);
        {
            let mut cache = self.cache();
            let keep_to = (after + 1).max(0) as u64;
            drop(cache.split_off(&keep_to));
        }
        self.write_and_wait(|tx| Op::Truncate(after, tx)).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), std::io::Error> {
        let b = encode(&log_id)?;
        let upto = log_id.index as i64;
        {
            let mut cache = self.cache();
            let rest = cache.split_off(&(log_id.index + 1));
            *cache = rest;
        }
        self.write_and_wait(|tx| Op::Purge(upto, b, tx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored_incarnation(path: &Path) -> Option<u64> {
        let c = Connection::open(path).unwrap();
        c.query_row(
            "SELECT value FROM meta WHERE key = 'incarnation'",
            [],
            |r| r.get::<_, Vec<u8>>(0),
        )
        .optional()
        .unwrap()
        .map(|b| decode(&b).unwrap())
    }

    /// A blank log has only a candidate incarnation; the first vote stores it in its own
    /// transaction, and it survives a restart. A log written before incarnations (a vote, no
    /// incarnation) gets one when opened.
    #[tokio::test]
    async fn test_incarnation_stored_with_first_vote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.db");
        let mut store = LogStore::open(&path).unwrap();
        let inc = store.incarnation();
        assert!(inc.is_blank());
        assert_eq!(stored_incarnation(&path), None, "not before the first vote");
        store.save_vote(&Vote::new(1, 1)).await.unwrap();
        assert!(!inc.is_blank());
        assert_eq!(stored_incarnation(&path), Some(inc.value()));
        store.save_vote(&Vote::new(2, 1)).await.unwrap();
        let value = inc.value();
        drop(store);
        let store = LogStore::open(&path).unwrap();
        assert_eq!(store.incarnation().value(), value, "kept across a restart");
        assert!(!store.incarnation().is_blank());
        drop(store);

        // A wiped disk: a new candidate, blank again.
        std::fs::remove_dir_all(dir.path()).unwrap();
        std::fs::create_dir_all(dir.path()).unwrap();
        let store = LogStore::open(&path).unwrap();
        assert!(store.incarnation().is_blank());
        assert_ne!(store.incarnation().value(), value);
        drop(store);

        // Written by a release without incarnations.
        let old = dir.path().join("old.db");
        let last = LogId::new(
            openraft::impls::leader_id_adv::LeaderId {
                term: 3,
                node_id: 1,
            },
            9,
        );
        start_after(&old, last, 1).unwrap();
        let store = LogStore::open(&old).unwrap();
        assert!(!store.incarnation().is_blank());
        assert_eq!(stored_incarnation(&old), Some(store.incarnation().value()));
    }
}

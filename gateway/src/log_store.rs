//! The Raft log, the vote and the committed log id, in their own SQLite file (`raft.db`).
//!
//! # Correctness requirements (from openraft's `RaftLogStorage`) and how they are met
//!
//! - `append` reports completion only after the entries are durable: every append is one
//!   SQLite transaction in WAL mode with `synchronous=FULL`, so `COMMIT` returns after the WAL
//!   is fsync'd; the callback runs after that. Entries are readable as soon as `append` returns.
//! - `save_vote` is durable before it returns (same mechanism).
//! - The committed log id is only a hint for faster recovery (the state machine persists its
//!   own applied id), so it is written with `synchronous=NORMAL`: no fsync of its own, made
//!   durable by the next append or vote.
//! - Reads are atomic: each read runs in one SQLite read transaction.
//!
//! All SQLite work happens on tokio's blocking pool; a connection is shared behind a mutex
//! because openraft drives the log from one task at a time anyway.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::raft_types::{Entry, LogId, TypeConfig, Vote, io_err};

/// SQLite-backed Raft log. Cloning shares the same database connection.
#[derive(Clone)]
pub struct LogStore {
    conn: Arc<Mutex<Connection>>,
    stats: Arc<LogStats>,
}

/// Counters for `/status` and `/metrics`: entries per append shows how well writes share
/// fsyncs (group commit).
#[derive(Default, Debug)]
pub struct LogStats {
    /// Durable appends, i.e. log fsyncs.
    pub appends: AtomicU64,
    /// Entries written by those appends.
    pub entries: AtomicU64,
}

fn encode<T: Serialize>(v: &T) -> std::io::Result<Vec<u8>> {
    postcard::to_allocvec(v).map_err(io_err)
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> std::io::Result<T> {
    postcard::from_bytes(b).map_err(|e| io_err(format!("undecodable raft log record: {e}")))
}

impl LogStore {
    /// Opens (creating if needed) the log database at `path`.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS log (idx INTEGER PRIMARY KEY, log_id BLOB NOT NULL, entry BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);",
        )?;
        Ok(LogStore {
            conn: Arc::new(Mutex::new(conn)),
            stats: Arc::default(),
        })
    }

    /// The store's counters (shared with every clone).
    pub fn stats(&self) -> Arc<LogStats> {
        self.stats.clone()
    }

    async fn with_conn<T, F>(&self, f: F) -> std::io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| io_err("log store mutex poisoned"))?;
            f(&mut guard).map_err(io_err)
        })
        .await
        .map_err(io_err)?
    }

    async fn get_meta<T: DeserializeOwned + Send + 'static>(
        &self,
        key: &'static str,
    ) -> std::io::Result<Option<T>> {
        let raw: Option<Vec<u8>> = self
            .with_conn(move |c| {
                c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                    .optional()
            })
            .await?;
        raw.map(|b| decode(&b)).transpose()
    }
}

fn bounds(range: &impl RangeBounds<u64>) -> (i64, i64) {
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
    (
        lo.min(i64::MAX as u64) as i64,
        hi.min(i64::MAX as u64) as i64,
    )
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
        let raws: Vec<Vec<u8>> = self
            .with_conn(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT entry FROM log WHERE idx >= ?1 AND idx <= ?2 ORDER BY idx",
                )?;
                let rows = st.query_map(params![lo, hi], |r| r.get::<_, Vec<u8>>(0))?;
                rows.collect()
            })
            .await?;
        raws.iter().map(|b| decode(b)).collect()
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, std::io::Error> {
        self.get_meta("vote").await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, std::io::Error> {
        let last_purged: Option<LogId> = self.get_meta("last_purged").await?;
        let last_raw: Option<Vec<u8>> = self
            .with_conn(|c| {
                c.query_row(
                    "SELECT log_id FROM log ORDER BY idx DESC LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .optional()
            })
            .await?;
        let last_log_id = match last_raw {
            Some(b) => Some(decode::<LogId>(&b)?),
            None => last_purged,
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
        self.with_conn(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES('vote', ?1)",
                [b],
            )
            .map(drop)
        })
        .await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), std::io::Error> {
        let b = encode(&committed)?;
        self.with_conn(move |c| {
            // A hint only: skip the fsync, the next FULL commit makes it durable.
            c.pragma_update(None, "synchronous", "NORMAL")?;
            let r = c.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES('committed', ?1)",
                [b],
            );
            c.pragma_update(None, "synchronous", "FULL")?;
            r.map(drop)
        })
        .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, std::io::Error> {
        Ok(self.get_meta::<Option<LogId>>("committed").await?.flatten())
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
        let rows = entries
            .into_iter()
            .map(|e| Ok((e.log_id.index as i64, encode(&e.log_id)?, encode(&e)?)))
            .collect::<std::io::Result<Vec<_>>>()?;
        let n = rows.len();
        let res = self
            .with_conn(move |c| {
                let tx = c.transaction()?;
                {
                    let mut st = tx.prepare_cached(
                        "INSERT OR REPLACE INTO log(idx, log_id, entry) VALUES(?1, ?2, ?3)",
                    )?;
                    for (idx, id, e) in &rows {
                        st.execute(params![idx, id, e])?;
                    }
                }
                // synchronous=FULL: returns after the WAL is fsync'd.
                tx.commit()
            })
            .await;
        match res {
            Ok(()) => {
                self.stats.appends.fetch_add(1, Ordering::Relaxed);
                self.stats.entries.fetch_add(n as u64, Ordering::Relaxed);
                callback.io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.io_completed(Err(io_err(&e)));
                Err(e)
            }
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), std::io::Error> {
        let after = last_log_id.map(|l| l.index as i64).unwrap_or(-1);
        self.with_conn(move |c| {
            c.execute("DELETE FROM log WHERE idx > ?1", [after])
                .map(drop)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), std::io::Error> {
        let b = encode(&log_id)?;
        let upto = log_id.index as i64;
        self.with_conn(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES('last_purged', ?1)",
                [b],
            )?;
            tx.execute("DELETE FROM log WHERE idx <= ?1", [upto])?;
            tx.commit()
        })
        .await
    }
}

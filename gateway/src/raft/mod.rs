//! Raft: openraft's type configuration, the log store, the state machine and its snapshots,
//! both halves of the RPC transport, and the one proposer every write goes through.
//!
//! - [`log_store`]: the log, the vote and the committed id in their own SQLite file.
//! - [`state_machine`]: applying entries to the replicated database; snapshots.
//! - [`network`]: Raft RPCs between gateways, client and server, plus the pooled HTTP client.
//! - [`incarnation`]: which incarnation of which node an RPC is meant for (a wiped node
//!   cannot vote).
//! - [`recover`]: `cairn recover` and rqlite's `peers.json` after a lost majority.
//! - [`proposer`]: the bounded, pipelined queue in front of `client_write_many`.

pub mod incarnation;
pub mod log_format;
pub mod log_store;
pub mod network;
pub mod proposer;
pub mod recover;
pub mod state_machine;

use std::fmt;
use std::io::Write as _;

use openraft::errors::{ClientWriteError, Fatal, LinearizableReadError, RaftError};
use serde::{Deserialize, Serialize};

use crate::command::{Command, CommandResponse};
use crate::error::Error;

/// A gateway as Raft membership records it: where to reach its Raft RPCs and its HTTP API.
///
/// The HTTP address is kept in the membership so that any node can forward a write to the
/// leader's API without a separate lookup.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Peer {
    /// `host:port` of the Raft transport (`--raft-addr`).
    pub raft_addr: String,
    /// `host:port` of the HTTP API (`--http-addr`).
    pub http_addr: String,
    /// `host:port` of the device port (`--device-addr`), sent to devices as the leader hint.
    #[serde(default)]
    pub device_addr: String,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} http={}", self.raft_addr, self.http_addr)
    }
}

openraft::declare_raft_types!(
    /// Cairn's Raft types: `u64` node ids, [`Peer`] addresses, [`Command`] entries.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        Node = Peer,
);

pub type NodeId = u64;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Raft = openraft::Raft<TypeConfig, state_machine::StateMachine>;

/// Bytes the Raft log holds in `raft.db`: its pages in use (free pages, left by purges, are
/// reused by later appends).
fn log_bytes(path: &std::path::Path) -> rusqlite::Result<u64> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.query_row(
        "SELECT (p.page_count - f.freelist_count) * s.page_size \
         FROM pragma_page_count p, pragma_freelist_count f, pragma_page_size s",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|b| b.max(0) as u64)
}

/// The highest index at or below `snapshot` whose purge leaves at most `keep` bytes of entries
/// between it and `snapshot` (the newest entries behind the snapshot stay, oldest go first);
/// `None` when what is there already fits.
fn purge_point(path: &std::path::Path, snapshot: u64, keep: u64) -> rusqlite::Result<Option<u64>> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut stmt =
        conn.prepare("SELECT idx, length(entry) FROM log WHERE idx <= ?1 ORDER BY idx DESC")?;
    let mut rows = stmt.query([snapshot as i64])?;
    let mut kept = 0u64;
    while let Some(row) = rows.next()? {
        kept += row.get::<_, i64>(1)?.max(0) as u64;
        if kept > keep {
            return Ok(Some(row.get::<_, i64>(0)?.max(0) as u64));
        }
    }
    Ok(None)
}

/// Keeps the Raft log within `limit` bytes: asks for a snapshot whenever the log at `log_path`
/// holds more than `limit` and something was applied since the last snapshot (openraft's own
/// policy counts entries only, and an entry can be one device record or a megabyte of them),
/// and once a snapshot is taken purges the entries it covers down to half of `limit`
/// (openraft keeps `snapshot_keep_logs` entries behind a snapshot, which at full ingest is
/// several times `limit`; a follower further behind than what is kept gets the snapshot). A
/// snapshot costs a durable commit (the database is the snapshot). Runs until Raft stops.
pub async fn snapshot_on_log_size(raft: Raft, log_path: std::path::PathBuf, limit: u64) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut asked: Option<(tokio::time::Instant, Option<u64>)> = None;
    let mut purged: Option<u64> = None;
    let keep = limit / 2;
    loop {
        tick.tick().await;
        let path = log_path.clone();
        let Ok(Ok(bytes)) = tokio::task::spawn_blocking(move || log_bytes(&path)).await else {
            continue;
        };
        let m = openraft::async_runtime::WatchReceiver::borrow_watched(&raft.metrics()).clone();
        let snapshot = m.snapshot.as_ref().map(|l| l.index);
        let applied = m.last_applied.as_ref().map(|l| l.index);
        if let Some(snap) = snapshot.filter(|s| bytes > keep && purged < Some(*s)) {
            let path = log_path.clone();
            if let Ok(Ok(Some(upto))) =
                tokio::task::spawn_blocking(move || purge_point(&path, snap, keep)).await
            {
                tracing::debug!(
                    log_bytes = bytes,
                    upto,
                    "Raft log behind the snapshot over its size: purge"
                );
                if raft.trigger().purge_log(upto).await.is_err() {
                    return;
                }
            }
            purged = Some(snap);
        }
        if bytes <= limit {
            continue;
        }
        // Nothing new to snapshot, or the last request has not been served yet.
        let pending = asked.is_some_and(|(at, s)| {
            s == snapshot && at.elapsed() < std::time::Duration::from_secs(5)
        });
        if applied <= snapshot || pending {
            continue;
        }
        tracing::info!(log_bytes = bytes, limit, "Raft log over its size: snapshot");
        if raft.trigger().snapshot().await.is_err() {
            return;
        }
        asked = Some((tokio::time::Instant::now(), snapshot));
    }
}

/// Ends a snapshot transfer's read transaction and truncates the WAL ([`crate::db::Pages::finish`]).
/// The truncation is best effort, except that an I/O error ends the process like any failed
/// write (`db::failure`): the same write is never tried again.
pub fn finish_transfer(pages: crate::db::Pages) {
    if let Err(e) = pages.finish() {
        if crate::db::failure::classify(&e) == crate::db::failure::Failure::Exit {
            exit_on_io_error("truncating the WAL after a snapshot transfer", &e);
        }
        tracing::warn!("truncating the WAL after a snapshot transfer: {e}");
    }
}

/// `io::Error` from anything displayable, for the storage traits' error type.
pub fn io_err(e: impl fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Ends the process after an I/O error on a storage write (`db::failure::Failure::Exit`):
/// after a failed fsync Linux may drop the dirty pages and a later fsync reports success, so
/// the write is never tried again. The node restarts (systemd) and recovers from what was
/// durable: the fsync'd Raft log, and the database that openraft re-applies from it.
pub fn exit_on_io_error(what: &str, e: &rusqlite::Error) -> ! {
    let msg = crate::db::failure::describe(e);
    tracing::error!(
        "FATAL: {what}: I/O error: {msg}; exiting so that the node restarts from what is durable"
    );
    // Not `eprintln!`, which panics when stderr cannot be written: stderr may be a file on the
    // very disk that failed, and a panic here would end only this thread (the log writer or
    // apply), leaving a node whose storage stopped instead of one that restarts.
    let _ = writeln!(std::io::stderr(), "FATAL: {what}: I/O error: {msg}");
    std::process::exit(74)
}

/// The error openraft gets for a corrupt database file: the node stops with it.
pub fn corrupt(what: &str, e: &rusqlite::Error) -> std::io::Error {
    io_err(format!(
        "{what}: the database file is corrupt ({}): this replica stops; repair it from the \
         leader (move the data dir away and rejoin, which installs a snapshot)",
        crate::db::failure::describe(e)
    ))
}

/// Confirms this node still leads (a ReadIndex round: a quorum answered a heartbeat sent
/// after the call), as `ensure_linearizable(ReadIndex)`. Under load a round can expire
/// before a quorum answers (`QuorumNotEnough`) although nothing is wrong: it is tried again
/// for up to 3 s while this node still leads. Other errors (`ForwardToLeader`, shutdown)
/// come back at once.
pub async fn confirm_leadership(raft: &Raft) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        match raft
            .ensure_linearizable(openraft::ReadPolicy::ReadIndex)
            .await
        {
            Ok(_) => return Ok(()),
            Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(_)))
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f))) => {
                return Err(Error::NotLeader(f.leader_id));
            }
            Err(e) => return Err(Error::Unavailable(e.to_string())),
        }
    }
}

/// A refused write as the gateway's [`Error`].
pub fn write_error(e: ClientWriteError<TypeConfig>) -> Error {
    match e {
        ClientWriteError::ForwardToLeader(f) => Error::NotLeader(f.leader_id),
        // Not retried for the client: the entry may have committed.
        ClientWriteError::LogEntryDiscarded(_) => Error::LeaderChanged,
        other => Error::Unavailable(other.to_string()),
    }
}

/// A Raft call refused or failed, as the gateway's [`Error`].
pub fn raft_error(e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> Error {
    match e {
        RaftError::APIError(e) => write_error(e),
        RaftError::Fatal(f) => fatal(f),
    }
}

/// Raft stopped: this node is dead.
pub fn fatal(f: Fatal<TypeConfig>) -> Error {
    Error::Fatal(f.to_string())
}

#[cfg(test)]
mod tests {
    /// A `raft.db` in WAL mode holding entries 1..=`n` of 1,000 bytes, and its writer.
    fn log_of(n: u32) -> (tempfile::TempDir, std::path::PathBuf, rusqlite::Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.db");
        let w = rusqlite::Connection::open(&path).unwrap();
        w.pragma_update(None, "journal_mode", "WAL").unwrap();
        w.execute_batch(&format!(
            "CREATE TABLE log (idx INTEGER PRIMARY KEY, entry BLOB NOT NULL); \
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n}) \
             INSERT INTO log SELECT i, randomblob(1000) FROM n;"
        ))
        .unwrap();
        (dir, path, w)
    }

    /// The size watcher reads the log's pages in use through its own read-only connection while
    /// the log store's writer keeps the file open in WAL mode; purged rows stop counting.
    #[test]
    fn test_log_bytes() {
        let (_dir, path, w) = log_of(2000);
        let full = super::log_bytes(&path).unwrap();
        assert!(full > 2_000_000, "{full}");
        w.execute_batch("DELETE FROM log WHERE idx <= 1900")
            .unwrap();
        let purged = super::log_bytes(&path).unwrap();
        assert!(purged < full / 5, "{purged} of {full}");
    }

    /// The purge point keeps the newest entries behind the snapshot up to the byte budget and
    /// never reaches past the snapshot.
    #[test]
    fn test_purge_point() {
        let (_dir, path, _w) = log_of(100);
        // Snapshot at 80, 10,500 bytes kept: entries 71..=80 stay, 70 and below go.
        assert_eq!(super::purge_point(&path, 80, 10_500).unwrap(), Some(70));
        // Everything up to the snapshot fits.
        assert_eq!(super::purge_point(&path, 5, 10_500).unwrap(), None);
        // A budget smaller than one entry purges up to the snapshot itself.
        assert_eq!(super::purge_point(&path, 80, 10).unwrap(), Some(80));
    }
}

//! [`Command::Members`](super::Command::Members): what membership needs beyond openraft's own
//! entries. Each member's *incarnation* (a random `u64` its Raft log stores with its first
//! vote, `raft::log_store::Incarnation`), recorded before the node is added, so every Raft RPC
//! can name the incarnation it expects of its receiver (`raft::incarnation`); and the first
//! entry after `cairn recover`, which starts a new history epoch.
//!
//! The incarnations live in `_cairn_members` (`id`, `incarnation`), created by the first such
//! entry so that older logs apply to the same bytes. Incarnations are stored as SQLite
//! integers (the `u64`'s bits as an `i64`).

use std::collections::BTreeMap;
use std::fmt;

use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use super::ApplyContext;
use crate::db::tables;

/// The payload of `Command::Members`. Variants are only ever appended (postcard).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembersCommand {
    /// Node `id` runs with `incarnation`: recorded by the leader before it adds the node (a
    /// join or a `--replace`), or for a member whose log predates incarnations.
    Incarnation { id: u64, incarnation: u64 },
    /// The first entry after `cairn recover` (or `peers.json`) forced `members` on a log kept
    /// through `kept_index`: a new history epoch, a new epoch for every device (records
    /// acknowledged only by the lost nodes are gone, their seqs may come again with new
    /// records), and the incarnations of nodes outside `members` are forgotten.
    Recovered { kept_index: u64, members: Vec<u64> },
}

impl fmt::Display for MembersCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MembersCommand::Incarnation { id, incarnation } => {
                write!(f, "Incarnation(node {id}: {incarnation:016x})")
            }
            MembersCommand::Recovered {
                kept_index,
                members,
            } => write!(
                f,
                "Recovered(kept through {kept_index}, members {members:?})"
            ),
        }
    }
}

fn create(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {} (id INTEGER PRIMARY KEY, incarnation INTEGER NOT NULL)",
        tables::MEMBERS
    ))
}

/// Applies a [`MembersCommand`] inside the entry's transaction.
pub fn apply_members(
    conn: &Connection,
    ctx: &ApplyContext<'_>,
    c: &MembersCommand,
) -> rusqlite::Result<()> {
    create(conn)?;
    match c {
        MembersCommand::Incarnation { id, incarnation } => {
            conn.execute(
                &format!(
                    "INSERT OR REPLACE INTO {}(id, incarnation) VALUES(?1, ?2)",
                    tables::MEMBERS
                ),
                rusqlite::params![*id as i64, *incarnation as i64],
            )?;
        }
        MembersCommand::Recovered { members, .. } => {
            let keep: Vec<String> = members.iter().map(|m| (*m as i64).to_string()).collect();
            conn.execute(
                &format!(
                    "DELETE FROM {} WHERE id NOT IN ({})",
                    tables::MEMBERS,
                    keep.join(",")
                ),
                [],
            )?;
            let epoch = super::backup::history_epoch(conn)? + 1;
            super::backup::start_epoch(conn, epoch)?;
        }
    }
    ctx.metrics
        .members_changed
        .fetch_add(1, std::sync::atomic::Ordering::Release);
    Ok(())
}

/// Forgets every recorded incarnation: a restored backup adopted as a new one-node cluster
/// (`backup::restore::adopt`), outside the log, before the node serves.
pub fn forget_all(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(&format!("DROP TABLE IF EXISTS {}", tables::MEMBERS))
}

/// Every recorded incarnation, by node id (empty before the first `Command::Members`).
pub fn incarnations(conn: &Connection) -> rusqlite::Result<BTreeMap<u64, u64>> {
    let exists: bool = conn.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = ?1",
        [tables::MEMBERS],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(BTreeMap::new());
    }
    let mut st = conn.prepare(&format!(
        "SELECT id, incarnation FROM {} ORDER BY id",
        tables::MEMBERS
    ))?;
    let rows = st.query_map([], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::feed::Feed;
    use crate::metrics::Metrics;

    #[test]
    fn test_incarnations_and_recovery() {
        let c = Connection::open_in_memory().unwrap();
        let metrics = Metrics::default();
        let feed = Feed::new(4);
        let ctx = ApplyContext {
            index: 1,
            metrics: &metrics,
            feed: &feed,
        };
        assert!(incarnations(&c).unwrap().is_empty());
        for (id, incarnation) in [(1, u64::MAX), (2, 7), (3, 9), (2, 8)] {
            apply_members(&c, &ctx, &MembersCommand::Incarnation { id, incarnation }).unwrap();
        }
        assert_eq!(
            incarnations(&c).unwrap(),
            BTreeMap::from([(1, u64::MAX), (2, 8), (3, 9)]),
            "the latest incarnation of each node, all 64 bits"
        );
        crate::db::export::bump_epoch(&c, 5, None).unwrap();
        apply_members(
            &c,
            &ctx,
            &MembersCommand::Recovered {
                kept_index: 40,
                members: vec![1],
            },
        )
        .unwrap();
        assert_eq!(incarnations(&c).unwrap(), BTreeMap::from([(1, u64::MAX)]));
        assert_eq!(super::super::backup::history_epoch(&c).unwrap(), 1);
        assert_eq!(
            crate::db::export::epoch(&c, 5).unwrap(),
            1 << 32,
            "a recovery starts a new epoch of every device"
        );
        assert_eq!(
            metrics
                .members_changed
                .load(std::sync::atomic::Ordering::Relaxed),
            5
        );
        forget_all(&c).unwrap();
        assert!(
            incarnations(&c).unwrap().is_empty(),
            "a restore's new cluster"
        );
    }
}

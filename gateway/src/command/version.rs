//! [`Command::ActivateVersion`](super::Command::ActivateVersion): the leader raises the
//! cluster's active format version (`crate::version`) once every member supports it, and the
//! entry runs the replicated database's migrations up to that version, at the same log index
//! on every replica.
//!
//! The active version lives in `_cairn_raft` (key `active_version`, absent = 1), beside the
//! applied log id: it travels with snapshots and `/db/load` never replaces it. It never goes
//! down: an entry naming a version at or below the current one changes nothing.
//!
//! Migration steps (one per version, [`migrate_to`]) run inside the entry's transaction and
//! must each be bounded (a few pages): a layout change that touches many rows is split into
//! entries of its own kind, proposed once the version is active. Version 2's step creates
//! `_cairn_migrations(version, log_index)` and records itself there.

use rusqlite::Connection;

use super::ApplyContext;
use crate::db::tables;
use crate::version::{self, SUPPORTED};

/// Which migrations ran, at which log index (created by version 2's step).
pub const MIGRATIONS: &str = "_cairn_migrations";

/// The cluster's active version a database records (1 when it records none).
pub use crate::db::active_version as read_active;

/// Applies `ActivateVersion(to)` inside the entry's open transaction. The state machine
/// never calls it with a version above [`SUPPORTED`] (it stops before such an entry,
/// [`super::Command::needs_newer_binary`]); should it happen, the entry fails as a module
/// error rather than apply half of it.
pub fn apply_activate(conn: &Connection, ctx: &ApplyContext<'_>, to: u32) -> rusqlite::Result<()> {
    let current = read_active(conn)?;
    if to <= current {
        return Ok(());
    }
    if to > SUPPORTED {
        return Err(rusqlite::Error::ToSqlConversionFailure(Box::new(
            std::io::Error::other(too_new(to)),
        )));
    }
    for v in current + 1..=to {
        migrate_to(conn, ctx.index, v)?;
    }
    conn.execute(
        &format!(
            "INSERT OR REPLACE INTO {}(key, value) VALUES('active_version', ?1)",
            tables::RAFT
        ),
        [to.to_string().into_bytes()],
    )?;
    ctx.metrics.versions.raise_active(to);
    tracing::info!(
        index = ctx.index,
        "cluster format version {to} active (was {current})"
    );
    Ok(())
}

/// The replicated database's migration to layout version `v` (bounded; see the module doc).
fn migrate_to(conn: &Connection, index: u64, v: u32) -> rusqlite::Result<()> {
    // Version 2 introduces the table every later step records itself in.
    if v == 2 {
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {MIGRATIONS}(version INTEGER PRIMARY KEY, \
             log_index INTEGER NOT NULL)"
        ))?;
    }
    conn.execute(
        &format!("INSERT OR REPLACE INTO {MIGRATIONS}(version, log_index) VALUES(?1, ?2)"),
        rusqlite::params![v, index as i64],
    )?;
    Ok(())
}

/// The message a replica logs when it meets `ActivateVersion(v)` it cannot apply.
pub fn too_new(v: u32) -> String {
    version::needs_newer(&format!("the entry activating version {v}"), v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::feed::Feed;
    use crate::metrics::Metrics;

    fn db() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(&format!(
            "CREATE TABLE {}(key TEXT PRIMARY KEY, value BLOB NOT NULL)",
            tables::RAFT
        ))
        .unwrap();
        c
    }

    #[test]
    fn test_activate_migrates_once_and_never_goes_down() {
        let c = db();
        let m = Metrics::default();
        let feed = Feed::default();
        let ctx = |index| ApplyContext {
            index,
            metrics: &m,
            feed: &feed,
        };
        assert_eq!(read_active(&c).unwrap(), 1);
        apply_activate(&c, &ctx(7), 2).unwrap();
        assert_eq!(read_active(&c).unwrap(), 2);
        assert_eq!(m.versions.active(), 2);
        apply_activate(&c, &ctx(9), 2).unwrap();
        apply_activate(&c, &ctx(10), 1).unwrap();
        assert_eq!(read_active(&c).unwrap(), 2);
        let rows: Vec<(u32, i64)> = c
            .prepare(&format!("SELECT version, log_index FROM {MIGRATIONS}"))
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, vec![(2, 7)]);
        assert!(apply_activate(&c, &ctx(11), SUPPORTED + 1).is_err());
        assert_eq!(read_active(&c).unwrap(), 2);
    }
}

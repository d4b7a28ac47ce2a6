//! [`Command::BackupShipped`](super::Command::BackupShipped): how far the continuous backup
//! (`backup/`) has stored the log on one target, recorded through Raft so that a new leader
//! resumes there, and the site's history epoch.
//!
//! Both live in `_cairn_backup` (`key`, `value`): `shipped:{url}` holds a JSON
//! [`ShippedPosition`], `history_epoch` the epoch (a restore starts a new one; backups of
//! different epochs go to different directories of a target, so a restored site never mixes
//! its new history with the old one's objects).

use rusqlite::{Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::db::tables;

/// The last log index (and its stamp) stored on a backup target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ShippedPosition {
    pub index: u64,
    pub stamp_ms: i64,
}

/// The payload of `Command::BackupShipped`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupShipped {
    /// The target's URL as configured (`--backup-url`).
    pub target: String,
    pub position: ShippedPosition,
}

fn create(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {} (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID",
        tables::BACKUP
    ))
}

fn put(conn: &Connection, key: &str, value: Vec<u8>) -> rusqlite::Result<()> {
    create(conn)?;
    conn.execute(
        &format!(
            "INSERT OR REPLACE INTO {}(key, value) VALUES(?1, ?2)",
            tables::BACKUP
        ),
        rusqlite::params![key, value],
    )
    .map(drop)
}

fn get(conn: &Connection, key: &str) -> rusqlite::Result<Option<Vec<u8>>> {
    let exists: bool = conn.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = ?1",
        [tables::BACKUP],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(None);
    }
    conn.query_row(
        &format!("SELECT value FROM {} WHERE key = ?1", tables::BACKUP),
        [key],
        |r| r.get(0),
    )
    .optional()
}

/// Applies a recorded position: a position never moves back (a late entry from an old
/// leader cannot undo a newer one).
pub fn apply_shipped(conn: &Connection, c: &BackupShipped) -> rusqlite::Result<()> {
    let key = format!("shipped:{}", c.target);
    if read_shipped(conn, &c.target)?.is_some_and(|p| p.index >= c.position.index) {
        return Ok(());
    }
    put(
        conn,
        &key,
        serde_json::to_vec(&c.position).expect("position serializes"),
    )
}

/// The recorded position of `target`, if any.
pub fn read_shipped(conn: &Connection, target: &str) -> rusqlite::Result<Option<ShippedPosition>> {
    Ok(get(conn, &format!("shipped:{target}"))?.and_then(|b| serde_json::from_slice(&b).ok()))
}

/// The site's history epoch (0 until the first restore).
pub fn history_epoch(conn: &Connection) -> rusqlite::Result<u64> {
    Ok(get(conn, "history_epoch")?
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0))
}

/// Starts a new history epoch (`cairn restore`, on the restored database before it serves)
/// and forgets every shipped position: the new history is backed up from scratch. Every
/// device starts a new export epoch too (`db::export`): its seqs after the restored point
/// may name new records. The lost history may have raised epochs past the restored ones, so
/// the new ones start at `epoch << 32` (above any a history reaches).
pub fn start_epoch(conn: &Connection, epoch: u64) -> rusqlite::Result<()> {
    put(conn, "history_epoch", epoch.to_string().into_bytes())?;
    crate::db::export::bump_all_epochs(conn, epoch << 32)?;
    conn.execute(
        &format!("DELETE FROM {} WHERE key LIKE 'shipped:%'", tables::BACKUP),
        [],
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_position_never_moves_back() {
        let c = Connection::open_in_memory().unwrap();
        assert_eq!(read_shipped(&c, "file:///x").unwrap(), None);
        assert_eq!(history_epoch(&c).unwrap(), 0);
        let at = |index| BackupShipped {
            target: "file:///x".into(),
            position: ShippedPosition { index, stamp_ms: 5 },
        };
        apply_shipped(&c, &at(10)).unwrap();
        apply_shipped(&c, &at(7)).unwrap();
        assert_eq!(read_shipped(&c, "file:///x").unwrap().unwrap().index, 10);
        assert_eq!(crate::db::export::bump_epoch(&c, 9, None).unwrap(), 1);
        start_epoch(&c, 3).unwrap();
        assert_eq!(history_epoch(&c).unwrap(), 3);
        assert_eq!(read_shipped(&c, "file:///x").unwrap(), None);
        assert_eq!(
            crate::db::export::epoch(&c, 9).unwrap(),
            3 << 32,
            "a restore starts a new epoch of every device"
        );
    }
}

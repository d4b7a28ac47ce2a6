//! What export keeps in the replicated database: the site id, each device's registration
//! epoch, the journal of stored device batches in commit order, and each destination's
//! committed cursor (changes of user tables have their own journal, `db::changes`, in the
//! same position space: an entry holds device batches or SQL, never both). Written only by applying entries (`command::export`,
//! `command::device`, `command::registry`); read locally by the leader's export runners.
//!
//! Tables (created on first use):
//!
//! | table | columns | meaning |
//! |---|---|---|
//! | [`tables::SITE`] | `key`, `value` | `site`: the site id in every idempotency key |
//! | [`tables::DEVICE_EPOCHS`] | `device_id`, `epoch`, `removed` | grows whenever the device's seq can restart |
//! | [`tables::EXPORT_JOURNAL`] | `log_index`, `ordinal`, `device_id`, `epoch`, `from_seq`, `to_seq`, `at_ms` | one row per stored device batch |
//! | [`tables::EXPORT_CURSORS`] | `name`, `log_index`, `ordinal`, `delivered`, `at_ms` | how far each destination has delivered |
//!
//! The journal names records by (device_id, seq range) and keeps the epoch they were stored
//! under, so a key never changes between storing and exporting; the records themselves stay
//! in their stream tables (one journal row per batch, not per record). Its position
//! `(log_index, ordinal)` is the commit order: the entry's log index and the batch's place in
//! the entry, the same on every replica.

use rusqlite::{Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::tables;

/// A place in the journal: the entry's log index and the batch's ordinal in the entry.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Position {
    pub log_index: u64,
    pub ordinal: u32,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.log_index, self.ordinal)
    }
}

/// One stored device batch, as the journal names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalRow {
    pub pos: Position,
    pub device_id: u64,
    pub epoch: u64,
    pub from_seq: u64,
    pub to_seq: u64,
    /// When the leader received the batch (Unix ms).
    pub at_ms: i64,
}

/// A destination's committed cursor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub name: String,
    pub pos: Position,
    /// Records delivered in total (as the runner counted them when it committed).
    pub delivered: u64,
}

/// Creates export's tables if needed (cached statements: this runs for every device entry).
pub fn create_tables(conn: &Connection) -> rusqlite::Result<()> {
    for ddl in [
        format!(
            "CREATE TABLE IF NOT EXISTS {} (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            tables::SITE
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {} (device_id INTEGER PRIMARY KEY, \
             epoch INTEGER NOT NULL, removed INTEGER NOT NULL)",
            tables::DEVICE_EPOCHS
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {} (log_index INTEGER NOT NULL, ordinal INTEGER NOT NULL, \
             device_id INTEGER NOT NULL, epoch INTEGER NOT NULL, from_seq INTEGER NOT NULL, \
             to_seq INTEGER NOT NULL, at_ms INTEGER NOT NULL, PRIMARY KEY (log_index, ordinal)) \
             WITHOUT ROWID",
            tables::EXPORT_JOURNAL
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {} (name TEXT PRIMARY KEY, log_index INTEGER NOT NULL, \
             ordinal INTEGER NOT NULL, delivered INTEGER NOT NULL)",
            tables::EXPORT_CURSORS
        ),
    ] {
        conn.prepare_cached(&ddl)?.execute([])?;
    }
    Ok(())
}

/// True for "no such table": nothing of export was written yet.
fn is_absent(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(_, Some(m)) if m.contains("no such table"))
}

/// Maps "no such table" to `None`.
fn absent_is_none<T>(r: rusqlite::Result<Option<T>>) -> rusqlite::Result<Option<T>> {
    match r {
        Err(e) if is_absent(&e) => Ok(None),
        other => other,
    }
}

/// The rows of `sql`, none if its table does not exist yet.
fn rows_if_present<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    map: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Vec<T>> {
    let mut stmt = match conn.prepare(sql) {
        Ok(s) => s,
        Err(e) if is_absent(&e) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    stmt.query_map(params, map)?.collect()
}

/// The site id, once a leader has set it.
pub fn site(conn: &Connection) -> rusqlite::Result<Option<String>> {
    absent_is_none(
        conn.query_row(
            &format!("SELECT value FROM {} WHERE key = 'site'", tables::SITE),
            [],
            |r| r.get(0),
        )
        .optional(),
    )
}

/// Sets the site id unless one is set; the stored one (every key exported so far uses it).
pub fn set_site(conn: &Connection, site: &str) -> rusqlite::Result<String> {
    create_tables(conn)?;
    conn.execute(
        &format!(
            "INSERT INTO {} (key, value) VALUES ('site', ?1) ON CONFLICT(key) DO NOTHING",
            tables::SITE
        ),
        [site],
    )?;
    Ok(self::site(conn)?.unwrap_or_default())
}

/// A device's registration epoch (0 until it first changes).
pub fn epoch(conn: &Connection, device_id: u64) -> rusqlite::Result<u64> {
    let e: Option<i64> = absent_is_none(
        conn.prepare_cached(&format!(
            "SELECT epoch FROM {} WHERE device_id = ?1",
            tables::DEVICE_EPOCHS
        ))
        .and_then(|mut s| s.query_row([device_id as i64], |r| r.get(0)).optional()),
    )?;
    Ok(e.unwrap_or(0) as u64)
}

/// Starts a new epoch of `device_id` (its seq may restart: reset, re-registration, restore,
/// recovery). With `reset_to: Some(seq)` its journal rows above `seq` are dropped: those
/// records were deleted before the reset (it is refused otherwise), and the same seqs now
/// name new records. Returns the new epoch. Deterministic; call it only while applying an
/// entry (restore and recovery call it for every device they bring back).
pub fn bump_epoch(
    conn: &Connection,
    device_id: u64,
    reset_to: Option<u64>,
) -> rusqlite::Result<u64> {
    create_tables(conn)?;
    conn.execute(
        &format!(
            "INSERT INTO {} (device_id, epoch, removed) VALUES (?1, 1, 0) \
             ON CONFLICT(device_id) DO UPDATE SET epoch = epoch + 1, removed = 0",
            tables::DEVICE_EPOCHS
        ),
        [device_id as i64],
    )?;
    if let Some(seq) = reset_to {
        conn.execute(
            &format!(
                "DELETE FROM {} WHERE device_id = ?1 AND to_seq > ?2",
                tables::EXPORT_JOURNAL
            ),
            rusqlite::params![device_id as i64, seq as i64],
        )?;
    }
    epoch(conn, device_id)
}

/// Raises each `(device_id, epoch)`'s stored epoch to at least `epoch` (a loaded backup's).
pub fn merge_epochs(conn: &Connection, epochs: &[(i64, i64)]) -> rusqlite::Result<()> {
    create_tables(conn)?;
    let mut st = conn.prepare(&format!(
        "INSERT INTO {} (device_id, epoch, removed) VALUES (?1, ?2, 0) \
         ON CONFLICT(device_id) DO UPDATE SET epoch = max(epoch, excluded.epoch)",
        tables::DEVICE_EPOCHS
    ))?;
    for (device_id, epoch) in epochs {
        st.execute([device_id, epoch])?;
    }
    Ok(())
}

/// Starts a new epoch, at least `floor`, of every registered device and of every device
/// export knows (a restore starts a new history: seqs after the restored point may name new
/// records).
pub fn bump_all_epochs(conn: &Connection, floor: u64) -> rusqlite::Result<()> {
    create_tables(conn)?;
    let registered: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [tables::DEVICES],
        |r| r.get(0),
    )?;
    if registered {
        conn.execute(
            &format!(
                "INSERT INTO {} (device_id, epoch, removed) SELECT device_id, 0, 0 FROM {} \
                 WHERE true ON CONFLICT(device_id) DO NOTHING",
                tables::DEVICE_EPOCHS,
                tables::DEVICES
            ),
            [],
        )?;
    }
    conn.execute(
        &format!(
            "UPDATE {} SET epoch = max(epoch + 1, ?1)",
            tables::DEVICE_EPOCHS
        ),
        [floor as i64],
    )
    .map(drop)
}

/// Notes that `device_id` was removed from the registry: adding it again starts a new epoch.
pub fn mark_removed(conn: &Connection, device_id: u64) -> rusqlite::Result<()> {
    create_tables(conn)?;
    conn.execute(
        &format!(
            "INSERT INTO {} (device_id, epoch, removed) VALUES (?1, 0, 1) \
             ON CONFLICT(device_id) DO UPDATE SET removed = 1",
            tables::DEVICE_EPOCHS
        ),
        [device_id as i64],
    )?;
    Ok(())
}

/// True when `device_id` was removed and not added since.
pub fn was_removed(conn: &Connection, device_id: u64) -> rusqlite::Result<bool> {
    let r: Option<i64> = absent_is_none(
        conn.query_row(
            &format!(
                "SELECT removed FROM {} WHERE device_id = ?1",
                tables::DEVICE_EPOCHS
            ),
            [device_id as i64],
            |r| r.get(0),
        )
        .optional(),
    )?;
    Ok(r == Some(1))
}

/// True once a destination is registered: only then is the journal kept (a node without
/// exports pays nothing for it, and nothing would trim it).
fn journal_wanted(conn: &Connection) -> rusqlite::Result<bool> {
    // Asked for every device entry: without an export there is no cursor table, and preparing
    // a statement on it would fail (and cost more than the entry's insert) every time.
    if !super::table_exists(conn, tables::EXPORT_CURSORS)? {
        return Ok(false);
    }
    let stmt = conn.prepare_cached(&format!("SELECT 1 FROM {} LIMIT 1", tables::EXPORT_CURSORS));
    let any = stmt.and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)).optional());
    Ok(absent_is_none(any)?.is_some())
}

/// Journals the batches an entry stored (while a destination is registered): per batch its
/// ordinal in the entry, device, first stored seq, last seq and receive time.
pub fn journal(
    conn: &Connection,
    log_index: u64,
    stored: &[(u32, u64, u64, u64, i64)],
) -> rusqlite::Result<()> {
    if stored.is_empty() || !journal_wanted(conn)? {
        return Ok(());
    }
    let mut ins = conn.prepare_cached(&format!(
        "INSERT OR REPLACE INTO {} (log_index, ordinal, device_id, epoch, from_seq, to_seq, at_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        tables::EXPORT_JOURNAL
    ))?;
    for &(ordinal, device_id, from_seq, to_seq, at_ms) in stored {
        let epoch = epoch(conn, device_id)?;
        ins.execute(rusqlite::params![
            log_index as i64,
            ordinal,
            device_id as i64,
            epoch as i64,
            from_seq as i64,
            to_seq as i64,
            at_ms
        ])?;
    }
    Ok(())
}

/// Up to `limit` journal rows after `after`, in commit order.
pub fn journal_after(
    conn: &Connection,
    after: Position,
    limit: usize,
) -> rusqlite::Result<Vec<JournalRow>> {
    let sql = format!(
        "SELECT log_index, ordinal, device_id, epoch, from_seq, to_seq, at_ms FROM {} \
         WHERE (log_index, ordinal) > (?1, ?2) ORDER BY log_index, ordinal LIMIT ?3",
        tables::EXPORT_JOURNAL
    );
    rows_if_present(
        conn,
        &sql,
        rusqlite::params![after.log_index as i64, after.ordinal, limit as i64],
        |r| {
            Ok(JournalRow {
                pos: Position {
                    log_index: r.get::<_, i64>(0)? as u64,
                    ordinal: r.get(1)?,
                },
                device_id: r.get::<_, i64>(2)? as u64,
                epoch: r.get::<_, i64>(3)? as u64,
                from_seq: r.get::<_, i64>(4)? as u64,
                to_seq: r.get::<_, i64>(5)? as u64,
                at_ms: r.get(6)?,
            })
        },
    )
}

/// Records (by seq count) and the oldest receive time of the journal after `after`: a
/// destination's lag.
pub fn backlog(conn: &Connection, after: Position) -> rusqlite::Result<(u64, Option<i64>)> {
    let r = conn.query_row(
        &format!(
            "SELECT coalesce(sum(to_seq - from_seq + 1), 0), min(at_ms) FROM {} \
             WHERE (log_index, ordinal) > (?1, ?2)",
            tables::EXPORT_JOURNAL
        ),
        rusqlite::params![after.log_index as i64, after.ordinal],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Option<i64>>(1)?)),
    );
    match r {
        Err(e) if is_absent(&e) => Ok((0, None)),
        other => other,
    }
}

/// Every committed cursor.
pub fn cursors(conn: &Connection) -> rusqlite::Result<Vec<Cursor>> {
    let sql = format!(
        "SELECT name, log_index, ordinal, delivered FROM {} ORDER BY name",
        tables::EXPORT_CURSORS
    );
    rows_if_present(conn, &sql, [], |r| {
        Ok(Cursor {
            name: r.get(0)?,
            pos: Position {
                log_index: r.get::<_, i64>(1)? as u64,
                ordinal: r.get(2)?,
            },
            delivered: r.get::<_, i64>(3)? as u64,
        })
    })
}

/// Moves a destination's cursor forward (never back: a late commit of an older position from
/// a deposed leader changes nothing), registering it at `pos` if new; then drops the journal
/// rows every destination has delivered (and up to [`super::changes::TRIM_PER_ENTRY`] rows
/// of the change journal every capturing destination has). Returns the cursor as stored.
pub fn advance_cursor(conn: &Connection, c: &Cursor) -> rusqlite::Result<Cursor> {
    create_tables(conn)?;
    conn.execute(
        &format!(
            "INSERT INTO {t} (name, log_index, ordinal, delivered) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT(name) DO UPDATE SET log_index = excluded.log_index, \
             ordinal = excluded.ordinal, delivered = max(delivered, excluded.delivered) \
             WHERE (excluded.log_index, excluded.ordinal) > ({t}.log_index, {t}.ordinal)",
            t = tables::EXPORT_CURSORS
        ),
        rusqlite::params![
            c.name,
            c.pos.log_index as i64,
            c.pos.ordinal,
            c.delivered as i64
        ],
    )?;
    trim_journal(conn)?;
    super::changes::trim(conn, super::changes::TRIM_PER_ENTRY)?;
    let all = cursors(conn)?;
    Ok(all
        .into_iter()
        .find(|x| x.name == c.name)
        .unwrap_or_else(|| c.clone()))
}

/// Removes a destination's cursor and its change capture (it no longer holds either journal
/// back).
pub fn forget_cursor(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    create_tables(conn)?;
    let n = conn.execute(
        &format!("DELETE FROM {} WHERE name = ?1", tables::EXPORT_CURSORS),
        [name],
    )?;
    trim_journal(conn)?;
    super::changes::forget_capture(conn, name)?;
    Ok(n > 0)
}

/// Drops journal rows at or below every cursor (none while no destination is registered:
/// retention trims the journal then).
fn trim_journal(conn: &Connection) -> rusqlite::Result<()> {
    let min: Option<(i64, i64)> = conn
        .query_row(
            &format!(
                "SELECT log_index, ordinal FROM {} ORDER BY log_index, ordinal LIMIT 1",
                tables::EXPORT_CURSORS
            ),
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if let Some((i, o)) = min {
        conn.execute(
            &format!(
                "DELETE FROM {} WHERE (log_index, ordinal) <= (?1, ?2)",
                tables::EXPORT_JOURNAL
            ),
            rusqlite::params![i, o],
        )?;
    }
    Ok(())
}

/// The lowest committed cursor, if any destination is registered.
pub fn min_cursor(conn: &Connection) -> rusqlite::Result<Option<Position>> {
    Ok(cursors(conn)?.into_iter().map(|c| c.pos).min())
}

/// Deletes journal rows received before `before_ms` (retention without `keep_unexported`),
/// at most `limit`; the number deleted.
pub fn drop_journal_before(conn: &Connection, before_ms: i64, limit: u64) -> rusqlite::Result<u64> {
    create_tables(conn)?;
    let n = conn.execute(
        &format!(
            "DELETE FROM {t} WHERE (log_index, ordinal) IN (SELECT log_index, ordinal FROM {t} \
             WHERE at_ms < ?1 ORDER BY log_index, ordinal LIMIT ?2)",
            t = tables::EXPORT_JOURNAL
        ),
        rusqlite::params![before_ms, limit as i64],
    )?;
    Ok(n as u64)
}

/// The receive time of the oldest journal row after `pos` (the oldest record some
/// destination still has to deliver).
pub fn oldest_after(conn: &Connection, pos: Position) -> rusqlite::Result<Option<i64>> {
    Ok(backlog(conn, pos)?.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cursor_only_moves_forward_and_trims_journal() {
        let conn = Connection::open_in_memory().unwrap();
        let a = |i, o| Cursor {
            name: "a".into(),
            pos: Position {
                log_index: i,
                ordinal: o,
            },
            delivered: 0,
        };
        journal(&conn, 5, &[(0, 7, 1, 10, 1000)]).unwrap();
        assert!(
            journal_after(&conn, Position::default(), 10)
                .unwrap()
                .is_empty()
        );
        advance_cursor(&conn, &a(0, 0)).unwrap();
        journal(&conn, 5, &[(0, 7, 1, 10, 1000), (1, 8, 1, 2, 1000)]).unwrap();
        journal(&conn, 6, &[(0, 7, 11, 12, 2000)]).unwrap();
        advance_cursor(&conn, &a(5, 0)).unwrap();
        assert_eq!(
            journal_after(&conn, Position::default(), 10).unwrap().len(),
            2
        );
        let back = advance_cursor(&conn, &a(4, 9)).unwrap();
        assert_eq!(
            back.pos,
            Position {
                log_index: 5,
                ordinal: 0
            }
        );
        assert_eq!(backlog(&conn, back.pos).unwrap(), (4, Some(1000)));
        advance_cursor(&conn, &a(6, 0)).unwrap();
        assert!(
            journal_after(&conn, Position::default(), 10)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn test_epoch_bumps_and_clips_journal() {
        let conn = Connection::open_in_memory().unwrap();
        assert_eq!(epoch(&conn, 3).unwrap(), 0);
        advance_cursor(
            &conn,
            &Cursor {
                name: "x".into(),
                pos: Position::default(),
                delivered: 0,
            },
        )
        .unwrap();
        journal(&conn, 1, &[(0, 3, 1, 5, 0), (1, 3, 6, 9, 0)]).unwrap();
        assert_eq!(bump_epoch(&conn, 3, Some(5)).unwrap(), 1);
        let rows = journal_after(&conn, Position::default(), 10).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].epoch, 0);
        journal(&conn, 2, &[(0, 3, 6, 6, 0)]).unwrap();
        assert_eq!(
            journal_after(&conn, Position::default(), 10).unwrap()[1].epoch,
            1
        );
        mark_removed(&conn, 3).unwrap();
        assert!(was_removed(&conn, 3).unwrap());
        assert_eq!(set_site(&conn, "north").unwrap(), "north");
        assert_eq!(set_site(&conn, "south").unwrap(), "north");
    }
}

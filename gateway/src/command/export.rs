//! [`Command::Export`](super::Command::Export): the site id, export cursors and retention,
//! all proposed by the leader (`export` layer) so every replica holds the same state.
//!
//! Retention is deterministic: the leader puts its clock (`stamp_ms`) into the entry, and
//! every replica deletes the same rows: those of `table` received before
//! `stamp_ms - keep_ms` (and, with `keep_unexported`, before the oldest record some
//! destination has not delivered), at most `limit` per entry so one entry never stalls
//! ingest; the leader proposes the next entry while `more` is true.

use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use crate::db::export::{self, Cursor};

/// What an export entry asks every replica to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExportCommand {
    /// Sets the site id unless one is set (the stored one wins: keys must never change).
    SetSite(String),
    /// Registers a destination or moves its cursor forward.
    Cursor(Cursor),
    /// Forgets a destination's cursor.
    Forget(String),
    /// Deletes old rows of one stream table (see the module doc).
    Retain {
        stamp_ms: i64,
        table: String,
        keep_ms: i64,
        keep_unexported: bool,
        limit: u64,
    },
    /// Format version 2: destination `name` exports the changes of the user tables `pattern`
    /// matches (`None`: none). Every replica captures the union of the registered patterns
    /// while it applies SQL ([`crate::db::changes`]).
    Capture {
        name: String,
        pattern: Option<String>,
    },
}

impl std::fmt::Display for ExportCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExportCommand::SetSite(s) => write!(f, "set site {s:?}"),
            ExportCommand::Cursor(c) => write!(f, "export {} through {}", c.name, c.pos),
            ExportCommand::Forget(n) => write!(f, "forget export {n}"),
            ExportCommand::Retain { table, keep_ms, .. } => {
                write!(f, "retain {table} for {keep_ms} ms")
            }
            ExportCommand::Capture { name, pattern } => match pattern {
                Some(p) => write!(f, "export {name} captures changes of {p:?}"),
                None => write!(f, "export {name} captures no changes"),
            },
        }
    }
}

/// What applying an [`ExportCommand`] answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExportOutcome {
    /// The site id as stored.
    Site(String),
    /// The cursor as stored (a stale commit leaves the newer one).
    Cursor(Cursor),
    Forgot(bool),
    /// Rows deleted; `more`: the limit was reached, propose again.
    Retained {
        deleted: u64,
        more: bool,
    },
    /// Refused (same everywhere); nothing changed.
    Failed(String),
    /// The pattern now registered for the destination.
    Capture(Option<String>),
}

/// Applies an export command inside the entry's transaction. `Forget` (`DELETE
/// /export/NAME`) removes a cursor: the journal rows it alone held go at once, and the stream
/// rows it held back under `keep_unexported` go with the next retention entries.
pub fn apply_export(conn: &Connection, cmd: &ExportCommand) -> rusqlite::Result<ExportOutcome> {
    Ok(match cmd {
        ExportCommand::SetSite(s) => ExportOutcome::Site(export::set_site(conn, s)?),
        ExportCommand::Cursor(c) => ExportOutcome::Cursor(export::advance_cursor(conn, c)?),
        ExportCommand::Forget(n) => ExportOutcome::Forgot(export::forget_cursor(conn, n)?),
        ExportCommand::Retain {
            stamp_ms,
            table,
            keep_ms,
            keep_unexported,
            limit,
        } => retain(
            conn,
            table,
            stamp_ms.saturating_sub(*keep_ms),
            *keep_unexported,
            *limit,
        )?,
        ExportCommand::Capture { name, pattern } => {
            match crate::db::changes::set_capture(conn, name, pattern.as_deref())? {
                Ok(p) => ExportOutcome::Capture(p),
                Err(e) => ExportOutcome::Failed(e),
            }
        }
    })
}

fn retain(
    conn: &Connection,
    table: &str,
    mut before_ms: i64,
    keep_unexported: bool,
    limit: u64,
) -> rusqlite::Result<ExportOutcome> {
    if !crate::db::sandbox::stream_tables(conn).contains(&table.to_lowercase()) {
        return Ok(ExportOutcome::Failed(format!(
            "retention: {table} is not a stream table"
        )));
    }
    let exists: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND lower(name) = lower(?1)",
        [table],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(ExportOutcome::Retained {
            deleted: 0,
            more: false,
        });
    }
    let registered = export::min_cursor(conn)?;
    if keep_unexported
        && let Some(min) = registered
        && let Some(oldest) = export::oldest_after(conn, min)?
    {
        before_ms = before_ms.min(oldest);
    }
    let limit = limit.max(1);
    let n = conn.execute(
        &format!(
            "DELETE FROM \"{table}\" WHERE (device_id, seq) IN (SELECT device_id, seq FROM \
             \"{table}\" WHERE time_ms + age_ms < ?1 LIMIT ?2)"
        ),
        rusqlite::params![before_ms, limit as i64],
    )? as u64;
    // Journal rows of deleted records name nothing any more (and without destinations
    // nothing else trims them). From format version 2 also with `keep_unexported` once no
    // destination is registered (the last one was forgotten): nobody reads them.
    if !keep_unexported
        || (registered.is_none() && super::version::read_active(conn)? >= crate::version::V2)
    {
        export::drop_journal_before(conn, before_ms, limit)?;
    }
    Ok(ExportOutcome::Retained {
        deleted: n,
        more: n >= limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::device::{ApplyStats, apply_device_batches, tests::batch};
    use crate::db::export::Position;
    use cairn_protocol::Value;

    /// A database holding three records of device 1 in `climate`; their receive time.
    fn three_records() -> (Connection, i64) {
        let conn = Connection::open_in_memory().unwrap();
        crate::db::schema::test_climate().install(&conn).unwrap();
        let v: &[Value<'_>] = &[Value::F32(1.0)];
        let b = batch(1, 1, &[(1, v), (1, v), (1, v)]);
        let at = b.received_at_ms;
        apply_device_batches(&conn, &[b], &mut ApplyStats::default()).unwrap();
        (conn, at)
    }

    #[test]
    fn test_retention_keeps_unexported_rows() {
        let (conn, at) = three_records();
        apply_export(
            &conn,
            &ExportCommand::Cursor(Cursor {
                name: "pg".into(),
                pos: Position::default(),
                delivered: 0,
            }),
        )
        .unwrap();
        export::journal(&conn, 9, &[(0, 1, 1, 3, at)]).unwrap();
        let retain = |keep_unexported| ExportCommand::Retain {
            stamp_ms: at + 10_000,
            table: "climate".into(),
            keep_ms: 1_000,
            keep_unexported,
            limit: 2,
        };
        assert_eq!(
            apply_export(&conn, &retain(true)).unwrap(),
            ExportOutcome::Retained {
                deleted: 0,
                more: false
            }
        );
        assert_eq!(
            apply_export(&conn, &retain(false)).unwrap(),
            ExportOutcome::Retained {
                deleted: 2,
                more: true
            }
        );
        assert_eq!(
            apply_export(&conn, &retain(false)).unwrap(),
            ExportOutcome::Retained {
                deleted: 1,
                more: false
            }
        );
    }

    #[test]
    fn test_forgotten_destination_holds_nothing_back() {
        let (conn, at) = three_records();
        let cursor = |name: &str| {
            ExportCommand::Cursor(Cursor {
                name: name.into(),
                pos: Position::default(),
                delivered: 0,
            })
        };
        apply_export(&conn, &cursor("old")).unwrap();
        export::journal(&conn, 9, &[(0, 1, 1, 3, at)]).unwrap();
        let retain = ExportCommand::Retain {
            stamp_ms: at + 10_000,
            table: "climate".into(),
            keep_ms: 1_000,
            keep_unexported: true,
            limit: 100,
        };
        let held = ExportOutcome::Retained {
            deleted: 0,
            more: false,
        };
        assert_eq!(apply_export(&conn, &retain).unwrap(), held);
        let forget = ExportCommand::Forget("old".into());
        assert_eq!(
            apply_export(&conn, &forget).unwrap(),
            ExportOutcome::Forgot(true)
        );
        assert_eq!(
            apply_export(&conn, &forget).unwrap(),
            ExportOutcome::Forgot(false)
        );
        // Version 1: the rows go, the journal rows stay (nothing trims them).
        let deleted = ExportOutcome::Retained {
            deleted: 3,
            more: false,
        };
        assert_eq!(apply_export(&conn, &retain).unwrap(), deleted);
        assert_eq!(export::backlog(&conn, Position::default()).unwrap().0, 3);
        // Version 2: retention trims them once no destination is registered.
        conn.execute_batch(&format!(
            "CREATE TABLE {t} (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
             INSERT INTO {t} VALUES ('active_version', CAST('2' AS BLOB));",
            t = crate::db::tables::RAFT
        ))
        .unwrap();
        apply_export(&conn, &retain).unwrap();
        assert_eq!(export::backlog(&conn, Position::default()).unwrap().0, 0);
    }
}

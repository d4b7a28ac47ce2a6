//! [`Command::Sql`](super::Command::Sql): rqlite statements applied in the entry's
//! transaction, with rqlite's autocommit or `?transaction` semantics.

use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use crate::db::sql::{Statement, StatementResult};

/// The payload of [`Command::Sql`](super::Command::Sql).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SqlCommand {
    pub statements: Vec<Statement>,
    /// All statements succeed or none does (`?transaction`).
    pub transaction: bool,
}

/// Applies a SQL command (the entry at `index`, stamped `stamp_ms`) inside the entry's open
/// transaction, under the sandbox's write rules ([`crate::db::sandbox::apply_statements`] has
/// the savepoint semantics: rqlite's autocommit, or all-or-nothing with `transaction`).
/// Once the active version is 2 (v0.1.0 replicas apply without either): the byte budget's
/// page cap, and the capture of user tables' changes for export while a destination
/// registered a pattern ([`crate::db::changes`]).
pub fn apply_sql(
    conn: &Connection,
    index: u64,
    stamp_ms: Option<i64>,
    cmd: &SqlCommand,
) -> rusqlite::Result<Vec<StatementResult>> {
    let v2 = super::version::read_active(conn)? >= crate::version::V2;
    let capture = if v2 {
        crate::db::changes::Capture::begin(conn, index, stamp_ms.unwrap_or(0), || {
            super::backup::history_epoch(conn)
        })?
    } else {
        None
    };
    crate::db::sandbox::apply_statements(
        conn,
        &cmd.statements,
        cmd.transaction,
        v2,
        capture.as_ref(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::sql::{Params, Value};

    #[test]
    fn test_apply_sql_savepoints() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t(a INTEGER PRIMARY KEY, b TEXT); BEGIN")
            .unwrap();
        let cmd = SqlCommand {
            statements: vec![
                Statement::new("INSERT INTO t(b) VALUES('x')"),
                Statement::new("INSERT INTO nope VALUES(1)"),
                Statement {
                    sql: "INSERT INTO t(b) VALUES(:b)".into(),
                    params: Params::Named(vec![("b".into(), Value::Text("y".into()))]),
                },
            ],
            transaction: false,
        };
        let r = apply_sql(&conn, 1, None, &cmd).unwrap();
        assert_eq!(r.len(), 3);
        assert!(r[1].error.as_deref().unwrap().contains("no such table"));
        assert_eq!(r[2].last_insert_id, 2);
        let tx = SqlCommand {
            transaction: true,
            ..cmd
        };
        let r = apply_sql(&conn, 1, None, &tx).unwrap();
        assert_eq!(r.len(), 2, "stops at the first error");
        let n: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2, "the transaction's first insert was rolled back");
    }

    /// Capture is a version 2 apply semantic: at version 1 a registered pattern (which only a
    /// version 2 entry can register) changes nothing, and moving cursors creates no capture
    /// tables.
    #[test]
    fn test_no_change_capture_before_version_2() {
        use crate::db::export::{Cursor, Position, advance_cursor, forget_cursor};
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT)")
            .unwrap();
        let cursor = Cursor {
            name: "pg".into(),
            pos: Position::default(),
            delivered: 0,
        };
        advance_cursor(&conn, &cursor).unwrap();
        forget_cursor(&conn, "pg").unwrap();
        let tables = |conn: &Connection| -> i64 {
            conn.query_row(
                "SELECT count(*) FROM sqlite_master WHERE name LIKE '_cairn_change%'",
                [],
                |r| r.get(0),
            )
            .unwrap()
        };
        assert_eq!(tables(&conn), 0, "a version 1 database keeps its layout");
        crate::db::changes::set_capture(&conn, "pg", Some(".*"))
            .unwrap()
            .unwrap();
        conn.execute_batch("BEGIN").unwrap();
        let cmd = SqlCommand {
            statements: vec![Statement::new("INSERT INTO orders (item) VALUES ('a')")],
            transaction: false,
        };
        let r = apply_sql(&conn, 3, None, &cmd).unwrap();
        assert!(r[0].error.is_none());
        let journaled = crate::db::changes::changes_after(&conn, Position::default(), 10).unwrap();
        assert!(journaled.is_empty(), "version 1 applies without capture");
    }

    #[test]
    fn test_transaction_control_is_an_error_result_in_apply() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t(a); BEGIN").unwrap();
        let cmd = SqlCommand {
            statements: vec![
                Statement::new("COMMIT"),
                Statement::new("INSERT INTO t VALUES(1)"),
            ],
            transaction: false,
        };
        let r = apply_sql(&conn, 1, None, &cmd).unwrap();
        assert!(r[0].error.as_deref().unwrap().contains("COMMIT"));
        assert!(
            !conn.is_autocommit(),
            "the entry's transaction is still open"
        );
    }
}

use super::*;
use crate::db::sql::Statement;

/// A writer like the state machine's at format version 2, with tables `orders` (captured),
/// `notes` (not) and one destination capturing `^orders$` from position 0.
fn setup() -> (tempfile::TempDir, Connection) {
    let dir = tempfile::tempdir().unwrap();
    let conn = sandbox::open_writer(&dir.path().join("db.sqlite")).unwrap();
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL;
         PRAGMA foreign_keys = ON;
         CREATE TABLE {raft} (key TEXT PRIMARY KEY, value BLOB NOT NULL);
         INSERT INTO {raft} VALUES ('active_version', CAST('2' AS BLOB));
         CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT NOT NULL, qty INTEGER);
         CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT);",
        raft = tables::RAFT
    ))
    .unwrap();
    crate::db::export::advance_cursor(&conn, &cursor("hook", 0)).unwrap();
    set_capture(&conn, "hook", Some("^orders$"))
        .unwrap()
        .unwrap();
    (dir, conn)
}

fn cursor(name: &str, log_index: u64) -> crate::db::export::Cursor {
    crate::db::export::Cursor {
        name: name.into(),
        pos: Position {
            log_index,
            ordinal: 0,
        },
        delivered: 0,
    }
}

/// Applies one SQL entry the way `command::sql` does at version 2 (history epoch 0); each
/// statement's error.
fn sql(conn: &Connection, index: u64, transaction: bool, sts: &[&str]) -> Vec<Option<String>> {
    let statements: Vec<Statement> = sts.iter().map(|s| Statement::new(*s)).collect();
    conn.execute_batch("BEGIN").unwrap();
    let stamp = 1_000 * index as i64;
    let r = {
        let _e = sandbox::enter_entry(index, Some(stamp));
        let capture = Capture::begin(conn, index, stamp, || Ok(0)).unwrap();
        sandbox::apply_statements(conn, &statements, transaction, true, capture.as_ref()).unwrap()
    };
    conn.execute_batch("COMMIT").unwrap();
    r.into_iter().map(|r| r.error).collect()
}

fn journal(conn: &Connection) -> Vec<ChangeRow> {
    changes_after(conn, Position::default(), 1000).unwrap()
}

#[test]
fn test_one_row_changed_several_times_in_one_entry_has_distinct_ordinals() {
    let (_dir, conn) = setup();
    let errors = sql(
        &conn,
        7,
        false,
        &[
            "INSERT INTO orders (id, item, qty) VALUES (1, 'bolt', 5)",
            "UPDATE orders SET qty = qty + 1 WHERE id = 1",
            "UPDATE orders SET qty = qty + 1, item = 'nut' WHERE id = 1",
            "INSERT INTO notes (body) VALUES ('not captured')",
            "DELETE FROM orders WHERE id = 1",
        ],
    );
    assert!(errors.iter().all(Option::is_none), "{errors:?}");
    let rows = journal(&conn);
    let seen: Vec<(u64, u32, Op)> = rows
        .iter()
        .map(|r| (r.pos.log_index, r.pos.ordinal, r.op))
        .collect();
    assert_eq!(
        seen,
        [
            (7, 0, Op::Insert),
            (7, 1, Op::Update),
            (7, 2, Op::Update),
            (7, 3, Op::Delete)
        ]
    );
    assert!(rows.iter().all(|r| r.table == "orders" && r.at_ms == 7_000));
    assert_eq!(rows[0].before, None);
    assert_eq!(rows[0].after.as_ref().unwrap()["qty"], 5);
    assert_eq!(rows[0].new_row_id, 1);
    assert_eq!(rows[2].before.as_ref().unwrap()["qty"], 6);
    assert_eq!(rows[2].before.as_ref().unwrap()["item"], "bolt");
    assert_eq!(rows[2].after.as_ref().unwrap()["item"], "nut");
    assert_eq!(rows[2].after.as_ref().unwrap()["qty"], 7);
    assert_eq!((rows[2].old_row_id, rows[2].new_row_id), (1, 1));
    assert_eq!(rows[3].after, None);
    assert_eq!(rows[3].before.as_ref().unwrap()["id"], 1);
    assert_eq!(rows[3].old_row_id, 1);

    // The next entry numbers its own changes from 0.
    sql(&conn, 8, false, &["INSERT INTO orders (item) VALUES ('x')"]);
    let last = journal(&conn).pop().unwrap();
    assert_eq!((last.pos.log_index, last.pos.ordinal), (8, 0));
}

#[test]
fn test_failing_statement_leaves_no_journal_rows() {
    let (_dir, conn) = setup();
    // ?transaction: the second statement fails, the first one's change goes with it.
    let errors = sql(
        &conn,
        3,
        true,
        &[
            "INSERT INTO orders (id, item) VALUES (1, 'a')",
            "INSERT INTO orders (id, item) VALUES (2, NULL)",
        ],
    );
    assert!(
        errors[1].as_deref().unwrap().contains("NOT NULL"),
        "{errors:?}"
    );
    assert!(journal(&conn).is_empty());
    // Autocommit: a multi-row statement failing half-way leaves none of its rows; the
    // statements around it keep theirs.
    let errors = sql(
        &conn,
        4,
        false,
        &[
            "INSERT INTO orders (id, item) VALUES (1, 'a')",
            "INSERT INTO orders (id, item) VALUES (2, 'b'), (3, NULL)",
            "INSERT INTO orders (id, item) VALUES (4, 'd')",
        ],
    );
    assert!(errors[1].is_some() && errors[0].is_none() && errors[2].is_none());
    let ids: Vec<(u32, Json)> = journal(&conn)
        .iter()
        .map(|r| (r.pos.ordinal, r.after.as_ref().unwrap()["id"].clone()))
        .collect();
    assert_eq!(ids, [(0, Json::from(1)), (1, Json::from(4))]);
    // A deferred foreign key failing at the end of a transaction.
    conn.execute_batch(
        "CREATE TABLE orders_lines (id INTEGER PRIMARY KEY, \
         order_id INTEGER REFERENCES orders(id) DEFERRABLE INITIALLY DEFERRED)",
    )
    .unwrap();
    set_capture(&conn, "hook", Some("^orders"))
        .unwrap()
        .unwrap();
    let errors = sql(
        &conn,
        5,
        true,
        &[
            "INSERT INTO orders (id, item) VALUES (5, 'e')",
            "INSERT INTO orders_lines (order_id) VALUES (99)",
        ],
    );
    assert!(
        errors[1].as_deref().unwrap().contains("FOREIGN KEY"),
        "{errors:?}"
    );
    assert_eq!(journal(&conn).len(), 2);
}

#[test]
fn test_triggers_captured_cairn_and_stream_tables_never() {
    let (_dir, conn) = setup();
    set_capture(&conn, "all", Some(".*")).unwrap().unwrap();
    conn.execute_batch(
        "CREATE TABLE audit (id INTEGER PRIMARY KEY, what TEXT);
         CREATE TABLE telemetry (device_id INTEGER, seq INTEGER);
         CREATE TRIGGER orders_audit AFTER INSERT ON orders \
         BEGIN INSERT INTO audit (what) VALUES ('order ' || new.id); END;",
    )
    .unwrap();
    let errors = sql(
        &conn,
        9,
        false,
        &[
            "INSERT INTO orders (id, item) VALUES (5, 'a')",
            "INSERT INTO telemetry VALUES (1, 1)",
            "SELECT * FROM _cairn_change_journal",
        ],
    );
    assert!(errors[0].is_none() && errors[1].is_none());
    assert!(
        errors[2].as_deref().unwrap().contains("not authorized"),
        "user SQL cannot read the journal: {errors:?}"
    );
    let tables: Vec<String> = journal(&conn).into_iter().map(|r| r.table).collect();
    assert_eq!(tables, ["orders", "audit"]);
}

#[test]
fn test_without_a_pattern_nothing_is_journaled() {
    let (_dir, conn) = setup();
    set_capture(&conn, "hook", None).unwrap().unwrap();
    sql(&conn, 2, false, &["INSERT INTO orders (item) VALUES ('a')"]);
    assert!(journal(&conn).is_empty());
    assert!(set_capture(&conn, "bad", Some("(")).unwrap().is_err());
}

#[test]
fn test_journal_trimmed_behind_capturing_cursors_only() {
    let (_dir, conn) = setup();
    for i in 1..=3 {
        sql(&conn, i, false, &["INSERT INTO orders (item) VALUES ('a')"]);
    }
    // A destination without changes does not hold the change journal back.
    crate::db::export::advance_cursor(&conn, &cursor("pg", 0)).unwrap();
    assert_eq!(
        backlog(&conn, Position::default()).unwrap(),
        (3, Some(1_000))
    );
    crate::db::export::advance_cursor(&conn, &cursor("hook", 2)).unwrap();
    let left: Vec<u64> = journal(&conn).iter().map(|r| r.pos.log_index).collect();
    assert_eq!(left, [3]);
    assert!(!trim_pending(&conn).unwrap());
    crate::db::export::forget_cursor(&conn, "hook").unwrap();
    assert!(journal(&conn).is_empty(), "nobody captures any more");
}

#[test]
fn test_capture_past_the_write_budget_fails_the_statement() {
    let (_dir, conn) = setup();
    // Three entries of 1.5 MiB each (the unit-test budget is 4 MiB per entry) ...
    for i in 0..3 {
        let e = sql(
            &conn,
            10 + i,
            false,
            &["INSERT INTO notes (body) VALUES (printf('%.*c', 1572864, 'x'))"],
        );
        assert!(e[0].is_none(), "{e:?}");
    }
    set_capture(&conn, "hook", Some("^notes$"))
        .unwrap()
        .unwrap();
    // ... and one that deletes them all: 4.5 MiB of before-images.
    let e = sql(
        &conn,
        20,
        false,
        &[
            "DELETE FROM notes",
            "INSERT INTO orders (item) VALUES ('a')",
        ],
    );
    assert!(e[0].as_deref().unwrap().contains("write budget"), "{e:?}");
    assert!(e[1].as_deref().unwrap().contains("write budget"), "{e:?}");
    let n: i64 = conn
        .query_row("SELECT count(*) FROM notes", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 3);
    assert!(journal(&conn).iter().all(|r| r.pos.log_index < 20));
}

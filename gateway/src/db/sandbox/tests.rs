//! The sandbox against real SQLite: refused and allowed statements, the write budget, read
//! limits, and identical bytes on replicas with different clocks and time zones.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use rusqlite::Connection;

use super::authorizer::is_plain_index;
use super::*;
use crate::db::sql::{Params, Statement, StatementResult, Value};

/// A writer like the state machine's, with Cairn's tables and one stream table.
fn writer(dir: &Path) -> Connection {
    let conn = open_writer(&dir.join("db.sqlite")).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    crate::db::registry::create_tables(&conn).unwrap();
    crate::db::schema::test_climate().install(&conn).unwrap();
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS _cairn_raft(key TEXT PRIMARY KEY, value BLOB) WITHOUT ROWID;
         INSERT OR REPLACE INTO _cairn_high_water VALUES(7, 10);
         INSERT OR REPLACE INTO _cairn_devices VALUES(7, x'0102');",
    )
    .unwrap();
    conn
}

/// Applies one entry the way the state machine does.
fn apply(
    conn: &Connection,
    index: u64,
    stamp_ms: i64,
    sts: Vec<Statement>,
) -> Vec<StatementResult> {
    conn.execute_batch("BEGIN").unwrap();
    let r = {
        let _e = enter_entry(index, Some(stamp_ms));
        apply_statements(conn, &sts, false, true, None).unwrap()
    };
    conn.execute_batch("COMMIT").unwrap();
    r
}

/// A fresh writer with one entry of `sqls` applied.
fn fresh(sqls: &[&str]) -> (tempfile::TempDir, Connection, Vec<StatementResult>) {
    let dir = tempfile::tempdir().unwrap();
    let conn = writer(dir.path());
    let r = apply(&conn, 1, STAMP, sql(sqls));
    (dir, conn, r)
}

/// The one value `q` answers.
fn one<T: rusqlite::types::FromSql>(conn: &Connection, q: &str) -> T {
    conn.query_row(q, [], |r| r.get(0)).unwrap()
}

fn sql(s: &[&str]) -> Vec<Statement> {
    s.iter().map(|s| Statement::new(*s)).collect()
}

fn err(r: &StatementResult) -> &str {
    r.error.as_deref().unwrap_or("")
}

const STAMP: i64 = 1_709_210_096_789; // 2024-02-29 12:34:56.789 UTC

#[test]
fn test_refused_writes() {
    let dir = tempfile::tempdir().unwrap();
    let conn = writer(dir.path());
    let outside = dir.path().join("outside.db");
    let attacks = [
        format!("ATTACH DATABASE '{}' AS x", outside.display()),
        "PRAGMA query_only=1".into(),
        "PRAGMA writable_schema=ON".into(),
        "PRAGMA journal_mode=DELETE".into(),
        "PRAGMA foreign_keys=OFF".into(),
        "PRAGMA page_count".into(),
        "PRAGMA database_list".into(),
        format!("VACUUM INTO '{}'", outside.display()),
        "VACUUM".into(),
        "SELECT load_extension('/tmp/x.so')".into(),
        "UPDATE _cairn_high_water SET seq = seq + 1000".into(),
        "DELETE FROM _cairn_devices".into(),
        "INSERT INTO _cairn_raft VALUES('membership', x'00')".into(),
        "CREATE TABLE x AS SELECT * FROM _cairn_devices".into(),
        "CREATE TABLE y AS SELECT count(*) FROM _cairn_devices".into(),
        "DROP TABLE _cairn_high_water".into(),
        "ALTER TABLE _cairn_devices ADD COLUMN z".into(),
        "CREATE INDEX i ON _cairn_devices(key)".into(),
        "CREATE TRIGGER tr AFTER INSERT ON _cairn_devices BEGIN SELECT 1; END".into(),
        "CREATE TABLE _cairn_mine(a)".into(),
        "UPDATE sqlite_master SET sql = ''".into(),
        "CREATE TRIGGER tr AFTER INSERT ON climate BEGIN SELECT 1; END".into(),
        "DROP TABLE climate".into(),
        "DROP TABLE telemetry".into(),
        "ALTER TABLE climate DROP COLUMN temperature".into(),
        "CREATE UNIQUE INDEX u ON climate(device_id)".into(),
        "CREATE INDEX e ON climate(abs(seq))".into(),
        "CREATE TEMP TABLE tt(a)".into(),
        "CREATE TEMP TRIGGER tt AFTER INSERT ON climate BEGIN SELECT 1; END".into(),
        "BEGIN".into(),
        "SAVEPOINT s".into(),
        "RELEASE cairn_statement".into(),
        "CREATE TABLE r(a UNIQUE ON CONFLICT ROLLBACK)".into(),
        "CREATE VIRTUAL TABLE d USING dbstat".into(),
        "CREATE TABLE c AS SELECT changes() AS n".into(),
        "CREATE TABLE c AS SELECT last_insert_rowid() AS n".into(),
        "CREATE TABLE c AS SELECT * FROM pragma_page_count".into(),
        "CREATE TABLE c AS SELECT * FROM dbstat".into(),
        "CREATE TABLE c AS SELECT datetime('now', 'localtime') AS n".into(),
        "CREATE TABLE c AS SELECT data FROM sqlite_dbpage".into(),
        "CREATE TABLE c AS SELECT data FROM sqlite_dbpage('main') WHERE pgno = 1".into(),
        "UPDATE sqlite_dbpage SET data = zeroblob(4096) WHERE pgno = 1".into(),
        "INSERT INTO sqlite_dbpage(pgno, data) VALUES(1, zeroblob(4096))".into(),
        "DELETE FROM sqlite_dbpage".into(),
        "CREATE VIRTUAL TABLE p USING sqlite_dbpage".into(),
    ];
    let sts: Vec<Statement> = attacks.iter().map(Statement::new).collect();
    let r = apply(&conn, 1, STAMP, sts);
    for (a, r) in attacks.iter().zip(&r) {
        assert!(r.error.is_some(), "{a} was allowed");
        eprintln!("{a}\n    -> {}", err(r));
    }
    assert!(!outside.exists(), "nothing is written outside the data dir");
    let hw: i64 = one(&conn, "SELECT seq FROM _cairn_high_water");
    assert_eq!(hw, 10);
    let objects: i64 = one(
        &conn,
        "SELECT count(*) FROM sqlite_master WHERE name IN ('x','y','c','r','d','p','_cairn_mine','tr','u','e')",
    );
    assert_eq!(objects, 0);
    assert!(!conn.is_autocommit() || conn.is_autocommit());
}

/// The raw-page table (compiled in for snapshot transfers) is neither on the connections user
/// SQL runs on nor allowed by the authorizer, in any mode: reading it would show `_cairn_*`
/// contents (device keys) byte for byte, writing it would bypass every rule.
#[test]
fn test_raw_pages_refused() {
    let dir = tempfile::tempdir().unwrap();
    let w = writer(dir.path());
    let r = open_reader(&dir.path().join("db.sqlite")).unwrap();
    let read = "SELECT count(*) FROM sqlite_dbpage";
    let out = crate::db::sql::query(&r, &sql(&[read]), false, &ReadLimits::default(), None);
    assert!(err(&out[0]).contains("sqlite_dbpage"), "{out:?}");
    // A connection that has the module, under the authorizer alone.
    let mut raw = Connection::open(dir.path().join("db.sqlite")).unwrap();
    let has: i64 = one(&raw, read);
    assert!(has > 0, "the build has sqlite_dbpage");
    raw.authorizer(Some(super::authorizer::authorize)).unwrap();
    for mode in [Mode::Read, Mode::Write, Mode::Load] {
        for q in [
            read,
            "SELECT data FROM sqlite_dbpage('main') WHERE pgno = 1",
            "UPDATE sqlite_dbpage SET data = data WHERE pgno = 1",
            "INSERT INTO sqlite_dbpage(pgno, data) VALUES(1, zeroblob(4096))",
            "CREATE VIRTUAL TABLE temp.p USING sqlite_dbpage",
        ] {
            let e = user(mode, || raw.execute_batch(q)).unwrap_err();
            let why = describe(&e);
            assert!(why.contains("not authorized"), "{mode:?} {q}: {why}");
        }
    }
    raw.authorizer(None::<fn(rusqlite::hooks::AuthContext<'_>) -> rusqlite::hooks::Authorization>)
        .unwrap();
    let ok: String = one(&raw, "PRAGMA integrity_check");
    assert_eq!(ok, "ok");
    let hw: i64 = one(&w, "SELECT seq FROM _cairn_high_water");
    assert_eq!(hw, 10);
}

#[test]
fn test_allowed_writes() {
    let dir = tempfile::tempdir().unwrap();
    let conn = writer(dir.path());
    let ok = [
        "CREATE TABLE p(id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT)",
        "CREATE TABLE c(id INTEGER PRIMARY KEY, p INTEGER REFERENCES p(id) ON DELETE CASCADE)",
        "INSERT INTO p(v) VALUES('a'), ('b')",
        "INSERT INTO c(p) VALUES(1), (2)",
        "DELETE FROM p WHERE id = 1",
        "CREATE INDEX climate_time ON climate(time DESC, device_id)",
        "CREATE TRIGGER pt AFTER INSERT ON p BEGIN INSERT INTO c(p) VALUES(new.id); END",
        "INSERT INTO p(v) VALUES('c')",
        "CREATE VIEW pv AS SELECT * FROM p",
        "PRAGMA user_version = 7",
        "PRAGMA table_info(_cairn_devices)",
        "PRAGMA index_list(climate)",
        "PRAGMA foreign_keys",
        "SELECT name FROM sqlite_master",
        "SELECT * FROM pragma_table_info('p')",
        "ANALYZE",
        "DELETE FROM climate WHERE seq < 0",
        "CREATE VIRTUAL TABLE f USING fts5(body)",
        "INSERT INTO f VALUES('hello world')",
        "INSERT INTO p(v) VALUES(random()), (hex(randomblob(4)))",
        "REINDEX",
    ];
    let r = apply(&conn, 1, STAMP, sql(&ok));
    for (a, r) in ok.iter().zip(&r) {
        assert!(r.error.is_none(), "{a}: {}", err(r));
    }
    let n: i64 = one(&conn, "SELECT count(*) FROM c");
    assert_eq!(n, 4, "cascade deleted one, the trigger added three");
    let v: i64 = one(&conn, "PRAGMA user_version");
    assert_eq!(v, 7);
}

#[test]
fn test_rowid_max_and_deferred_fk_and_rollback() {
    let (_dir, conn, r) = fresh(&[
        "CREATE TABLE t(a)",
        "INSERT INTO t(rowid, a) VALUES(9223372036854775807, 1)",
        "INSERT INTO t(rowid, a) VALUES(5, 1)",
        "CREATE TABLE par(id INTEGER PRIMARY KEY)",
        "CREATE TABLE ch(p REFERENCES par(id) DEFERRABLE INITIALLY DEFERRED)",
        "INSERT INTO ch VALUES(5)",
        "INSERT OR ROLLBACK INTO t VALUES(1)",
        "INSERT INTO t SELECT a FROM t",
    ]);
    assert!(err(&r[1]).contains("9223372036854775807"), "{}", err(&r[1]));
    assert!(r[2].error.is_none());
    assert!(err(&r[5]).contains("FOREIGN KEY"), "{}", err(&r[5]));
    assert!(err(&r[6]).contains("ROLLBACK"), "{}", err(&r[6]));
    assert!(r[7].error.is_none());
    let n: i64 = one(&conn, "SELECT count(*) FROM t");
    assert_eq!(n, 2);
}

#[test]
fn test_write_budget() {
    let (_dir, conn, r) = fresh(&[
        "CREATE TABLE t(a)",
        "INSERT INTO t VALUES(1)",
        "INSERT INTO t WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c",
        "INSERT INTO t VALUES(2)",
    ]);
    assert!(r[0].error.is_none() && r[1].error.is_none());
    assert!(err(&r[2]).contains("write budget"), "{}", err(&r[2]));
    assert!(err(&r[3]).contains("write budget"), "{}", err(&r[3]));
    let n: i64 = one(&conn, "SELECT count(*) FROM t");
    assert_eq!(
        n, 1,
        "the statements before the budget ran out stay applied"
    );
    let (_dir, _conn, r) = fresh(&[
        "CREATE TABLE b(x)",
        "INSERT INTO b WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 100) \
         SELECT randomblob(60000000) FROM c",
    ]);
    assert!(err(&r[1]).contains("write budget"), "{}", err(&r[1]));
    // The next entry has its own budget.
    let r = apply(&conn, 2, STAMP, sql(&["INSERT INTO t VALUES(3)"]));
    assert!(r[0].error.is_none());
}

/// Bytes built by `printf` and `||` cost few steps: the page cap stops them, at the same
/// statement on two replicas, which end with the same bytes; Cairn's own writes after the
/// entry are not capped.
#[test]
fn test_write_budget_in_bytes() {
    let entry = [
        "CREATE TABLE big(s)",
        "INSERT INTO big VALUES(printf('%.*c', 1000, 'x'))",
        // 200 rows of 64 KiB: 12.5 MiB, three times the unit tests' cap, in ~5,000 steps.
        "INSERT INTO big WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c \
         WHERE i < 200) SELECT printf('%.*c', 65536, 'y') || i FROM c",
        "INSERT INTO big VALUES('after')",
    ];
    let (_a, one_db, r1) = fresh(&entry);
    let (_b, two_db, r2) = fresh(&entry);
    let errors = |r: &[StatementResult]| r.iter().map(|r| r.error.clone()).collect::<Vec<_>>();
    assert_eq!(errors(&r1), errors(&r2));
    assert!(r1[0].error.is_none() && r1[1].error.is_none());
    assert!(
        err(&r1[2]).contains("MiB of new database pages"),
        "{}",
        err(&r1[2])
    );
    assert!(err(&r1[3]).contains("write budget"), "{}", err(&r1[3]));
    for conn in [&one_db, &two_db] {
        let n: i64 = one(conn, "SELECT count(*) FROM big");
        assert_eq!(n, 1, "only the statement before the cap stays");
        let cap: i64 = one(conn, "PRAGMA max_page_count");
        assert_eq!(cap, 0xffff_fffe, "the cap is lifted after the entry");
    }
    let bytes = |c: &Connection| -> String { one(c, "SELECT group_concat(hex(s)) FROM big") };
    assert_eq!(bytes(&one_db), bytes(&two_db));
    // A smaller entry afterwards is not refused.
    let r = apply(
        &one_db,
        2,
        STAMP,
        sql(&["INSERT INTO big VALUES(printf('%.*c', 100000, 'z'))"]),
    );
    assert!(r[0].error.is_none(), "{:?}", r[0].error);
}

#[test]
fn test_reader_is_read_only_and_limited() {
    let dir = tempfile::tempdir().unwrap();
    let w = writer(dir.path());
    w.execute_batch("CREATE TABLE t(a); INSERT INTO t VALUES(1), (2), (3)")
        .unwrap();
    let r = open_reader(&dir.path().join("db.sqlite")).unwrap();
    let limits = ReadLimits {
        timeout: Duration::from_millis(200),
        max_rows: 2,
        max_bytes: 1 << 20,
    };
    let q = |sqls: &[&str], cancel: Option<Arc<AtomicBool>>| {
        crate::db::sql::query(&r, &sql(sqls), false, &limits, cancel)
    };
    let out = q(
        &[
            "PRAGMA query_only=0",
            "INSERT INTO t VALUES(4)",
            "SELECT * FROM _cairn_devices",
            "SELECT count(*) FROM _cairn_devices",
            "CREATE TEMP TABLE x(a)",
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
            "SELECT * FROM t",
            "SELECT a FROM t LIMIT 2",
            "PRAGMA database_list",
            "SELECT datetime('now', 'localtime') IS NOT NULL",
        ],
        None,
    );
    for o in &out[..7] {
        assert!(o.error.is_some(), "{o:?}");
        eprintln!("{}", err(o));
    }
    assert!(err(&out[5]).contains("read_timeout"));
    assert!(
        err(&out[6]).contains("read_max_rows"),
        "the row cap is per request"
    );
    let fresh = crate::db::sql::query(
        &r,
        &sql(&[
            "SELECT a FROM t LIMIT 2",
            "PRAGMA database_list",
            "SELECT datetime('now', 'localtime') IS NOT NULL",
        ]),
        false,
        &ReadLimits::default(),
        None,
    );
    assert!(fresh.iter().all(|o| o.error.is_none()), "{fresh:?}");
    let cancel = Arc::new(AtomicBool::new(true));
    let out = q(
        &["WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"],
        Some(cancel),
    );
    assert!(
        err(&out[0]).contains("client went away"),
        "{}",
        err(&out[0])
    );
    let n: i64 = one(&w, "SELECT count(*) FROM t");
    assert_eq!(n, 3);
}

/// The statements of the determinism test: every source of non-determinism the leader's
/// rewrite does not see (defaults, triggers, bound parameters).
fn nondeterministic_entries() -> Vec<Vec<Statement>> {
    let bound = |s: &str, v: &str| Statement {
        sql: s.into(),
        params: Params::Positional(vec![Value::Text(v.into())]),
    };
    vec![
        sql(&[
            "CREATE TABLE t(id INTEGER PRIMARY KEY, a, ts DEFAULT CURRENT_TIMESTAMP, \
             d DEFAULT CURRENT_DATE, tm DEFAULT CURRENT_TIME, r DEFAULT (random()), \
             b DEFAULT (randomblob(8)))",
            "CREATE TABLE log(x, y, z, w)",
            "CREATE TRIGGER tr AFTER INSERT ON t BEGIN INSERT INTO log VALUES(\
             datetime('now'), julianday('now'), random(), randomblob(16)); END",
            "INSERT INTO t(a) VALUES(1)",
        ]),
        vec![
            bound("INSERT INTO t(a) VALUES(datetime(?))", "now"),
            bound("INSERT INTO t(a) VALUES(strftime('%s', ?))", "now"),
            bound("INSERT INTO t(a) VALUES(unixepoch(?, 'subsec'))", "now"),
            bound(
                "INSERT INTO t(a) VALUES(datetime(?, 'localtime'))",
                "2024-01-01",
            ),
            bound("INSERT INTO t(a) VALUES(datetime(?, 'utc'))", "2024-01-01"),
            Statement::new("INSERT INTO t(a) VALUES(changes())"),
            Statement::new("INSERT INTO t(a) VALUES(total_changes())"),
            Statement::new("INSERT INTO t(a) VALUES(last_insert_rowid())"),
            Statement::new("INSERT INTO t(a) SELECT time('now') || date() || unixepoch()"),
            Statement::new("INSERT INTO t(id, a) VALUES(9223372036854775807, 'max')"),
            Statement::new("INSERT INTO t(a) VALUES('after max')"),
        ],
    ]
}

/// Applies [`nondeterministic_entries`] to a fresh database in `dir` and returns its bytes.
fn replica(dir: &Path) -> Vec<u8> {
    let conn = writer(dir);
    for (i, sts) in nondeterministic_entries().into_iter().enumerate() {
        let r = apply(&conn, 10 + i as u64, STAMP + i as i64, sts);
        if i == 1 {
            for (k, res) in r.iter().enumerate().take(8).skip(3) {
                assert!(
                    res.error.is_some(),
                    "statement {k} of entry 1 must be refused"
                );
            }
            assert!(r[0].error.is_none() && r[8].error.is_none(), "{r:?}");
            assert!(r[9].error.is_some());
        }
    }
    let ts: String = one(&conn, "SELECT ts FROM t WHERE id = 1");
    assert_eq!(
        ts, "2024-02-29 12:34:56",
        "CURRENT_TIMESTAMP is the entry's stamp"
    );
    conn.pragma_update(None, "journal_mode", "DELETE").unwrap();
    drop(conn);
    std::fs::read(dir.join("db.sqlite")).unwrap()
}

/// Three replicas in this process under different time zones give identical files.
#[test]
fn test_same_bytes_under_different_time_zones() {
    let mut files = Vec::new();
    for tz in ["UTC", "America/Los_Angeles", "Asia/Kolkata"] {
        // SAFETY: tests in this module that read TZ only do so through SQLite's localtime,
        // which the apply path refuses; other threads do not depend on TZ.
        unsafe { std::env::set_var("TZ", tz) };
        let dir = tempfile::tempdir().unwrap();
        files.push(replica(dir.path()));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(files[0] == files[1] && files[1] == files[2]);
}

/// The child half of [`test_same_bytes_under_different_clocks`]: writes a replica into
/// `CAIRN_SANDBOX_REPLICA_DIR` when that is set (a no-op otherwise).
#[test]
fn replica_child() {
    if let Ok(dir) = std::env::var("CAIRN_SANDBOX_REPLICA_DIR") {
        replica(Path::new(&dir));
    }
}

/// Three replicas in separate processes with different clocks (libfaketime, if
/// installed) and time zones give identical files.
#[test]
fn test_same_bytes_under_different_clocks() {
    let faketime = Path::new("/usr/bin/faketime").exists();
    let exe = std::env::current_exe().unwrap();
    let mut files = Vec::new();
    for (clock, tz) in [
        ("2001-01-01 00:00:00", "UTC"),
        ("2030-06-15 23:59:59", "Pacific/Kiritimati"),
        ("2015-03-03 03:03:03", "America/St_Johns"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = if faketime {
            let mut c = std::process::Command::new("faketime");
            c.arg(clock).arg(&exe);
            c
        } else {
            std::process::Command::new(&exe)
        };
        let out = cmd
            .args([
                "--exact",
                "db::sandbox::tests::replica_child",
                "--nocapture",
            ])
            .env("TZ", tz)
            .env("CAIRN_SANDBOX_REPLICA_DIR", dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        files.push(std::fs::read(dir.path().join("db.sqlite")).unwrap());
    }
    assert!(files[0] == files[1] && files[1] == files[2]);
}

#[test]
fn test_precheck() {
    assert!(precheck("vacuum").is_err());
    assert!(precheck("/* x */ VACUUM INTO 'f'").is_err());
    assert!(precheck("INSERT OR ROLLBACK INTO t VALUES(1)").is_err());
    assert!(precheck("INSERT INTO t VALUES('ROLLBACK')").is_ok());
    assert!(is_plain_index(
        "CREATE INDEX i ON t(a COLLATE nocase DESC, \"b\")"
    ));
    assert!(!is_plain_index("CREATE INDEX i ON t(a) WHERE a > 0"));
    assert!(!is_plain_index("CREATE INDEX i ON t(abs(a))"));
    assert!(!is_plain_index("CREATE UNIQUE INDEX i ON t(a)"));
}

//! `/db/load`: replacing the database's user tables (and, from a Cairn backup, Cairn's state)
//! with the contents of an uploaded SQLite file or SQL text.
//!
//! On the leader, [`prepare`] turns the upload (already streamed to a file) into a checked
//! SQLite file on disk: SQL text runs in a scratch database under the sandbox's load rules
//! (no ATTACH, VACUUM, extensions; other pragmas are no-ops), a time limit and a size cap. The
//! file then travels the log in bounded chunks (`command::load`), and every replica swaps it in
//! with [`swap_in`] at the last chunk's index, in that entry's one transaction:
//!
//! - a plain file or dump replaces the user's tables (device stream tables keep their schema
//!   and get the loaded rows) and leaves the device registry, high-water marks, stream
//!   definitions and Raft metadata untouched;
//! - a Cairn backup (it holds [`STATE_TABLES`]) restores data and Cairn's state together:
//!   every table including the stream tables, the registry, the high-water marks and the stream
//!   definitions, never a mix of old and new. The Raft metadata (`_cairn_raft`) is never loaded.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use rusqlite::Connection;

use super::sandbox::{self, Kind, Mode};
use super::sql::Value;
use super::tables;

/// Cairn's tables a backup restores. `_cairn_raft` is never among them: the live cluster's
/// applied position and membership stay.
/// The site id (`tables::SITE`) is kept when the backup holds none. Device epochs
/// (`tables::DEVICE_EPOCHS`) are not replaced but merged: each device continues after the higher
/// of the live and the backup's epoch, so no export key is ever reused (`db::export`).
pub const STATE_TABLES: [&str; 6] = [
    tables::DEVICES,
    tables::HIGH_WATER,
    tables::DEVICE_TIMES,
    tables::STREAMS,
    tables::DEVICE_KEYS,
    tables::SITE,
];

/// User tables and views of a database: `(type, name)`, excluding SQLite's and Cairn's own
/// (`_cairn_*`).
pub fn user_objects(conn: &Connection) -> rusqlite::Result<Vec<(String, String)>> {
    let mut st = conn.prepare(
        "SELECT type, name FROM sqlite_master WHERE type IN ('table', 'view') \
         AND name NOT LIKE 'sqlite_%' AND substr(name, 1, 7) != '_cairn_' ORDER BY type DESC, name",
    )?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A load's source, ready to be sent through the log.
#[derive(Debug)]
pub struct Source {
    /// The SQLite file.
    pub path: PathBuf,
    /// True when it was made from SQL text or a gzip upload (the caller deletes it).
    pub scratch: bool,
    /// True when it holds Cairn's state ([`STATE_TABLES`]): a Cairn backup.
    pub backup: bool,
    /// Its size in bytes.
    pub size: u64,
    /// For SQL text, the counters of the dump's last statement (`last_insert_rowid()`,
    /// `changes()`), which rqlite answers a dump's load with.
    pub counters: Option<(i64, i64)>,
}

/// The longest statement a SQL dump may hold (SQLite's statement limit in the sandbox).
const MAX_STATEMENT: u64 = 16 << 20;

/// Turns an upload (a SQLite file, or SQL text such as `sqlite3 .dump` output, either one
/// possibly gzipped as `/db/backup?compress` makes it) into a checked SQLite file in
/// `scratch_dir`. An uploaded SQLite file is used where it is (after `PRAGMA quick_check`, so a
/// damaged file is refused here rather than at apply). SQL text is read one statement at a
/// time, never whole. A gzip upload inflates to at most `max_bytes`.
pub fn prepare(upload: &Path, scratch_dir: &Path, max_bytes: u64) -> anyhow::Result<Source> {
    if head(upload)?.starts_with(&[0x1f, 0x8b]) {
        let plain = scratch_dir.join(format!("load-{}.raw", rand::random::<u64>()));
        let r = gunzip(upload, &plain, max_bytes).and_then(|()| prepare_plain(&plain, scratch_dir));
        return match r {
            Ok(src) if src.path == plain => Ok(Source {
                scratch: true,
                ..src
            }),
            r => {
                let _ = std::fs::remove_file(&plain);
                r
            }
        };
    }
    prepare_plain(upload, scratch_dir)
}

fn head(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut head = vec![0u8; 16];
    let n = std::fs::File::open(path)?.read(&mut head)?;
    head.truncate(n);
    Ok(head)
}

/// Inflates the gzip file `from` into `to`, refusing more than `max_bytes`.
fn gunzip(from: &Path, to: &Path, max_bytes: u64) -> anyhow::Result<()> {
    let mut gz =
        flate2::read::MultiGzDecoder::new(std::io::BufReader::new(std::fs::File::open(from)?))
            .take(max_bytes + 1);
    let mut out = std::fs::File::create(to)?;
    let n = std::io::copy(&mut gz, &mut out)
        .map_err(|e| anyhow::anyhow!("the gzip upload does not inflate: {e}"))?;
    anyhow::ensure!(
        n <= max_bytes,
        "the gzip upload inflates beyond this node's max_db_size_mib ({} MiB)",
        max_bytes >> 20
    );
    Ok(())
}

fn prepare_plain(upload: &Path, scratch_dir: &Path) -> anyhow::Result<Source> {
    let (path, scratch, counters) = if head(upload)? == *b"SQLite format 3\0" {
        (upload.to_path_buf(), false, None)
    } else {
        let path = scratch_dir.join(format!("load-{}.db", rand::random::<u64>()));
        match run_text(upload, &path) {
            Ok(counters) => (path, true, Some(counters)),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        }
    };
    let checked = (|| -> anyhow::Result<bool> {
        let mut c = super::open_read_only(&path)?;
        sandbox::harden(&mut c, Kind::Scratch)?;
        let ok: String = c.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        anyhow::ensure!(ok == "ok", "the uploaded database is damaged: {ok}");
        let backup: bool = c.query_row(
            &format!(
                "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name IN ({})",
                STATE_TABLES.map(|t| format!("'{t}'")).join(", ")
            ),
            [],
            |r| r.get(0),
        )?;
        Ok(backup)
    })();
    let backup = match checked {
        Ok(b) => b,
        Err(e) => {
            if scratch {
                let _ = std::fs::remove_file(&path);
            }
            return Err(e);
        }
    };
    let size = std::fs::metadata(&path)?.len();
    Ok(Source {
        path,
        scratch,
        backup,
        size,
        counters,
    })
}

/// True when `sql` ends a complete statement (SQLite's own `sqlite3_complete`: semicolons in
/// strings, comments and trigger bodies do not count).
fn complete(sql: &str) -> bool {
    match std::ffi::CString::new(sql) {
        // SAFETY: a NUL-terminated string that lives across the call.
        Ok(c) => unsafe { rusqlite::ffi::sqlite3_complete(c.as_ptr()) != 0 },
        // A NUL byte: let SQLite refuse the text.
        Err(_) => true,
    }
}

/// Runs the SQL text in the file `upload` into a new database file at `path`, under the
/// sandbox's load rules, one complete statement at a time (memory holds one statement, at most
/// [`MAX_STATEMENT`] bytes, never the whole dump). Returns the last statement's counters.
fn run_text(upload: &Path, path: &Path) -> anyhow::Result<(i64, i64)> {
    use std::io::BufRead;
    let size = std::fs::metadata(upload)?.len();
    let mut reader = std::io::BufReader::new(std::fs::File::open(upload)?);
    let mut c = Connection::open(path)?;
    sandbox::harden(&mut c, Kind::Scratch)?;
    c.pragma_update(None, "journal_mode", "OFF")?;
    c.pragma_update(None, "synchronous", "OFF")?;
    // The loaded database may be a few times its SQL text, never unbounded (a recursive CTE in
    // a dump would otherwise become a load of any size).
    let pages = (size * 4 + (16 << 20)) / 4096;
    c.pragma_update(None, "max_page_count", pages as i64)?;
    let _load = sandbox::enter_load(&sandbox::ReadLimits {
        timeout: std::time::Duration::from_secs(60),
        ..Default::default()
    });
    let run = |sql: &str| {
        sandbox::user(Mode::Load, || c.execute_batch(sql)).map_err(|e| {
            match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::DiskFull) => anyhow::anyhow!(
                    "the loaded SQL grew beyond {} bytes (4 x its text + 16 MiB)",
                    pages * 4096
                ),
                _ => anyhow::anyhow!("{}", sandbox::describe(&e)),
            }
        })
    };
    let not_text = || anyhow::anyhow!("body is neither a SQLite file nor UTF-8 SQL");
    let mut stmt = String::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let room = MAX_STATEMENT + 1 - stmt.len() as u64;
        if (&mut reader).take(room).read_until(b'\n', &mut line)? == 0 {
            break;
        }
        stmt.push_str(std::str::from_utf8(&line).map_err(|_| not_text())?);
        anyhow::ensure!(
            stmt.len() as u64 <= MAX_STATEMENT,
            "a statement of the SQL text is longer than {MAX_STATEMENT} bytes"
        );
        // Only a line ending in `;` can end a statement; SQLite decides whether it does.
        if stmt.trim_end().ends_with(';') && complete(&stmt) {
            run(&stmt)?;
            stmt.clear();
        }
    }
    if !stmt.trim().is_empty() {
        run(&stmt)?;
    }
    Ok((c.last_insert_rowid(), c.changes() as i64))
}

/// Why a swap did not happen.
pub enum SwapError {
    /// The same on every replica (the file's contents refused or failing a constraint): a
    /// result; the caller rolls the swap back.
    Data(String),
    /// This replica's environment: a storage error (see `db::failure`).
    Env(rusqlite::Error),
}

/// Errors on the live database: the environment's stay storage errors, the rest are results.
fn live(e: rusqlite::Error) -> SwapError {
    if sandbox::is_environment_error(&e) {
        SwapError::Env(e)
    } else {
        SwapError::Data(sandbox::describe(&e))
    }
}

/// Errors reading the loaded file: every replica holds the same bytes, so they are results.
fn src(e: rusqlite::Error) -> SwapError {
    SwapError::Data(format!("reading the loaded database: {e}"))
}

/// Replaces the live database's user tables with those of the SQLite file at `file`, and with
/// `restore_state` also Cairn's state (see the module doc). Runs inside the caller's
/// transaction; returns the number of rows loaded.
pub fn swap_in(conn: &Connection, file: &Path, restore_state: bool) -> Result<u64, SwapError> {
    let mut from = super::open_read_only(file).map_err(src)?;
    sandbox::harden(&mut from, Kind::Scratch).map_err(src)?;
    let streams = sandbox::stream_tables(conn);
    // A plain load keeps the stream tables' (Cairn's) schema; a backup brings its own.
    let kept = |name: &str| !restore_state && streams.contains(&name.to_ascii_lowercase());
    let objects: Vec<(String, String, String, String)> = sandbox::system(|| {
        from.prepare(
            "SELECT type, name, sql, tbl_name FROM sqlite_master WHERE sql IS NOT NULL \
             AND name NOT LIKE 'sqlite_%' AND substr(name, 1, 7) != '_cairn_' \
             AND substr(tbl_name, 1, 7) != '_cairn_' \
             ORDER BY CASE type WHEN 'table' THEN 0 WHEN 'index' THEN 1 WHEN 'view' THEN 2 ELSE 3 END, rowid",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<rusqlite::Result<_>>()
    })
    .map_err(src)?;
    // Out with the old: Cairn's own statements (stream tables may not be dropped by users).
    for (kind, name) in user_objects(conn).map_err(live)? {
        let sql = if kept(&name) {
            format!("DELETE FROM {}", quote_ident(&name))
        } else {
            format!(
                "DROP {} IF EXISTS {}",
                kind.to_uppercase(),
                quote_ident(&name)
            )
        };
        sandbox::system(|| conn.execute_batch(&sql)).map_err(live)?;
    }
    // The new schema under the user rules (no `_cairn_` names, no triggers on stream tables...).
    for (_, _, sql, _) in objects.iter().filter(|o| o.0 == "table" && !kept(&o.1)) {
        user_ddl(conn, sql, &streams)?;
    }
    let mut rows = 0;
    for (_, name, _, _) in objects.iter().filter(|o| o.0 == "table") {
        rows += copy_rows(&from, conn, name)?;
    }
    for (_, _, sql, _) in objects.iter().filter(|o| o.0 != "table" && !kept(&o.3)) {
        user_ddl(conn, sql, &streams)?;
    }
    if restore_state {
        // Only proposed for a caller with the `all` permission (`Cluster::load_file`).
        sandbox::system(|| {
            super::registry::create_tables(conn)?;
            super::registry::create_key_table(conn)?;
            super::export::create_tables(conn)?;
            super::schema::Schema::load(conn).map(drop)
        })
        .map_err(live)?;
        let present = |t: &str| -> Result<bool, SwapError> {
            from.query_row(
                "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [t],
                |r| r.get(0),
            )
            .map_err(src)
        };
        for t in STATE_TABLES {
            let present = present(t)?;
            if t == tables::SITE && !present {
                continue;
            }
            sandbox::system(|| conn.execute_batch(&format!("DELETE FROM {t}"))).map_err(live)?;
            if present {
                rows += copy_rows(&from, conn, t)?;
            }
        }
        // The restored devices' seqs may repeat ones exported since the backup: a new epoch.
        let epochs: Vec<(i64, i64)> = if present(tables::DEVICE_EPOCHS)? {
            sandbox::system(|| {
                from.prepare(&format!(
                    "SELECT device_id, epoch FROM {}",
                    tables::DEVICE_EPOCHS
                ))?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(src)?
        } else {
            Vec::new()
        };
        sandbox::system(|| {
            super::export::merge_epochs(conn, &epochs)?;
            super::export::bump_all_epochs(conn, 0)
        })
        .map_err(live)?;
        // Device batches need every defined stream table, whatever the backup held.
        sandbox::system(|| super::schema::Schema::load(conn)?.install(conn)).map_err(live)?;
    }
    Ok(rows)
}

/// Runs one statement of the loaded schema under the user rules of a write.
fn user_ddl(conn: &Connection, sql: &str, streams: &BTreeSet<String>) -> Result<(), SwapError> {
    sandbox::precheck(sql).map_err(|e| SwapError::Data(format!("not authorized: {e}")))?;
    sandbox::with_streams(streams.clone(), || {
        sandbox::user(Mode::Write, || conn.execute_batch(sql))
    })
    .map_err(live)
}

/// Copies every row of `table` from the loaded file into the live table of the same name: its
/// ordinary columns, not the generated ones (the stream tables' `time` and `received_at`,
/// computed from `time_ms` and `age_ms`).
fn copy_rows(from: &Connection, to: &Connection, table: &str) -> Result<u64, SwapError> {
    let stored: Vec<String> = sandbox::system(|| {
        from.prepare("SELECT name FROM pragma_table_xinfo(?1) WHERE hidden = 0 ORDER BY cid")?
            .query_map([table], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<_>>()
    })
    .map_err(src)?;
    let cols: Vec<String> = stored.iter().map(|c| quote_ident(c)).collect();
    let mut select = from
        .prepare(&format!(
            "SELECT {} FROM {}",
            cols.join(", "),
            quote_ident(table)
        ))
        .map_err(src)?;
    let n = select.column_count();
    let insert = format!(
        "INSERT INTO {}({}) VALUES({})",
        quote_ident(table),
        cols.join(", "),
        vec!["?"; n].join(", ")
    );
    let mut insert = sandbox::system(|| to.prepare(&insert)).map_err(live)?;
    let mut q = select.raw_query();
    let mut rows = 0;
    while let Some(row) = q.next().map_err(src)? {
        let values = (0..n)
            .map(|i| row.get_ref(i).map(Value::from))
            .collect::<rusqlite::Result<Vec<Value>>>()
            .map_err(src)?;
        sandbox::system(|| insert.execute(rusqlite::params_from_iter(values.iter())))
            .map_err(live)?;
        rows += 1;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A live database like a replica's: Cairn's tables, one stream table, a user table.
    fn live(dir: &Path) -> Connection {
        let conn = crate::db::open(&dir.join("db.sqlite")).unwrap();
        crate::db::registry::create_tables(&conn).unwrap();
        crate::db::schema::test_climate().install(&conn).unwrap();
        conn.execute_batch(
            "INSERT INTO _cairn_high_water VALUES(7, 10);
             INSERT INTO _cairn_devices VALUES(7, x'0102');
             INSERT INTO _cairn_raft VALUES('last_applied', x'01');
             CREATE TABLE old(a); INSERT INTO old VALUES(1);",
        )
        .unwrap();
        conn
    }

    fn upload(dir: &Path, text: &str) -> anyhow::Result<Source> {
        let up = dir.join(format!("upload-{}.sql", rand::random::<u32>()));
        std::fs::write(&up, text).unwrap();
        prepare(&up, dir, 1 << 30)
    }

    fn one<T: rusqlite::types::FromSql>(conn: &Connection, q: &str) -> T {
        conn.query_row(q, [], |r| r.get(0)).unwrap()
    }

    fn swap(conn: &Connection, src: &Source) -> Result<u64, String> {
        conn.execute_batch("BEGIN").unwrap();
        let r = swap_in(conn, &src.path, src.backup);
        match r {
            Ok(n) => {
                conn.execute_batch("COMMIT").unwrap();
                Ok(n)
            }
            Err(SwapError::Data(m)) => {
                conn.execute_batch("ROLLBACK").unwrap();
                Err(m)
            }
            Err(SwapError::Env(e)) => panic!("environment error: {e}"),
        }
    }

    #[test]
    fn test_sql_text_is_sandboxed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside.db");
        for bad in [
            format!("ATTACH '{}' AS x; CREATE TABLE x.t(a);", outside.display()),
            format!("VACUUM INTO '{}'", outside.display()),
            "SELECT load_extension('x')".into(),
            "CREATE TABLE t(a); WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) \
             INSERT INTO t SELECT randomblob(1000) FROM c"
                .into(),
        ] {
            let e = upload(dir.path(), &bad).unwrap_err().to_string();
            eprintln!("{bad}\n    -> {e}");
        }
        assert!(!outside.exists());
    }

    #[test]
    fn test_plain_load_keeps_cairns_state() {
        let dir = tempfile::tempdir().unwrap();
        let conn = live(dir.path());
        let src = upload(
            dir.path(),
            "PRAGMA foreign_keys=OFF;\nBEGIN TRANSACTION;\n\
             CREATE TABLE u(a);\nINSERT INTO u VALUES(1), (2);\n\
             CREATE TABLE _cairn_raft(key, value);\nINSERT INTO _cairn_raft VALUES('x', 1);\n\
             CREATE INDEX ui ON u(a);\nCOMMIT;",
        )
        .unwrap();
        assert!(!src.backup);
        assert_eq!(swap(&conn, &src), Ok(2));
        let n: i64 = one(&conn, "SELECT count(*) FROM u");
        assert_eq!(n, 2);
        let old: i64 = one(
            &conn,
            "SELECT count(*) FROM sqlite_master WHERE name = 'old'",
        );
        assert_eq!(old, 0, "user tables are replaced");
        let hw: i64 = one(
            &conn,
            "SELECT seq FROM _cairn_high_water WHERE device_id = 7",
        );
        assert_eq!(hw, 10, "high-water untouched");
        let devices: i64 = one(&conn, "SELECT count(*) FROM _cairn_devices");
        assert_eq!(devices, 1, "registry untouched");
        let raft: i64 = one(&conn, "SELECT count(*) FROM _cairn_raft");
        assert_eq!(raft, 1, "Raft metadata untouched");
        let climate: i64 = one(
            &conn,
            "SELECT count(*) FROM sqlite_master WHERE name = 'climate'",
        );
        assert_eq!(climate, 1, "stream tables keep their schema");
    }

    #[test]
    fn test_backup_restores_data_and_state_together() {
        let dir = tempfile::tempdir().unwrap();
        let conn = live(dir.path());
        let src = upload(
            dir.path(),
            "CREATE TABLE u(a); INSERT INTO u VALUES(1);
             CREATE TABLE _cairn_devices (device_id INTEGER PRIMARY KEY, key BLOB NOT NULL);
             INSERT INTO _cairn_devices VALUES(1, x'00'), (2, x'01');
             CREATE TABLE _cairn_high_water (device_id INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
             INSERT INTO _cairn_high_water VALUES(1, 99);
             CREATE TABLE _cairn_raft(key, value); INSERT INTO _cairn_raft VALUES('membership', 1);",
        )
        .unwrap();
        assert!(src.backup);
        assert_eq!(swap(&conn, &src), Ok(4));
        let devices: String = one(&conn, "SELECT group_concat(device_id) FROM _cairn_devices");
        assert_eq!(devices, "1,2", "the backup's registry, not a mix");
        let hw: String = one(
            &conn,
            "SELECT group_concat(device_id || ':' || seq) FROM _cairn_high_water",
        );
        assert_eq!(hw, "1:99");
        let raft: String = one(&conn, "SELECT group_concat(key) FROM _cairn_raft");
        assert_eq!(raft, "last_applied", "Raft metadata is never loaded");
        let telemetry: i64 = one(
            &conn,
            "SELECT count(*) FROM sqlite_master WHERE name = 'telemetry'",
        );
        assert_eq!(telemetry, 1, "the stream tables Cairn needs exist");
    }

    /// Stream tables and `dead_letter` store `time_ms`/`age_ms` and generate `time` and
    /// `received_at`: a backup of them, and a plain file holding them, load their stored
    /// columns and read back the same.
    #[test]
    fn test_generated_time_columns_load() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::create_dir(&a).unwrap();
        let conn = live(&a);
        crate::db::dead_letter::create_table(&conn).unwrap();
        conn.execute_batch(
            "INSERT INTO climate(device_id, seq, time_ms, age_ms, temperature) \
             VALUES(7, 1, 1795632239000, 1000, 20.1);
             INSERT INTO dead_letter(device_id, seq, stream, reason, \"values\", record, \
             time_ms, age_ms) VALUES(7, 2, 1, 'r', '[1]', x'00', 1795632239500, 500);",
        )
        .unwrap();
        let shown = |c: &Connection| -> (String, String) {
            (
                one(
                    c,
                    "SELECT time || ' ' || received_at || ' ' || temperature FROM climate",
                ),
                one(c, "SELECT time || ' ' || received_at FROM dead_letter"),
            )
        };
        let before = shown(&conn);
        assert_eq!(
            before.0,
            "2026-11-25T18:43:59.000Z 2026-11-25T18:44:00.000Z 20.1"
        );
        let backup = dir.path().join("backup.db");
        let plain = dir.path().join("plain.db");
        for (file, keep_state) in [(&backup, true), (&plain, false)] {
            let raw = Connection::open(a.join("db.sqlite")).unwrap();
            raw.execute("VACUUM INTO ?1", [file.to_string_lossy()])
                .unwrap();
            if !keep_state {
                let f = Connection::open(file).unwrap();
                for t in STATE_TABLES.iter().chain([&tables::RAFT]) {
                    f.execute_batch(&format!("DROP TABLE IF EXISTS {t}"))
                        .unwrap();
                }
            }
        }
        for (file, is_backup) in [(&backup, true), (&plain, false)] {
            let b = dir.path().join(format!("b-{is_backup}"));
            std::fs::create_dir(&b).unwrap();
            let target = live(&b);
            let src = prepare(file, dir.path(), 1 << 30).unwrap();
            assert_eq!(src.backup, is_backup);
            swap(&target, &src).unwrap();
            assert_eq!(shown(&target), before, "backup: {is_backup}");
        }
    }

    #[test]
    fn test_refused_schema_rolls_the_whole_load_back() {
        let dir = tempfile::tempdir().unwrap();
        let conn = live(dir.path());
        let src = upload(
            dir.path(),
            "CREATE TABLE u(a); INSERT INTO u VALUES(1); CREATE VIRTUAL TABLE d USING dbstat;",
        )
        .unwrap();
        let e = swap(&conn, &src).unwrap_err();
        assert!(e.contains("dbstat"), "{e}");
        let old: i64 = one(&conn, "SELECT count(*) FROM old");
        assert_eq!(old, 1, "nothing of the load stayed");
    }

    /// A dump is read statement by statement: statements over several lines, `;` inside
    /// strings, comments and trigger bodies, and no newline at the end.
    #[test]
    fn test_sql_text_statements_across_lines() {
        let dir = tempfile::tempdir().unwrap();
        let src = upload(
            dir.path(),
            "CREATE TABLE t (a TEXT,\n b INTEGER);\n\
             -- a comment; with a semicolon\n\
             INSERT INTO t VALUES('x;\ny', 1);\n\
             CREATE TABLE log (n);\n\
             CREATE TRIGGER tr AFTER INSERT ON t BEGIN\n  INSERT INTO log VALUES(1);\n  INSERT INTO log VALUES(2);\nEND;\n\
             INSERT INTO t VALUES('z', 2); INSERT INTO t VALUES('w', 3)",
        )
        .unwrap();
        let c = Connection::open(&src.path).unwrap();
        assert_eq!(one::<i64>(&c, "SELECT count(*) FROM t"), 3);
        assert_eq!(one::<String>(&c, "SELECT a FROM t WHERE b = 1"), "x;\ny");
        assert_eq!(one::<i64>(&c, "SELECT count(*) FROM log"), 4);
        // The dump's own counters: the last statement's.
        assert_eq!(src.counters, Some((3, 1)));
    }

    #[test]
    fn test_sql_text_statement_too_long_or_not_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let long = format!(
            "INSERT INTO t VALUES('{}');",
            "x".repeat(MAX_STATEMENT as usize)
        );
        let e = upload(dir.path(), &format!("CREATE TABLE t (a);\n{long}")).unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
        let up = dir.path().join("bad.sql");
        std::fs::write(&up, b"CREATE TABLE t (a);\n\xff\xfe;\n").unwrap();
        let e = prepare(&up, dir.path(), 1 << 30).unwrap_err();
        assert!(e.to_string().contains("neither a SQLite file"), "{e}");
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(bytes).unwrap();
        gz.finish().unwrap()
    }

    /// `/db/backup?compress` output loads back: a gzipped SQLite file and a gzipped dump; what
    /// inflates beyond the node's limit is refused and leaves no file behind.
    #[test]
    fn test_gzip_uploads() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("plain.db");
        Connection::open(&db)
            .unwrap()
            .execute_batch("CREATE TABLE g (v); INSERT INTO g VALUES('zipped');")
            .unwrap();
        let up = dir.path().join("up.gz");
        std::fs::write(&up, gzip(&std::fs::read(&db).unwrap())).unwrap();
        let src = prepare(&up, dir.path(), 1 << 30).unwrap();
        assert!(src.scratch && !src.backup && src.counters.is_none());
        let c = Connection::open(&src.path).unwrap();
        assert_eq!(one::<String>(&c, "SELECT v FROM g"), "zipped");

        std::fs::write(
            &up,
            gzip(b"CREATE TABLE h (v);\nINSERT INTO h VALUES(5);\n"),
        )
        .unwrap();
        let src = prepare(&up, dir.path(), 1 << 30).unwrap();
        let c = Connection::open(&src.path).unwrap();
        assert_eq!(one::<i64>(&c, "SELECT v FROM h"), 5);

        let before = std::fs::read_dir(dir.path()).unwrap().count();
        std::fs::write(&up, gzip(&vec![b' '; 1 << 20])).unwrap();
        let e = prepare(&up, dir.path(), 1000).unwrap_err();
        assert!(e.to_string().contains("inflates beyond"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), before);
    }
}

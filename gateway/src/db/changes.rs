//! Changes of user tables for export: what every replica captures while it applies a SQL
//! entry, and the journal the leader's export runners read (`export::changes`).
//!
//! Whether capture is on, and for which tables, is replicated state: each destination with
//! `changes = "REGEX"` in its `[[export]]` entry is registered by the leader through the log
//! (`ExportCommand::Capture`, format version 2), and every replica applies a SQL entry with
//! the union of the registered patterns. A node's own config is never read at apply time.
//!
//! Capture uses SQLite's pre-update hook (`sqlite3_preupdate_hook`, compiled in through
//! `LIBSQLITE3_FLAGS`): registered on the writer only while a SQL entry's statements run and
//! a pattern is registered, it copies each inserted, updated or deleted row of a matching
//! table (`main` schema; not Cairn's `_cairn_*` tables, the device stream tables or
//! `dead_letter`) into memory; after each successful statement, inside the statement's
//! savepoint, the copies become journal rows. A failing statement (or a failing
//! `?transaction`) rolls its journal rows back with its changes, so the journal holds exactly
//! the committed changes, in the order SQLite made them (user triggers and foreign-key actions
//! included). The hook runs in the SQLite VM of every replica at the same point of the same
//! entry, so every replica journals the same rows; with the hook registered SQLite deletes row
//! by row instead of truncating, which it then also does on every replica.
//!
//! What capture holds in memory counts against the entry's write budget
//! ([`sandbox::WRITE_BUDGET_BYTES`]): past it the statement fails with the budget's message,
//! identically everywhere. Journal rows are written as Cairn, so they take no VM steps of the
//! user's budget, but their pages count in the entry's page cap (as the changes themselves do).
//!
//! | table | columns | meaning |
//! |---|---|---|
//! | [`tables::CHANGE_CAPTURE`] | `name`, `pattern` | per destination, the tables whose changes it exports |
//! | [`tables::CHANGE_JOURNAL`] | `log_index`, `ordinal`, `history`, `at_ms`, `tbl`, `op`, `old_row_id`, `new_row_id`, `before`, `after` | one row per captured change |
//!
//! A change's idempotency key is (site, history epoch, log index, ordinal in the entry): one
//! entry may change a row several times, and a restore or a recovery starts a new history
//! that reuses log indices. `before`/`after` are JSON objects of column to value (blobs as
//! base64), as delivered. Both tables are created by the first `Capture` entry, so a cluster
//! at version 1 never has them. Journal rows are deleted once every destination that
//! registered a pattern has committed a cursor past them, at most [`TRIM_PER_ENTRY`] per
//! entry (`db::export::advance_cursor`).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{CStr, c_char, c_int, c_void};

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, ffi};
use serde_json::{Map, Value as Json};

use super::export::Position;
use super::{sandbox, tables};

/// Journal rows one entry deletes at most when cursors move (a destination forgotten after a
/// long outage must not stall apply with one huge delete).
pub const TRIM_PER_ENTRY: u64 = 20_000;

/// What happened to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "INSERT",
            Op::Update => "UPDATE",
            Op::Delete => "DELETE",
        }
    }

    fn parse(s: &str) -> Option<Op> {
        match s {
            "INSERT" => Some(Op::Insert),
            "UPDATE" => Some(Op::Update),
            "DELETE" => Some(Op::Delete),
            _ => None,
        }
    }
}

/// One journaled change, as the export runners read it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeRow {
    pub pos: Position,
    /// The history epoch when it was applied (`command::backup::history_epoch`).
    pub history: u64,
    /// The entry's stamp (Unix ms; 0 for an entry without one).
    pub at_ms: i64,
    pub table: String,
    pub op: Op,
    /// Rowids as SQLite reports them (0 for a `WITHOUT ROWID` table).
    pub old_row_id: i64,
    pub new_row_id: i64,
    pub before: Option<Map<String, Json>>,
    pub after: Option<Map<String, Json>>,
}

/// A SQL value as JSON (blobs as base64, like rqlite).
pub fn value_json(v: &Value) -> Json {
    use base64::Engine as _;
    match v {
        Value::Null => Json::Null,
        Value::Integer(i) => Json::from(*i),
        Value::Real(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Value::Text(s) => Json::from(s.as_str()),
        Value::Blob(b) => Json::from(base64::engine::general_purpose::STANDARD.encode(b)),
    }
}

/// True for "no such table": nothing of capture was registered yet.
fn is_absent(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(_, Some(m)) if m.contains("no such table"))
}

fn absent_is<T>(r: rusqlite::Result<T>, absent: T) -> rusqlite::Result<T> {
    match r {
        Err(e) if is_absent(&e) => Ok(absent),
        other => other,
    }
}

fn create_tables(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {} (name TEXT PRIMARY KEY, pattern TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS {} (log_index INTEGER NOT NULL, ordinal INTEGER NOT NULL, \
         history INTEGER NOT NULL, at_ms INTEGER NOT NULL, tbl TEXT NOT NULL, op TEXT NOT NULL, \
         old_row_id INTEGER NOT NULL, new_row_id INTEGER NOT NULL, before TEXT, after TEXT, \
         PRIMARY KEY (log_index, ordinal)) WITHOUT ROWID;",
        tables::CHANGE_CAPTURE,
        tables::CHANGE_JOURNAL
    ))
}

/// Registers (`Some`) or removes (`None`) destination `name`'s pattern. An invalid pattern is
/// refused (the same on every replica: the regex crate is part of the binary).
pub fn set_capture(
    conn: &Connection,
    name: &str,
    pattern: Option<&str>,
) -> rusqlite::Result<Result<Option<String>, String>> {
    if let Some(p) = pattern
        && let Err(e) = regex::Regex::new(p)
    {
        return Ok(Err(format!("changes pattern of {name}: {e}")));
    }
    create_tables(conn)?;
    match pattern {
        Some(p) => conn.execute(
            &format!(
                "INSERT INTO {} (name, pattern) VALUES (?1, ?2) \
                 ON CONFLICT(name) DO UPDATE SET pattern = excluded.pattern",
                tables::CHANGE_CAPTURE
            ),
            [name, p],
        )?,
        None => conn.execute(
            &format!("DELETE FROM {} WHERE name = ?1", tables::CHANGE_CAPTURE),
            [name],
        )?,
    };
    trim(conn, TRIM_PER_ENTRY)?;
    Ok(Ok(pattern.map(str::to_string)))
}

/// Forgets destination `name`'s pattern, if capture was ever registered (a version 1 cluster
/// has no capture tables, and this creates none).
pub fn forget_capture(conn: &Connection, name: &str) -> rusqlite::Result<()> {
    let r = conn
        .execute(
            &format!("DELETE FROM {} WHERE name = ?1", tables::CHANGE_CAPTURE),
            [name],
        )
        .map(drop);
    absent_is(r, ())?;
    trim(conn, TRIM_PER_ENTRY)
}

/// Every registered pattern, by destination.
pub fn captures(conn: &Connection) -> rusqlite::Result<BTreeMap<String, String>> {
    let r = conn
        .prepare_cached(&format!(
            "SELECT name, pattern FROM {} ORDER BY name",
            tables::CHANGE_CAPTURE
        ))
        .and_then(|mut st| {
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<BTreeMap<String, String>>>()
        });
    absent_is(r, BTreeMap::new())
}

/// The lowest cursor of the destinations that registered a pattern (one without a cursor
/// counts as the start); `Some(None)`: none registered, so every journal row may go; `None`:
/// capture was never registered.
fn min_capturing_cursor(conn: &Connection) -> rusqlite::Result<Option<Option<Position>>> {
    let r = conn
        .prepare_cached(&format!(
            "SELECT coalesce(c.log_index, 0), coalesce(c.ordinal, 0) FROM {} p \
             LEFT JOIN {} c ON c.name = p.name ORDER BY 1, 2 LIMIT 1",
            tables::CHANGE_CAPTURE,
            tables::EXPORT_CURSORS
        ))
        .and_then(|mut st| {
            st.query_row([], |r| {
                Ok(Position {
                    log_index: r.get::<_, i64>(0)? as u64,
                    ordinal: r.get(1)?,
                })
            })
            .optional()
        })
        .map(Some);
    absent_is(r, None)
}

/// Deletes at most `limit` journal rows every capturing destination has passed (all of them
/// once no destination captures). A no-op without capture tables.
pub fn trim(conn: &Connection, limit: u64) -> rusqlite::Result<()> {
    let Some(min) = min_capturing_cursor(conn)? else {
        return Ok(());
    };
    let upto = min.unwrap_or(Position {
        log_index: u64::MAX >> 1,
        ordinal: u32::MAX,
    });
    conn.prepare_cached(&format!(
        "DELETE FROM {t} WHERE (log_index, ordinal) IN (SELECT log_index, ordinal FROM {t} \
         WHERE (log_index, ordinal) <= (?1, ?2) ORDER BY log_index, ordinal LIMIT ?3)",
        t = tables::CHANGE_JOURNAL
    ))?
    .execute(rusqlite::params![
        upto.log_index as i64,
        upto.ordinal,
        limit as i64
    ])?;
    Ok(())
}

/// True when journal rows wait for [`trim`] (every capturing destination passed them): the
/// leader's runners commit their cursor again to delete them.
pub fn trim_pending(conn: &Connection) -> rusqlite::Result<bool> {
    let Some(min) = min_capturing_cursor(conn)? else {
        return Ok(false);
    };
    let upto = min.unwrap_or(Position {
        log_index: u64::MAX >> 1,
        ordinal: u32::MAX,
    });
    conn.query_row(
        &format!(
            "SELECT count(*) > 0 FROM (SELECT 1 FROM {} WHERE (log_index, ordinal) <= (?1, ?2) \
             LIMIT 1)",
            tables::CHANGE_JOURNAL
        ),
        rusqlite::params![upto.log_index as i64, upto.ordinal],
        |r| r.get(0),
    )
}

/// Up to `limit` journal rows after `after`, in commit order.
pub fn changes_after(
    conn: &Connection,
    after: Position,
    limit: usize,
) -> rusqlite::Result<Vec<ChangeRow>> {
    let r = conn
        .prepare_cached(&format!(
            "SELECT log_index, ordinal, history, at_ms, tbl, op, old_row_id, new_row_id, before, \
             after FROM {} WHERE (log_index, ordinal) > (?1, ?2) ORDER BY log_index, ordinal \
             LIMIT ?3",
            tables::CHANGE_JOURNAL
        ))
        .and_then(|mut st| {
            st.query_map(
                rusqlite::params![after.log_index as i64, after.ordinal, limit as i64],
                |r| {
                    let op: String = r.get(5)?;
                    let map = |i: usize| -> rusqlite::Result<Option<Map<String, Json>>> {
                        Ok(r.get::<_, Option<String>>(i)?
                            .and_then(|t| serde_json::from_str(&t).ok()))
                    };
                    Ok(ChangeRow {
                        pos: Position {
                            log_index: r.get::<_, i64>(0)? as u64,
                            ordinal: r.get(1)?,
                        },
                        history: r.get::<_, i64>(2)? as u64,
                        at_ms: r.get(3)?,
                        table: r.get(4)?,
                        op: Op::parse(&op).unwrap_or(Op::Update),
                        old_row_id: r.get(6)?,
                        new_row_id: r.get(7)?,
                        before: map(8)?,
                        after: map(9)?,
                    })
                },
            )?
            .collect()
        });
    absent_is(r, Vec::new())
}

/// Journal rows after `after` and the oldest one's stamp: a destination's lag in changes.
pub fn backlog(conn: &Connection, after: Position) -> rusqlite::Result<(u64, Option<i64>)> {
    let r = conn.query_row(
        &format!(
            "SELECT count(*), min(at_ms) FROM {} WHERE (log_index, ordinal) > (?1, ?2)",
            tables::CHANGE_JOURNAL
        ),
        rusqlite::params![after.log_index as i64, after.ordinal],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Option<i64>>(1)?)),
    );
    absent_is(r, (0, None))
}

// ---------------------------------------------------------------------------------------------
// Capture while applying.
// ---------------------------------------------------------------------------------------------

/// One row change as the hook copied it.
struct Captured {
    table: String,
    op: Op,
    old_row_id: i64,
    new_row_id: i64,
    before: Option<Vec<Value>>,
    after: Option<Vec<Value>>,
}

/// What the hook sees: the tables it captures and what it copied since the last flush.
struct State {
    filter: regex::Regex,
    /// Device stream tables and `dead_letter` (lower-cased): never captured.
    streams: BTreeSet<String>,
    decided: HashMap<String, bool>,
    pending: Vec<Captured>,
    /// Bytes copied in this entry; past the write budget the rest is dropped and `over` set.
    bytes: u64,
    over: bool,
}

impl State {
    fn wants(&mut self, table: &str) -> bool {
        if let Some(w) = self.decided.get(table) {
            return *w;
        }
        let lower = table.to_ascii_lowercase();
        let w = !sandbox::is_cairn(table)
            && !lower.starts_with("sqlite_")
            && !self.streams.contains(&lower)
            && self.filter.is_match(table);
        self.decided.insert(table.to_string(), w);
        w
    }
}

/// Capture of one SQL entry: the pre-update hook is registered on the writer from
/// [`Capture::begin`] until this is dropped.
pub struct Capture<'c> {
    conn: &'c Connection,
    state: Box<RefCell<State>>,
    log_index: u64,
    at_ms: i64,
    history: u64,
}

thread_local! {
    /// The last compiled union of patterns (the patterns rarely change; SQL entries are many).
    static FILTER: RefCell<Option<(String, regex::Regex)>> = const { RefCell::new(None) };
}

fn filter_of(patterns: &BTreeMap<String, String>) -> Option<regex::Regex> {
    let union = patterns
        .values()
        .map(|p| format!("(?:{p})"))
        .collect::<Vec<_>>()
        .join("|");
    FILTER.with(|f| {
        let mut f = f.borrow_mut();
        if let Some((u, re)) = f.as_ref()
            && *u == union
        {
            return Some(re.clone());
        }
        // Each pattern was checked when it was registered; the union of valid ones is valid.
        let re = regex::Regex::new(&union).ok()?;
        *f = Some((union, re.clone()));
        Some(re)
    })
}

impl<'c> Capture<'c> {
    /// Starts capturing the SQL entry at `log_index` (stamped `at_ms`) if a destination
    /// registered a pattern; `history` is read only then. The caller checks the active
    /// version (capture is a version 2 apply semantic).
    pub fn begin(
        conn: &'c Connection,
        log_index: u64,
        at_ms: i64,
        history: impl FnOnce() -> rusqlite::Result<u64>,
    ) -> rusqlite::Result<Option<Self>> {
        let patterns = captures(conn)?;
        if patterns.is_empty() {
            return Ok(None);
        }
        let Some(filter) = filter_of(&patterns) else {
            return Ok(None);
        };
        let mut streams = sandbox::stream_tables(conn);
        streams.insert(tables::DEAD_LETTER.to_string());
        let state = Box::new(RefCell::new(State {
            filter,
            streams,
            decided: HashMap::new(),
            pending: Vec::new(),
            bytes: 0,
            over: false,
        }));
        let capture = Capture {
            conn,
            state,
            log_index,
            at_ms,
            history: history()?,
        };
        let arg = &*capture.state as *const RefCell<State> as *mut c_void;
        // SAFETY: the handle is the live writer, used on this thread only; `arg` points into
        // the boxed state, which stays at its address until `drop` unregisters the hook.
        unsafe {
            ffi::sqlite3_preupdate_hook(conn.handle(), Some(on_change), arg);
        }
        Ok(Some(capture))
    }

    /// Forgets what was copied since the last flush (the statement failed or is re-run).
    pub fn discard(&self) {
        self.state.borrow_mut().pending.clear();
    }

    /// Writes what the last statement changed into the journal, inside the statement's
    /// savepoint. `Ok(Some(message))` fails the statement (the same on every replica: capture
    /// went past the write budget, or the journal rows did not fit the entry's page cap);
    /// `Err` is an environment error.
    pub fn flush(&self) -> rusqlite::Result<Option<String>> {
        let (pending, over) = {
            let mut s = self.state.borrow_mut();
            (std::mem::take(&mut s.pending), s.over)
        };
        if over {
            return Ok(Some(sandbox::spend_write_budget()));
        }
        if pending.is_empty() {
            return Ok(None);
        }
        match sandbox::system(|| self.write(&pending)) {
            Ok(()) => Ok(None),
            Err(e) if sandbox::is_environment_error(&e) => Err(e),
            Err(e) => Ok(Some(sandbox::describe(&e))),
        }
    }

    fn write(&self, pending: &[Captured]) -> rusqlite::Result<()> {
        let conn = self.conn;
        create_tables_cached(conn)?;
        let next: i64 = conn
            .prepare_cached(&format!(
                "SELECT coalesce(max(ordinal) + 1, 0) FROM {} WHERE log_index = ?1",
                tables::CHANGE_JOURNAL
            ))?
            .query_row([self.log_index as i64], |r| r.get(0))?;
        let mut columns: HashMap<&str, Vec<String>> = HashMap::new();
        let mut ins = conn.prepare_cached(&format!(
            "INSERT INTO {} (log_index, ordinal, history, at_ms, tbl, op, old_row_id, \
             new_row_id, before, after) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            tables::CHANGE_JOURNAL
        ))?;
        for (i, c) in pending.iter().enumerate() {
            if !columns.contains_key(c.table.as_str()) {
                let names: Vec<String> = conn
                    .prepare_cached("SELECT name FROM pragma_table_xinfo(?1) ORDER BY cid")?
                    .query_map([&c.table], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                columns.insert(&c.table, names);
            }
            let names = &columns[c.table.as_str()];
            let json = |values: &Option<Vec<Value>>| {
                values.as_ref().map(|vs| {
                    let m: Map<String, Json> = vs
                        .iter()
                        .enumerate()
                        .map(|(i, v)| {
                            let name = names.get(i).cloned().unwrap_or(format!("column{i}"));
                            (name, value_json(v))
                        })
                        .collect();
                    Json::Object(m).to_string()
                })
            };
            ins.execute(rusqlite::params![
                self.log_index as i64,
                next + i as i64,
                self.history as i64,
                self.at_ms,
                c.table,
                c.op.as_str(),
                c.old_row_id,
                c.new_row_id,
                json(&c.before),
                json(&c.after),
            ])?;
        }
        Ok(())
    }
}

/// `create_tables` as cached statements: it runs for every statement that changed a row.
fn create_tables_cached(conn: &Connection) -> rusqlite::Result<()> {
    let present: bool = conn
        .prepare_cached(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
        )?
        .query_row([tables::CHANGE_JOURNAL], |r| r.get(0))?;
    if present { Ok(()) } else { create_tables(conn) }
}

impl Drop for Capture<'_> {
    fn drop(&mut self) {
        // SAFETY: the writer's handle, on this thread; no hook is registered afterwards.
        unsafe {
            ffi::sqlite3_preupdate_hook(self.conn.handle(), None, std::ptr::null_mut());
        }
    }
}

/// The pre-update hook: copies a change of a captured table (runs inside `sqlite3_step`, so
/// it only reads the row and never touches the connection otherwise).
unsafe extern "C" fn on_change(
    arg: *mut c_void,
    db: *mut ffi::sqlite3,
    op: c_int,
    db_name: *const c_char,
    table: *const c_char,
    key1: i64,
    key2: i64,
) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `arg` is the state `Capture::begin` registered; it outlives the hook.
        let state = unsafe { &*(arg as *const RefCell<State>) };
        // Busy while a flush writes the journal: those are Cairn's rows, never captured.
        let Ok(mut s) = state.try_borrow_mut() else {
            return;
        };
        // SAFETY: SQLite passes NUL-terminated names valid for the call.
        let (schema, table) = unsafe { (CStr::from_ptr(db_name), CStr::from_ptr(table)) };
        if schema.to_bytes() != b"main" || s.over {
            return;
        }
        let table = table.to_string_lossy();
        if !s.wants(&table) {
            return;
        }
        let op = match op {
            ffi::SQLITE_INSERT => Op::Insert,
            ffi::SQLITE_UPDATE => Op::Update,
            ffi::SQLITE_DELETE => Op::Delete,
            _ => return,
        };
        // SAFETY: called inside the pre-update callback, as SQLite requires.
        let n = unsafe { ffi::sqlite3_preupdate_count(db) };
        let read = |old: bool| -> Vec<Value> {
            (0..n)
                .map(|i| {
                    let mut v: *mut ffi::sqlite3_value = std::ptr::null_mut();
                    // SAFETY: inside the callback; `i` is below the column count.
                    let rc = unsafe {
                        if old {
                            ffi::sqlite3_preupdate_old(db, i, &mut v)
                        } else {
                            ffi::sqlite3_preupdate_new(db, i, &mut v)
                        }
                    };
                    if rc != ffi::SQLITE_OK || v.is_null() {
                        // A virtual generated column has no stored value.
                        Value::Null
                    } else {
                        // SAFETY: SQLite returned a valid value for this callback.
                        unsafe { owned(v) }
                    }
                })
                .collect()
        };
        let before = (op != Op::Insert).then(|| read(true));
        let after = (op != Op::Delete).then(|| read(false));
        let size = |vs: &Option<Vec<Value>>| -> u64 {
            vs.iter()
                .flatten()
                .map(|v| match v {
                    Value::Text(t) => t.len() as u64 + 8,
                    Value::Blob(b) => b.len() as u64 + 8,
                    _ => 8,
                })
                .sum()
        };
        s.bytes += size(&before) + size(&after) + table.len() as u64 + 32;
        if s.bytes > sandbox::WRITE_BUDGET_BYTES {
            s.over = true;
            s.pending.clear();
            return;
        }
        let (old_row_id, new_row_id) = match op {
            Op::Insert => (0, key2),
            Op::Update => (key1, key2),
            Op::Delete => (key1, 0),
        };
        s.pending.push(Captured {
            table: table.into_owned(),
            op,
            old_row_id,
            new_row_id,
            before,
            after,
        });
    }));
}

/// An owned copy of a SQLite value.
///
/// # Safety
/// `v` must be a valid value for the duration of the call.
unsafe fn owned(v: *mut ffi::sqlite3_value) -> Value {
    unsafe {
        match ffi::sqlite3_value_type(v) {
            ffi::SQLITE_INTEGER => Value::Integer(ffi::sqlite3_value_int64(v)),
            ffi::SQLITE_FLOAT => Value::Real(ffi::sqlite3_value_double(v)),
            ffi::SQLITE_TEXT => {
                // The text first, then its length (SQLite's documented order).
                let p = ffi::sqlite3_value_text(v);
                let n = ffi::sqlite3_value_bytes(v).max(0) as usize;
                if p.is_null() {
                    Value::Text(String::new())
                } else {
                    let bytes = std::slice::from_raw_parts(p, n);
                    Value::Text(String::from_utf8_lossy(bytes).into_owned())
                }
            }
            ffi::SQLITE_BLOB => {
                let p = ffi::sqlite3_value_blob(v) as *const u8;
                let n = ffi::sqlite3_value_bytes(v).max(0) as usize;
                if p.is_null() {
                    Value::Blob(Vec::new())
                } else {
                    Value::Blob(std::slice::from_raw_parts(p, n).to_vec())
                }
            }
            _ => Value::Null,
        }
    }
}

#[cfg(test)]
mod tests;

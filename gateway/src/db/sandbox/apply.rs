//! Applying a request's user statements on the writer, the same way on every replica.

use std::collections::BTreeMap;
use std::ffi::c_int;

use rusqlite::{Connection, ffi};

use super::{LOCAL, Mode, budget_message, restart, stream_tables, system, user};
use crate::db::changes::Capture;
use crate::db::sql::{Statement, StatementResult, run_checked};

/// Applies user statements inside the entry's open transaction, deterministically.
///
/// With `transaction`, all statements share one savepoint: the first error rolls all of them
/// back and the remaining statements are not run (their results are absent, as in rqlite).
/// Without it, each statement has its own savepoint, so a failing statement leaves the
/// others' effects in place, like autocommit. Besides:
///
/// - a statement runs under [`Mode::Write`] rules and the entry's write budget (with
///   `page_cap`, also its bytes: [`super::WRITE_BUDGET_BYTES`]); once the budget is spent, the
///   remaining statements fail without running;
/// - after a statement, unresolved deferred foreign keys and a rowid of `i64::MAX` are
///   failures (both would otherwise differ or fail later, at commit);
/// - if SQLite rolled back the whole transaction by itself (an interrupted write), the entry's
///   transaction is begun again and the statements re-run from the start with that statement
///   (and, for the budget, every later one) failed: at most a few restarts, the same on every
///   replica;
/// - with `capture`, a successful statement's row changes are journaled inside its savepoint
///   (a failure rolls them back with the statement's changes).
pub fn apply_statements(
    conn: &Connection,
    statements: &[Statement],
    transaction: bool,
    page_cap: bool,
    capture: Option<&Capture<'_>>,
) -> rusqlite::Result<Vec<StatementResult>> {
    let n = statements.len();
    let _cap = if page_cap {
        Some(PageCap::set(conn)?)
    } else {
        None
    };
    let seed = LOCAL.with(|l| l.entry.get().map(|e| e.0).unwrap_or(0));
    let streams = stream_tables(conn);
    LOCAL.with(|l| *l.streams.borrow_mut() = streams);
    let mut forced: BTreeMap<usize, String> = BTreeMap::new();
    let mut restarts = 0;
    loop {
        match apply_once(conn, statements, transaction, &forced, capture)? {
            Ok(results) => return Ok(results),
            Err((i, msg)) => {
                // SQLite ended the transaction: start the entry again.
                conn.execute_batch("BEGIN")?;
                let budget = LOCAL.with(|l| l.budget_hit.get());
                LOCAL.with(|l| restart(l, seed));
                restarts += 1;
                if budget || restarts >= 4 {
                    let m = if budget { budget_message() } else { msg };
                    for j in i..n {
                        forced.entry(j).or_insert_with(|| m.clone());
                    }
                } else {
                    forced.insert(i, msg);
                }
            }
        }
    }
}

type Lost = (usize, String);

/// SQLite's own largest `max_page_count` (`SQLITE_MAX_PAGE_COUNT`), restored after an entry.
const NO_PAGE_CAP: u64 = 0xffff_fffe;

/// The entry's page cap ([`super::WRITE_BUDGET_BYTES`]) while its statements run; lifted on
/// drop, so Cairn's own writes (device batches, registry, loads) never meet it.
struct PageCap<'c> {
    conn: &'c Connection,
}

impl<'c> PageCap<'c> {
    fn set(conn: &'c Connection) -> rusqlite::Result<Self> {
        system(|| {
            let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            let size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            let budget = super::WRITE_BUDGET_BYTES / size.max(512) as u64;
            let cap = (pages.max(0) as u64)
                .saturating_add(budget)
                .min(NO_PAGE_CAP);
            conn.query_row(&format!("PRAGMA max_page_count = {cap}"), [], |_| Ok(()))
        })?;
        let dir = conn
            .path()
            .and_then(|p| std::path::Path::new(p).parent())
            .map(std::path::Path::to_path_buf);
        LOCAL.with(|l| *l.page_cap.borrow_mut() = dir);
        Ok(PageCap { conn })
    }
}

impl Drop for PageCap<'_> {
    fn drop(&mut self) {
        LOCAL.with(|l| l.page_cap.borrow_mut().take());
        let lift = format!("PRAGMA max_page_count = {NO_PAGE_CAP}");
        if let Err(e) = system(|| self.conn.query_row(&lift, [], |_| Ok(()))) {
            tracing::error!("lifting the entry's page cap: {e}");
        }
    }
}

fn apply_once(
    conn: &Connection,
    statements: &[Statement],
    transaction: bool,
    forced: &BTreeMap<usize, String>,
    capture: Option<&Capture<'_>>,
) -> rusqlite::Result<Result<Vec<StatementResult>, Lost>> {
    let n = statements.len();
    if let Some(c) = capture {
        c.discard();
    }
    let mut results = Vec::with_capacity(n);
    let sp = if transaction {
        "cairn_request"
    } else {
        "cairn_statement"
    };
    if transaction {
        system(|| conn.execute_batch("SAVEPOINT cairn_request"))?;
    }
    for (i, st) in statements.iter().enumerate() {
        if !transaction {
            system(|| conn.execute_batch("SAVEPOINT cairn_statement"))?;
        }
        let mut r = if let Some(msg) = forced.get(&i) {
            StatementResult::error(msg.clone())
        } else if LOCAL.with(|l| l.budget_hit.get()) {
            StatementResult::error(budget_message())
        } else {
            let r = user(Mode::Write, || run_checked(conn, st))?;
            if conn.is_autocommit() {
                let msg = r
                    .error
                    .unwrap_or_else(|| "the transaction was rolled back".into());
                return Ok(Err((i, msg)));
            }
            r
        };
        if r.error.is_none()
            && let Some(msg) = after_statement(conn, !transaction)?
        {
            r = StatementResult::error(msg);
        }
        if let Some(c) = capture {
            if r.error.is_some() {
                c.discard();
            } else if let Some(msg) = c.flush()? {
                r = StatementResult::error(msg);
            }
        }
        let failed = r.error.is_some();
        results.push(r);
        if failed {
            system(|| conn.execute_batch(&format!("ROLLBACK TO {sp}")))?;
        }
        if !transaction {
            system(|| conn.execute_batch("RELEASE cairn_statement"))?;
        } else if failed {
            break;
        }
    }
    if transaction {
        let failed = results.last().is_some_and(|r| r.error.is_some());
        if !failed && deferred_fks_pending(conn) {
            if let Some(last) = results.last_mut() {
                *last = StatementResult::error("FOREIGN KEY constraint failed");
            }
            system(|| conn.execute_batch("ROLLBACK TO cairn_request"))?;
        }
        system(|| conn.execute_batch("RELEASE cairn_request"))?;
    }
    Ok(Ok(results))
}

/// Checks after a successful statement: the rowid rule, and (per statement) deferred foreign
/// keys, which would otherwise fail the entry's COMMIT.
fn after_statement(conn: &Connection, check_fks: bool) -> rusqlite::Result<Option<String>> {
    let tables: Vec<String> = LOCAL
        .with(|l| l.inserted.borrow_mut().split_off(""))
        .into_iter()
        .collect();
    for t in tables {
        let max: Option<i64> = system(|| {
            conn.prepare_cached(&format!(
                "SELECT max(rowid) FROM main.\"{}\"",
                t.replace('"', "\"\"")
            ))
            .and_then(|mut st| st.query_row([], |r| r.get(0)))
        })
        .unwrap_or(None);
        if max == Some(i64::MAX) {
            return Ok(Some(format!(
                "rowid 9223372036854775807 in {t} is not allowed: SQLite would then choose \
                 random rowids, which differ between replicas"
            )));
        }
    }
    if check_fks && deferred_fks_pending(conn) {
        return Ok(Some("FOREIGN KEY constraint failed".into()));
    }
    Ok(None)
}

/// True when deferred foreign-key violations are unresolved on `conn`.
fn deferred_fks_pending(conn: &Connection) -> bool {
    let (mut cur, mut hi) = (0 as c_int, 0 as c_int);
    // SAFETY: the handle is valid for the connection's life; the call only reads a counter.
    let rc = unsafe {
        ffi::sqlite3_db_status(
            conn.handle(),
            ffi::SQLITE_DBSTATUS_DEFERRED_FKS,
            &mut cur,
            &mut hi,
            0,
        )
    };
    rc == ffi::SQLITE_OK && cur > 0
}

//! The SQL sandbox: what user SQL may do on a gateway, and how it is made to do the same
//! thing on every replica.
//!
//! Every replica re-executes the SQL in the Raft log, so a statement is trusted input on every
//! gateway. This module holds every rule about it; the places that run user SQL call into it:
//!
//! - [`harden`] sets up a connection once: SQLite's defensive mode, untrusted schema, no
//!   attached databases, length and depth limits, the authorizer, the progress handler and
//!   the deterministic `random()`/`randomblob()`. The replicated database's writer is opened
//!   on the [`APPLY_VFS`] (see below); readers are opened `SQLITE_OPEN_READ_ONLY`.
//! - The authorizer and the progress handler read the *mode* of the calling thread
//!   ([`Mode`]): Cairn's own statements run as [`Mode::System`]; user statements run inside a
//!   guard ([`user`], [`enter_read`], [`enter_load`]) that switches to the user rules and back.
//!   The guards are thread-local because SQLite calls both hooks on the thread that prepares
//!   or steps the statement, and every user statement is prepared and run synchronously.
//! - [`apply_statements`] applies a `Command::Sql` on every replica: per-statement savepoints,
//!   the write budget, the deferred foreign-key check and the rowid rule, and the one-shot
//!   restart when SQLite rolls back the whole transaction by itself; with export of changes,
//!   each successful statement's captured row changes are journaled inside its savepoint
//!   (`db::changes`; the journal is a `_cairn_*` table, out of user SQL's reach).
//!
//! # What user SQL may not do (all modes)
//!
//! - `ATTACH`, `DETACH` (also `SQLITE_LIMIT_ATTACHED = 0`), `VACUUM` (also refused by the
//!   attach limit), `load_extension()`.
//! - Read or write the *contents* of Cairn's own tables (`_cairn_*`): device keys, high-water
//!   marks, stream definitions, Raft metadata. Their names and columns stay visible in
//!   `sqlite_master` and `PRAGMA table_info`, so schema tools (SQLAlchemy reflection, the
//!   shell's `.tables`/`.schema`) keep working.
//! - Write `sqlite_*` tables; create objects named `_cairn_*`; any DDL on a `_cairn_*` table.
//! - DDL on a device stream table (the configured `[[stream]]` tables and `telemetry`):
//!   triggers, `ALTER`, `DROP`, unique or expression indexes are refused, because device
//!   batches apply through these tables on every replica and must never fail or lose a record
//!   because of user code. A plain index (`CREATE INDEX i ON t(col, ...)`) is allowed.
//! - Any `PRAGMA` outside [`INSPECT_PRAGMAS`] (plus, in reads only, [`NODE_PRAGMAS`]); the
//!   only pragmas a write may set are `user_version` and `application_id` (stored in the file
//!   header, replicated like data).
//! - Transaction control (`BEGIN`, `COMMIT`, `SAVEPOINT`, ...): a log entry is one
//!   transaction; `?transaction` groups statements.
//! - Temporary tables, views, triggers and indexes: they live in one connection of one node.
//!
//! # Determinism at apply time (every replica, whatever the leader's rewrite missed)
//!
//! - "now": the writer's VFS answers SQLite's clock with the entry's stamp (the leader's clock
//!   when it proposed the entry), so `CURRENT_TIMESTAMP` column defaults, triggers and bound
//!   `'now'` parameters store the same value everywhere. An entry without a stamp (older
//!   entries, registry commands) has no "now": the date functions return NULL there.
//! - `'localtime'` and `'utc'` modifiers fail with "local time unavailable" while applying
//!   (replicas may run in different time zones); reads use the node's zone.
//! - `random()` and `randomblob()` on the writer draw from a generator seeded by the entry's
//!   log index; reads get real randomness.
//! - `changes()`, `total_changes()`, `last_insert_rowid()` and `sqlite_offset()` are refused in
//!   writes: they depend on the connection's history or the file's layout.
//! - A write that leaves rowid 9223372036854775807 in a table is refused: SQLite then picks
//!   random rowids for later inserts, which would differ between replicas.
//! - Work is bounded by [`WRITE_BUDGET_STEPS`] SQLite VM steps per entry, a constant of the
//!   code (never a per-node setting), so a statement over it fails identically everywhere.
//! - Deterministic statement errors are results; only environment errors (disk full, I/O,
//!   out of memory, corruption, busy) are storage errors ([`is_environment_error`]).

//!
//! # Files
//!
//! - [`connection`]: hardening a connection, the apply VFS (its clock), the deterministic
//!   functions and the progress handler (write budget, read limits).
//! - [`authorizer`]: the authorizer, the pragma allowlists and the lexical pre-check.
//! - [`apply`]: applying a request's statements on every replica.

mod apply;
mod authorizer;
mod connection;
#[cfg(test)]
mod tests;

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rusqlite::ErrorCode;

use super::failure::{Failure, classify};

pub use self::apply::apply_statements;
pub use self::authorizer::{
    INSPECT_PRAGMAS, NODE_PRAGMAS, PRAGMAS_WITH_ARGUMENT, SETTABLE_PRAGMAS, is_cairn, precheck,
    stream_tables,
};
pub use self::connection::{APPLY_VFS, harden, open_reader, open_writer};

/// SQLite VM steps one log entry's user SQL may take: a constant of the cluster, so a
/// statement that exceeds it fails the same way on every replica. About 0.3 s of work on an
/// x86 core and a few seconds on a small board (every replica stalls its apply that long);
/// a `/db/load` of a million plain rows fits. Changing it changes apply semantics: it is
/// part of the entry format.
pub const WRITE_BUDGET_STEPS: u64 = 50_000_000;

/// New database pages one log entry's user SQL may add, in bytes: a constant of the cluster
/// like [`WRITE_BUDGET_STEPS`]. The step budget alone does not bound bytes: a cheap loop
/// inserting a 64 MiB string built by `printf` or `||` writes terabytes within 50 M steps. Set
/// as the writer's `max_page_count` (database pages before the entry plus this) while the
/// entry's statements run: every replica holds the same pages, so the same statement reaches
/// the cap everywhere.
#[cfg(not(test))]
pub const WRITE_BUDGET_BYTES: u64 = 256 << 20;
/// Smaller under unit tests, so that exceeding it stays quick.
#[cfg(test)]
pub const WRITE_BUDGET_BYTES: u64 = 4 << 20;

/// How often (in VM steps) the progress handler runs.
const PROGRESS_INTERVAL: u64 = 1000;

/// Largest string, blob or row (`SQLITE_LIMIT_LENGTH`).
pub const MAX_LENGTH: i32 = 64 << 20;
/// Longest SQL statement text (`SQLITE_LIMIT_SQL_LENGTH`).
pub const MAX_SQL_LENGTH: i32 = 16 << 20;
/// Deepest expression tree (`SQLITE_LIMIT_EXPR_DEPTH`).
pub const MAX_EXPR_DEPTH: i32 = 500;
/// Deepest trigger recursion (`SQLITE_LIMIT_TRIGGER_DEPTH`).
pub const MAX_TRIGGER_DEPTH: i32 = 100;
/// Rows a write entry's statements may return (RETURNING, strong reads): a constant, since
/// every replica builds the result.
pub const WRITE_RESULT_MAX_ROWS: u64 = 1_000_000;
/// Bytes a write entry's statements may return.
pub const WRITE_RESULT_MAX_BYTES: u64 = 64 << 20;

/// Who is running SQL on this thread right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Cairn's own statements: everything allowed (user triggers and views still get
    /// [`Mode::Write`] rules).
    System,
    /// A user write being applied (execute, request, strong reads, `/db/load` rows).
    Write,
    /// A user read on a reader connection.
    Read,
    /// The scratch database a SQL-text `/db/load` runs in on the leader.
    Load,
}

/// Which connection [`harden`] sets up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The replicated database's one writer (opened on [`APPLY_VFS`]).
    Writer,
    /// A pooled reader of the replicated database (opened read-only).
    Reader,
    /// A private scratch database (`/db/load`).
    Scratch,
}

/// Limits of one read request: per node, since reads are local.
#[derive(Debug, Clone)]
pub struct ReadLimits {
    pub timeout: Duration,
    pub max_rows: u64,
    pub max_bytes: u64,
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits {
            timeout: Duration::from_secs(30),
            max_rows: 1_000_000,
            max_bytes: 256 << 20,
        }
    }
}

#[derive(Default)]
struct Local {
    mode: Cell<Option<Mode>>,
    /// Set while an entry is being applied: (rng seed, "now" in Unix ms).
    entry: Cell<Option<(u64, Option<i64>)>>,
    rng: Cell<u64>,
    steps: Cell<u64>,
    budget_hit: Cell<bool>,
    /// The writer's directory while an entry's page cap is set ([`apply_statements`]).
    page_cap: RefCell<Option<std::path::PathBuf>>,
    deadline: Cell<Option<Instant>>,
    cancel: RefCell<Option<Arc<AtomicBool>>>,
    /// Why the read was interrupted, if it was.
    read_stop: RefCell<Option<String>>,
    rows: Cell<u64>,
    bytes: Cell<u64>,
    max_rows: Cell<u64>,
    max_bytes: Cell<u64>,
    streams: RefCell<BTreeSet<String>>,
    inserted: RefCell<BTreeSet<String>>,
    plain_index: Cell<bool>,
    denied: RefCell<Option<String>>,
}

thread_local! {
    static LOCAL: Local = Local::default();
}

fn mode() -> Mode {
    LOCAL.with(|l| l.mode.get().unwrap_or(Mode::System))
}

/// Restores the previous mode when dropped.
pub struct ModeGuard {
    prev: Option<Mode>,
}

impl Drop for ModeGuard {
    fn drop(&mut self) {
        let prev = self.prev;
        LOCAL.with(|l| l.mode.set(prev));
    }
}

fn set_mode(m: Mode) -> ModeGuard {
    LOCAL.with(|l| ModeGuard {
        prev: l.mode.replace(Some(m)),
    })
}

/// Runs `f` as Cairn (no user rules), for Cairn's statements inside a user section.
pub fn system<T>(f: impl FnOnce() -> T) -> T {
    let _g = set_mode(Mode::System);
    f()
}

/// Runs `f` under the user rules of `mode`; the denial reason of a refused statement is kept
/// for [`describe`].
pub fn user<T>(mode: Mode, f: impl FnOnce() -> T) -> T {
    LOCAL.with(|l| {
        l.denied.borrow_mut().take();
        l.inserted.borrow_mut().clear();
    });
    let _g = set_mode(mode);
    f()
}

/// Runs `f` with `streams` as the device stream tables the authorizer protects (set by
/// [`apply_statements`] for an entry's statements; other callers of [`user`] with
/// [`Mode::Write`] set it here).
pub fn with_streams<T>(streams: BTreeSet<String>, f: impl FnOnce() -> T) -> T {
    let prev = LOCAL.with(|l| l.streams.replace(streams));
    let out = f();
    LOCAL.with(|l| *l.streams.borrow_mut() = prev);
    out
}

/// The state of one entry being applied on this thread; restores the previous on drop.
pub struct EntryGuard {
    prev: Option<(u64, Option<i64>)>,
}

impl Drop for EntryGuard {
    fn drop(&mut self) {
        let prev = self.prev;
        LOCAL.with(|l| l.entry.set(prev));
    }
}

/// Marks the start of applying the entry at log index `index` with the leader's stamp
/// `now_ms` (Unix ms), if the entry carries one: seeds `random()`, sets "now", resets the
/// write budget.
pub fn enter_entry(index: u64, now_ms: Option<i64>) -> EntryGuard {
    LOCAL.with(|l| {
        let prev = l.entry.replace(Some((index, now_ms)));
        restart(l, index);
        EntryGuard { prev }
    })
}

fn restart(l: &Local, seed: u64) {
    l.rng.set(seed ^ 0x6a09_e667_f3bc_c908);
    l.steps.set(0);
    l.budget_hit.set(false);
    l.rows.set(0);
    l.bytes.set(0);
    l.max_rows.set(WRITE_RESULT_MAX_ROWS);
    l.max_bytes.set(WRITE_RESULT_MAX_BYTES);
}

fn in_apply() -> bool {
    LOCAL.try_with(|l| l.entry.get().is_some()).unwrap_or(false)
}

/// Restores the read state when dropped.
pub struct ReadGuard {
    _mode: ModeGuard,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        LOCAL.with(|l| {
            l.deadline.set(None);
            l.cancel.borrow_mut().take();
        });
    }
}

fn enter_limited(mode: Mode, limits: &ReadLimits, cancel: Option<Arc<AtomicBool>>) -> ReadGuard {
    LOCAL.with(|l| {
        l.deadline.set(Some(Instant::now() + limits.timeout));
        *l.cancel.borrow_mut() = cancel;
        l.read_stop.borrow_mut().take();
        l.rows.set(0);
        l.bytes.set(0);
        l.max_rows.set(limits.max_rows);
        l.max_bytes.set(limits.max_bytes);
    });
    ReadGuard {
        _mode: set_mode(mode),
    }
}

/// Starts a user read on this thread: [`Mode::Read`] rules, the time limit, the row and byte
/// caps, and cancellation when `cancel` becomes true (the client went away).
pub fn enter_read(limits: &ReadLimits, cancel: Option<Arc<AtomicBool>>) -> ReadGuard {
    enter_limited(Mode::Read, limits, cancel)
}

/// Starts running a SQL-text `/db/load` in a scratch database.
pub fn enter_load(limits: &ReadLimits) -> ReadGuard {
    enter_limited(Mode::Load, limits, None)
}

/// Sets a flag when dropped: held by the request's future, so that a read whose client went
/// away stops at the next progress callback.
#[derive(Default)]
pub struct CancelOnDrop(Arc<AtomicBool>);

impl CancelOnDrop {
    /// The flag the read watches.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Counts one result row of `bytes` against the request's caps (reads: per node settings;
/// writes: the cluster constants).
pub fn charge_row(bytes: usize) -> Result<(), String> {
    LOCAL.with(|l| {
        let rows = l.rows.get() + 1;
        let total = l.bytes.get().saturating_add(bytes as u64);
        l.rows.set(rows);
        l.bytes.set(total);
        if rows > l.max_rows.get() {
            Err(format!(
                "result exceeds {} rows (read_max_rows); add LIMIT or narrow the query",
                l.max_rows.get()
            ))
        } else if total > l.max_bytes.get() {
            Err(format!(
                "result exceeds {} bytes (read_max_bytes); add LIMIT or narrow the query",
                l.max_bytes.get()
            ))
        } else {
            Ok(())
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------------------------

/// True for errors of this replica's environment (disk full, I/O, out of memory, corruption,
/// busy, interrupted by something other than the budget): never a statement result, since the
/// other replicas did not see them.
pub fn is_environment_error(e: &rusqlite::Error) -> bool {
    let rusqlite::Error::SqliteFailure(f, _) = e else {
        return false;
    };
    match f.code {
        ErrorCode::OperationInterrupted => !LOCAL.with(|l| l.budget_hit.get()),
        ErrorCode::DiskFull => !page_cap_reached(),
        _ => classify(e) != Failure::Other,
    }
}

/// True (and the budget spent) when `SQLITE_FULL` came from the entry's page cap rather than
/// the disk: a cap is set and the disk has room for twice the budget. A full disk near the
/// cap is taken for the disk (held and retried, so no replica records a result the others
/// might not), and decided again once space returns.
fn page_cap_reached() -> bool {
    LOCAL.with(|l| {
        let Some(dir) = l.page_cap.borrow().clone() else {
            return false;
        };
        let room = crate::db::free_bytes(&dir).is_some_and(|b| b >= 2 * WRITE_BUDGET_BYTES);
        if room {
            l.budget_hit.set(true);
        }
        room
    })
}

/// The message of a failed user statement: the sandbox's reason when it refused it.
pub fn describe(e: &rusqlite::Error) -> String {
    let denied = LOCAL.with(|l| l.denied.borrow_mut().take());
    if let Some(reason) = denied
        && (e.to_string().contains("not authorized") || e.to_string().contains("prohibited"))
    {
        return format!("not authorized: {reason}");
    }
    if let rusqlite::Error::SqliteFailure(f, _) = e
        && f.code == ErrorCode::DiskFull
        && LOCAL.with(|l| l.budget_hit.get())
    {
        return budget_message();
    }
    if let rusqlite::Error::SqliteFailure(f, _) = e
        && f.code == ErrorCode::OperationInterrupted
    {
        if LOCAL.with(|l| l.budget_hit.get()) {
            return budget_message();
        }
        if let Some(why) = LOCAL.with(|l| l.read_stop.borrow().clone()) {
            return why;
        }
    }
    let msg = e.to_string();
    if msg.contains("local time unavailable") && in_apply() {
        return "the 'localtime' and 'utc' modifiers are not allowed in writes: replicas may \
                run in different time zones (store UTC and convert when reading)"
            .into();
    }
    msg
}

/// Spends the entry's write budget (change capture copied more than it allows,
/// `db::changes`): the statement fails with the budget's message, and so does every later
/// statement of the entry, as when the steps run out.
pub fn spend_write_budget() -> String {
    LOCAL.with(|l| l.budget_hit.set(true));
    budget_message()
}

fn budget_message() -> String {
    format!(
        "statement exceeded the write budget of {WRITE_BUDGET_STEPS} SQLite steps and {} MiB of \
         new database pages per request (the rest of the request is not run)",
        WRITE_BUDGET_BYTES >> 20
    )
}

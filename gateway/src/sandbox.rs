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
//!   restart when SQLite rolls back the whole transaction by itself.
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

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CStr, c_int, c_void};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rusqlite::config::DbConfig;
use rusqlite::functions::FunctionFlags;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::limits::Limit;
use rusqlite::{Connection, ErrorCode, ffi};

/// SQLite VM steps one log entry's user SQL may take: a constant of the cluster, so a
/// statement that exceeds it fails the same way on every replica. About 0.3 s of work on an
/// x86 core and a few seconds on a small board (every replica stalls its apply that long);
/// a `/db/load` of a million plain rows fits. Changing it changes apply semantics: it is
/// part of the entry format.
pub const WRITE_BUDGET_STEPS: u64 = 50_000_000;

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

/// The VFS the replicated database's writer is opened on: the default VFS, except that its
/// clock answers with the applying entry's stamp.
pub const APPLY_VFS: &str = "cairn-apply";

/// Pragmas that only describe the schema or the build: the same on every replica, allowed in
/// reads and writes. Those marked in [`PRAGMAS_WITH_ARGUMENT`] take a table or index name;
/// the others may not be given a value (that would set them), except [`SETTABLE_PRAGMAS`].
pub const INSPECT_PRAGMAS: &[&str] = &[
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
    "foreign_key_check",
    "collation_list",
    "function_list",
    "module_list",
    "pragma_list",
    "compile_options",
    "encoding",
    "foreign_keys",
    "user_version",
    "application_id",
];

/// Pragmas whose argument names a table or an index (not a setting).
pub const PRAGMAS_WITH_ARGUMENT: &[&str] = &[
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
    "foreign_key_check",
    "integrity_check",
    "quick_check",
];

/// Pragmas a write may set: they live in the database header and replicate like data.
pub const SETTABLE_PRAGMAS: &[&str] = &["user_version", "application_id"];

/// Pragmas whose answer is this node's (file layout, path, connection): reads only.
pub const NODE_PRAGMAS: &[&str] = &[
    "database_list",
    "page_count",
    "page_size",
    "freelist_count",
    "data_version",
    "schema_version",
    "integrity_check",
    "quick_check",
];

/// Virtual table modules a user may create tables with (deterministic, content-only).
const VTAB_MODULES: &[&str] = &["fts3", "fts4", "fts5", "rtree", "rtree_i32"];

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

/// Sets a flag when dropped: held by the HTTP handler, so that a read whose client went away
/// stops at the next progress callback.
pub struct CancelOnDrop(pub Arc<AtomicBool>);

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
// Connection setup.
// ---------------------------------------------------------------------------------------------

/// Sets up a connection that user SQL may run on (see the module doc).
pub fn harden(conn: &mut Connection, kind: Kind) -> rusqlite::Result<()> {
    install_process_hooks();
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA, false)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_FTS3_TOKENIZER, false)?;
    let _ = kind;
    conn.set_limit(Limit::SQLITE_LIMIT_ATTACHED, 0)?;
    conn.set_limit(Limit::SQLITE_LIMIT_LENGTH, MAX_LENGTH)?;
    conn.set_limit(Limit::SQLITE_LIMIT_SQL_LENGTH, MAX_SQL_LENGTH)?;
    conn.set_limit(Limit::SQLITE_LIMIT_EXPR_DEPTH, MAX_EXPR_DEPTH)?;
    conn.set_limit(Limit::SQLITE_LIMIT_TRIGGER_DEPTH, MAX_TRIGGER_DEPTH)?;
    let flags = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_INNOCUOUS;
    conn.create_scalar_function("random", 0, flags, |_| Ok(next_random()))?;
    conn.create_scalar_function("randomblob", 1, flags, |ctx| {
        let n = blob_len(ctx.get::<i64>(0).unwrap_or(1).max(1))?;
        let mut out = vec![0u8; n];
        for chunk in out.chunks_mut(8) {
            let r = next_random().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
        Ok(out)
    })?;
    conn.create_scalar_function(
        "zeroblob",
        1,
        flags | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| Ok(vec![0u8; blob_len(ctx.get::<i64>(0).unwrap_or(0).max(0))?]),
    )?;
    conn.authorizer(Some(authorize))?;
    conn.progress_handler(PROGRESS_INTERVAL as c_int, Some(progress))?;
    Ok(())
}

/// Opens the replicated database's writer: on the [`APPLY_VFS`], hardened.
pub fn open_writer(path: &std::path::Path) -> rusqlite::Result<Connection> {
    install_process_hooks();
    let mut conn =
        Connection::open_with_flags_and_vfs(path, rusqlite::OpenFlags::default(), APPLY_VFS)?;
    harden(&mut conn, Kind::Writer)?;
    Ok(conn)
}

/// Opens a reader of the replicated database: read-only at the file level, hardened.
pub fn open_reader(path: &std::path::Path) -> rusqlite::Result<Connection> {
    let mut conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
            | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX
            | rusqlite::OpenFlags::SQLITE_OPEN_URI,
    )?;
    harden(&mut conn, Kind::Reader)?;
    Ok(conn)
}

/// Checks a generated blob's length, and charges it (one step a byte) to the write budget:
/// otherwise a cheap loop of `randomblob(64 MiB)` would write gigabytes within the step count.
fn blob_len(n: i64) -> rusqlite::Result<usize> {
    let fail = |code, msg: String| {
        Err(rusqlite::Error::SqliteFailure(
            ffi::Error::new(code),
            Some(msg),
        ))
    };
    if n > i64::from(MAX_LENGTH) {
        return fail(ffi::SQLITE_TOOBIG, "string or blob too big".into());
    }
    let over = LOCAL.with(|l| {
        if l.entry.get().is_none() || l.mode.get() != Some(Mode::Write) {
            return false;
        }
        let s = l.steps.get().saturating_add(n as u64);
        l.steps.set(s);
        if s > WRITE_BUDGET_STEPS {
            l.budget_hit.set(true);
        }
        s > WRITE_BUDGET_STEPS
    });
    if over {
        return fail(ffi::SQLITE_ERROR, budget_message());
    }
    Ok(n as usize)
}

/// SplitMix64: while applying, seeded from the entry; otherwise real randomness.
fn next_random() -> i64 {
    LOCAL.with(|l| {
        if l.entry.get().is_none() {
            return rand::random::<i64>();
        }
        let s = l.rng.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        l.rng.set(s);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) as i64
    })
}

fn progress() -> bool {
    LOCAL.with(|l| match l.mode.get().unwrap_or(Mode::System) {
        Mode::System => false,
        Mode::Write => {
            if l.entry.get().is_none() {
                return false;
            }
            let s = l.steps.get() + PROGRESS_INTERVAL;
            l.steps.set(s);
            if s > WRITE_BUDGET_STEPS {
                l.budget_hit.set(true);
                true
            } else {
                false
            }
        }
        Mode::Read | Mode::Load => {
            let cancelled = l
                .cancel
                .borrow()
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed));
            let late = l.deadline.get().is_some_and(|d| Instant::now() > d);
            if cancelled || late {
                *l.read_stop.borrow_mut() = Some(if cancelled {
                    "query cancelled: the client went away".into()
                } else {
                    "query interrupted: it ran longer than read_timeout".into()
                });
                true
            } else {
                false
            }
        }
    })
}

/// Once per process: the apply VFS and the local-time hook.
fn install_process_hooks() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| unsafe {
        // Make sure SQLite is initialised before we look up its default VFS.
        ffi::sqlite3_initialize();
        let base = ffi::sqlite3_vfs_find(std::ptr::null());
        assert!(!base.is_null(), "SQLite has no default VFS");
        BASE_VFS.store(base, Ordering::Release);
        let mut vfs: ffi::sqlite3_vfs = *base;
        static NAME: &CStr = c"cairn-apply";
        vfs.zName = NAME.as_ptr();
        vfs.pNext = std::ptr::null_mut();
        vfs.xCurrentTime = Some(apply_current_time);
        vfs.xCurrentTimeInt64 = Some(apply_current_time_int64);
        // Leaked on purpose: SQLite keeps the pointer for the life of the process.
        let vfs = Box::leak(Box::new(vfs));
        ffi::sqlite3_vfs_register(vfs, 0);
        type AltLocaltime = unsafe extern "C" fn(*const c_void, *mut c_void) -> c_int;
        ffi::sqlite3_test_control(
            ffi::SQLITE_TESTCTRL_LOCALTIME_FAULT,
            2 as c_int,
            alt_localtime as AltLocaltime,
        );
    });
}

static BASE_VFS: std::sync::atomic::AtomicPtr<ffi::sqlite3_vfs> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

/// Julian day number of the Unix epoch, in ms (SQLite's clock unit).
const UNIX_EPOCH_JD_MS: i64 = 210_866_760_000_000;

unsafe extern "C" fn apply_current_time_int64(_vfs: *mut ffi::sqlite3_vfs, out: *mut i64) -> c_int {
    let entry = LOCAL.try_with(|l| l.entry.get()).ok().flatten();
    match entry {
        Some((_, Some(ms))) => {
            unsafe { *out = ms + UNIX_EPOCH_JD_MS };
            ffi::SQLITE_OK
        }
        // An entry without a stamp has no "now": the date functions return NULL.
        Some((_, None)) => ffi::SQLITE_ERROR,
        None => {
            let base = BASE_VFS.load(Ordering::Acquire);
            unsafe {
                match (*base).xCurrentTimeInt64 {
                    Some(f) => f(base, out),
                    None => ffi::SQLITE_ERROR,
                }
            }
        }
    }
}

unsafe extern "C" fn apply_current_time(vfs: *mut ffi::sqlite3_vfs, out: *mut f64) -> c_int {
    let mut ms = 0i64;
    let rc = unsafe { apply_current_time_int64(vfs, &mut ms) };
    unsafe { *out = ms as f64 / 86_400_000.0 };
    rc
}

/// SQLite's local-time conversion, for the whole process: fails while applying an entry
/// (replicas may be in different zones), the C library's otherwise.
unsafe extern "C" fn alt_localtime(t: *const c_void, tm: *mut c_void) -> c_int {
    if in_apply() {
        return 1;
    }
    let r = unsafe { libc::localtime_r(t as *const libc::time_t, tm as *mut libc::tm) };
    c_int::from(r.is_null())
}

// ---------------------------------------------------------------------------------------------
// The authorizer.
// ---------------------------------------------------------------------------------------------

fn lower(s: &str) -> String {
    s.to_ascii_lowercase()
}

/// A Cairn table: `_cairn_*`.
pub fn is_cairn(name: &str) -> bool {
    lower(name).starts_with("_cairn_")
}

fn is_sqlite(name: &str) -> bool {
    lower(name).starts_with("sqlite_")
}

fn is_stream(name: &str) -> bool {
    LOCAL.with(|l| l.streams.borrow().contains(&lower(name)))
}

fn authorize(ctx: AuthContext<'_>) -> Authorization {
    let mode = match mode() {
        // Cairn runs no triggers or views of its own: these are the user's.
        Mode::System if ctx.accessor.is_some() => Mode::Write,
        m => m,
    };
    match rule(mode, &ctx) {
        Ok(a) => a,
        Err(reason) => {
            LOCAL.with(|l| *l.denied.borrow_mut() = Some(reason));
            Authorization::Deny
        }
    }
}

fn reserved_name(name: &str) -> Result<Authorization, String> {
    // SQLite itself refuses user objects named sqlite_* (and creates sqlite_sequence and
    // sqlite_stat1 on its own).
    if is_cairn(name) {
        Err(format!(
            "names starting with _cairn_ or sqlite_ are reserved ({name})"
        ))
    } else {
        Ok(Authorization::Allow)
    }
}

fn ddl_target(table: &str, what: &str) -> Result<Authorization, String> {
    if is_cairn(table) {
        Err(format!(
            "{table} is Cairn's own table: {what} on it is not allowed"
        ))
    } else if is_sqlite(table) {
        Err(format!(
            "{table} is SQLite's own table: {what} on it is not allowed"
        ))
    } else if is_stream(table) {
        Err(format!(
            "{table} is a device stream table: {what} on it is not allowed (its schema follows \
             the stream definitions, and device batches must apply identically on every replica)"
        ))
    } else {
        Ok(Authorization::Allow)
    }
}

fn pragma_rule(mode: Mode, name: &str, value: Option<&str>) -> Result<Authorization, String> {
    let name = lower(name);
    let n = name.as_str();
    let with_arg = PRAGMAS_WITH_ARGUMENT.contains(&n);
    let ok = match mode {
        Mode::System => true,
        Mode::Write => {
            (INSPECT_PRAGMAS.contains(&n) && (value.is_none() || with_arg))
                || SETTABLE_PRAGMAS.contains(&n)
        }
        Mode::Read | Mode::Load => {
            (INSPECT_PRAGMAS.contains(&n) || NODE_PRAGMAS.contains(&n))
                && (value.is_none() || with_arg)
        }
    };
    match (ok, mode) {
        (true, _) => Ok(Authorization::Allow),
        // A dump's `PRAGMA foreign_keys=OFF` and friends: a no-op in the scratch database.
        (false, Mode::Load) => Ok(Authorization::Ignore),
        (false, Mode::Write) if NODE_PRAGMAS.contains(&n) && value.is_none() => Err(format!(
            "PRAGMA {n} answers this node's own value (it differs between replicas): use it in a read (/db/query)"
        )),
        (false, _) => Err(format!(
            "PRAGMA {n}{} is not allowed: user SQL may run the schema-inspection pragmas \
             (table_info, index_list, foreign_key_list, ...; the README lists them) and set \
             only user_version and application_id",
            if value.is_some() { " with a value" } else { "" },
        )),
    }
}

fn rule(mode: Mode, ctx: &AuthContext<'_>) -> Result<Authorization, String> {
    use AuthAction as A;
    use Authorization::{Allow, Ignore};
    if mode == Mode::System {
        return Ok(Allow);
    }
    let load = mode == Mode::Load;
    let temp = ctx
        .database_name
        .is_some_and(|d| d.eq_ignore_ascii_case("temp"));
    let no_temp = || {
        Err(
            "temporary tables, views, triggers and indexes are not allowed: they would exist \
             in one connection of one node only"
                .to_string(),
        )
    };
    Ok(match ctx.action {
        A::Select | A::Recursive => Allow,
        A::Attach { .. } => return Err("ATTACH is not allowed".into()),
        A::Detach { .. } => return Err("DETACH is not allowed".into()),
        A::Read { table_name, .. } => {
            if is_cairn(table_name) && !load {
                return Err(format!(
                    "the contents of Cairn's table {table_name} are not readable by SQL"
                ));
            }
            let t = lower(table_name);
            if let Some(p) = t.strip_prefix("pragma_") {
                return pragma_rule(mode, p, None);
            }
            if t == "dbstat" && mode == Mode::Write {
                return Err(
                    "dbstat describes this node's file layout (it differs between replicas): \
                     use it in a read"
                        .into(),
                );
            }
            Allow
        }
        A::Function { function_name } => match lower(function_name).as_str() {
            "load_extension" => return Err("load_extension() is not allowed".into()),
            f @ ("changes" | "total_changes" | "last_insert_rowid" | "sqlite_offset")
                if mode == Mode::Write =>
            {
                return Err(format!(
                    "{f}() is not allowed in a write: its value depends on this node's \
                     connection or file layout, so replicas would store different values"
                ));
            }
            _ => Allow,
        },
        A::Pragma {
            pragma_name,
            pragma_value,
        } => return pragma_rule(mode, pragma_name, pragma_value),
        A::Transaction { .. } | A::Savepoint { .. } if load => Allow,
        A::Transaction { .. } | A::Savepoint { .. } => {
            return Err(
                "transaction control is not allowed: each request is one transaction; use \
                 ?transaction to run statements atomically"
                    .into(),
            );
        }
        _ if mode == Mode::Read => {
            return Err("attempt to change database via query operation".into());
        }
        _ if load => Allow,
        A::Insert { table_name } | A::Delete { table_name } | A::Update { table_name, .. } => {
            if temp {
                return no_temp();
            }
            if is_cairn(table_name) {
                return Err(format!("Cairn's table {table_name} is not writable by SQL"));
            }
            // DDL writes the schema table itself (SQLite refuses direct writes to it, and
            // `writable_schema` is refused above).
            let schema_table = matches!(
                lower(table_name).as_str(),
                "sqlite_master" | "sqlite_schema"
            );
            if is_sqlite(table_name) && !schema_table {
                return Err(format!(
                    "SQLite's table {table_name} is not writable by SQL"
                ));
            }
            if let A::Insert { table_name } = ctx.action {
                LOCAL.with(|l| l.inserted.borrow_mut().insert(table_name.to_string()));
            }
            Allow
        }
        A::CreateTable { table_name } => return reserved_name(table_name),
        A::CreateView { view_name } => return reserved_name(view_name),
        A::CreateVtable {
            table_name,
            module_name,
        } => {
            if !VTAB_MODULES.contains(&lower(module_name).as_str()) {
                return Err(format!(
                    "virtual tables using {module_name} are not allowed (allowed: {})",
                    VTAB_MODULES.join(", ")
                ));
            }
            return reserved_name(table_name);
        }
        A::CreateIndex {
            index_name,
            table_name,
        } => {
            reserved_name(index_name)?;
            if is_stream(table_name) && !is_cairn(table_name) {
                if LOCAL.with(|l| l.plain_index.get()) {
                    return Ok(Allow);
                }
                return Err(format!(
                    "{table_name} is a device stream table: only plain indexes \
                     (CREATE INDEX name ON {table_name}(column, ...)) are allowed on it; unique, \
                     partial and expression indexes could make device batches fail or lose records"
                ));
            }
            return ddl_target(table_name, "CREATE INDEX");
        }
        A::CreateTrigger { table_name, .. } => return ddl_target(table_name, "CREATE TRIGGER"),
        A::AlterTable { table_name, .. } => return ddl_target(table_name, "ALTER TABLE"),
        A::DropTable { table_name } => return ddl_target(table_name, "DROP TABLE"),
        A::DropVtable { table_name, .. } => return ddl_target(table_name, "DROP TABLE"),
        A::DropIndex { table_name, .. } => {
            if is_cairn(table_name) {
                return ddl_target(table_name, "DROP INDEX");
            }
            Allow
        }
        A::DropTrigger { table_name, .. } => {
            if is_cairn(table_name) {
                return ddl_target(table_name, "DROP TRIGGER");
            }
            Allow
        }
        A::DropView { view_name } => return reserved_name(view_name),
        A::Reindex { .. } => Allow,
        // ANALYZE skips Cairn's tables (their row counts are Cairn's business).
        A::Analyze { table_name } if is_cairn(table_name) => Ignore,
        A::Analyze { .. } => Allow,
        A::CreateTempIndex { .. }
        | A::CreateTempTable { .. }
        | A::CreateTempTrigger { .. }
        | A::CreateTempView { .. }
        | A::DropTempIndex { .. }
        | A::DropTempTable { .. }
        | A::DropTempTrigger { .. }
        | A::DropTempView { .. } => return no_temp(),
        other => return Err(format!("{other:?} is not allowed")),
    })
}

// ---------------------------------------------------------------------------------------------
// Statement-level checks (lexical, before SQLite sees the statement).
// ---------------------------------------------------------------------------------------------

/// Words of a statement outside string literals, quoted identifiers and comments, uppercased.
fn words(sql: &str) -> Vec<String> {
    crate::sql::significant_words(sql)
}

/// Refuses, before preparing, what the authorizer cannot see: `VACUUM`, and `ROLLBACK`
/// conflict resolution (`INSERT OR ROLLBACK`, `ON CONFLICT ROLLBACK`, `RAISE(ROLLBACK, ..)`),
/// which would end the entry's transaction from inside. Also notes whether a `CREATE INDEX`
/// is a plain one (allowed on stream tables).
pub fn precheck(sql: &str) -> Result<(), String> {
    let w = words(sql);
    let first = w.first().map(String::as_str).unwrap_or("");
    if first == "VACUUM" {
        return Err("VACUUM is not allowed (Cairn compacts its own snapshots)".into());
    }
    if first == "ATTACH" || first == "DETACH" {
        return Err(format!("{first} is not allowed"));
    }
    if w.iter().skip(1).any(|t| t == "ROLLBACK") {
        return Err(
            "ROLLBACK conflict resolution is not allowed (it would end the entry's \
             transaction on every replica): use ABORT, FAIL or IGNORE"
                .into(),
        );
    }
    LOCAL.with(|l| l.plain_index.set(is_plain_index(sql)));
    Ok(())
}

/// `CREATE INDEX [IF NOT EXISTS] name ON table(col [COLLATE c] [ASC|DESC], ...)`: nothing else.
fn is_plain_index(sql: &str) -> bool {
    let toks = crate::sql::significant_tokens(sql);
    let up: Vec<String> = toks.iter().map(|t| t.to_ascii_uppercase()).collect();
    if up.len() < 6 || up[0] != "CREATE" || up[1] != "INDEX" {
        return false;
    }
    let Some(open) = up.iter().position(|t| t == "(") else {
        return false;
    };
    if up.last().map(String::as_str) == Some(";") {
        return false;
    }
    let Some(close) = up.iter().rposition(|t| t == ")") else {
        return false;
    };
    if close != up.len() - 1 {
        return false;
    }
    up[open + 1..close].iter().all(|t| {
        t == ","
            || t == "COLLATE"
            || t == "ASC"
            || t == "DESC"
            || t.chars().next().is_some_and(|c| {
                c.is_ascii_alphabetic() || c == '_' || c == '"' || c == '`' || c == '['
            })
    }) && !up[open + 1..close].iter().any(|t| t == "(")
}

/// The stream tables of a database (the configured `[[stream]]` tables and `telemetry`),
/// read without creating anything.
pub fn stream_tables(conn: &Connection) -> BTreeSet<String> {
    let mut out = BTreeSet::from([lower(crate::schema::TELEMETRY_TABLE)]);
    let json: Option<String> = system(|| {
        conn.query_row(
            &format!(
                "SELECT value FROM {} WHERE key = 'schema'",
                crate::schema::STREAMS_TABLE
            ),
            [],
            |r| r.get(0),
        )
        .ok()
    });
    if let Some(schema) = json.and_then(|j| serde_json::from_str::<crate::schema::Schema>(&j).ok())
    {
        out.extend(schema.streams.iter().map(|s| lower(&s.table)));
    }
    out
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
        ErrorCode::DatabaseBusy
        | ErrorCode::DatabaseLocked
        | ErrorCode::OutOfMemory
        | ErrorCode::ReadOnly
        | ErrorCode::SystemIoFailure
        | ErrorCode::DatabaseCorrupt
        | ErrorCode::DiskFull
        | ErrorCode::CannotOpen
        | ErrorCode::FileLockingProtocolFailed
        | ErrorCode::NotADatabase
        | ErrorCode::NoLargeFileSupport
        | ErrorCode::PermissionDenied => true,
        _ => false,
    }
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

fn budget_message() -> String {
    format!(
        "statement exceeded the write budget of {WRITE_BUDGET_STEPS} SQLite steps per request \
         (the rest of the request is not run)"
    )
}

// ---------------------------------------------------------------------------------------------
// Applying user statements on every replica.
// ---------------------------------------------------------------------------------------------

/// Runs one user statement on the writer: `Ok(Ok(result))`, `Ok(Err(message))` for a
/// deterministic failure, `Err` for an environment error.
pub type RunResult<R> = rusqlite::Result<Result<R, String>>;

/// What [`apply_statements`] needs from the SQL layer.
pub trait StatementRunner {
    type Result;
    /// Prepares and runs statement `i` (called inside [`user`] with [`Mode::Write`]).
    fn run(&mut self, conn: &Connection, i: usize) -> rusqlite::Result<Self::Result>;
    /// The error of a result, if it failed.
    fn error(r: &Self::Result) -> Option<&str>;
    /// A failed result with `msg`.
    fn failed(msg: String) -> Self::Result;
    /// Makes `r` a failure with `msg` (a check after the statement ran).
    fn fail(r: &mut Self::Result, msg: String);
}

/// Applies `n` user statements inside the entry's open transaction (see [`crate::sql`]'s
/// `apply_sql` for the savepoint semantics), deterministically:
///
/// - a statement runs under [`Mode::Write`] rules and the entry's write budget; once the budget
///   is spent, the remaining statements fail without running;
/// - after a statement, unresolved deferred foreign keys and a rowid of `i64::MAX` are
///   failures (both would otherwise differ or fail later, at commit);
/// - if SQLite rolled back the whole transaction by itself (an interrupted write), the entry's
///   transaction is begun again and the statements re-run from the start with that statement
///   (and, for the budget, every later one) failed: at most a few restarts, the same on every
///   replica.
pub fn apply_statements<R: StatementRunner>(
    conn: &Connection,
    runner: &mut R,
    n: usize,
    transaction: bool,
) -> rusqlite::Result<Vec<R::Result>> {
    let seed = LOCAL.with(|l| l.entry.get().map(|e| e.0).unwrap_or(0));
    let streams = stream_tables(conn);
    LOCAL.with(|l| *l.streams.borrow_mut() = streams);
    let mut forced: BTreeMap<usize, String> = BTreeMap::new();
    let mut restarts = 0;
    loop {
        match apply_once(conn, runner, n, transaction, &forced)? {
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

fn apply_once<R: StatementRunner>(
    conn: &Connection,
    runner: &mut R,
    n: usize,
    transaction: bool,
    forced: &BTreeMap<usize, String>,
) -> rusqlite::Result<Result<Vec<R::Result>, Lost>> {
    let mut results = Vec::with_capacity(n);
    let sp = if transaction {
        "cairn_request"
    } else {
        "cairn_statement"
    };
    if transaction {
        system(|| conn.execute_batch("SAVEPOINT cairn_request"))?;
    }
    for i in 0..n {
        if !transaction {
            system(|| conn.execute_batch("SAVEPOINT cairn_statement"))?;
        }
        let mut r = if let Some(msg) = forced.get(&i) {
            R::failed(msg.clone())
        } else if LOCAL.with(|l| l.budget_hit.get()) {
            R::failed(budget_message())
        } else {
            let r = user(Mode::Write, || runner.run(conn, i))?;
            if conn.is_autocommit() {
                let msg = R::error(&r)
                    .unwrap_or("the transaction was rolled back")
                    .to_string();
                return Ok(Err((i, msg)));
            }
            r
        };
        if R::error(&r).is_none()
            && let Some(msg) = after_statement(conn, !transaction)?
        {
            R::fail(&mut r, msg);
        }
        let failed = R::error(&r).is_some();
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
        let failed = results.last().is_some_and(|r| R::error(r).is_some());
        if !failed && deferred_fks_pending(conn) {
            if let Some(last) = results.last_mut() {
                R::fail(last, "FOREIGN KEY constraint failed".into());
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::schema::{Column, ColumnType, Schema, StreamDef, Undeclared};
    use crate::sql::{Params, SqlCommand, Statement, StatementResult, Value, apply_sql};

    /// A writer like the state machine's, with Cairn's tables and one stream table.
    fn writer(dir: &Path) -> Connection {
        let conn = open_writer(&dir.join("db.sqlite")).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        crate::registry::create_tables(&conn).unwrap();
        Schema {
            streams: vec![StreamDef {
                id: 1,
                table: "climate".into(),
                columns: vec![Column {
                    name: "temperature".into(),
                    ty: ColumnType::Real,
                }],
            }],
            undeclared: Undeclared::Telemetry,
        }
        .install(&conn)
        .unwrap();
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
            apply_sql(
                conn,
                &SqlCommand {
                    statements: sts,
                    transaction: false,
                },
            )
            .unwrap()
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
            "SELECT count(*) FROM sqlite_master WHERE name IN ('x','y','c','r','d','_cairn_mine','tr','u','e')",
        );
        assert_eq!(objects, 0);
        assert!(!conn.is_autocommit() || conn.is_autocommit());
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
            crate::sql::query(&r, &sql(sqls), false, &limits, cancel)
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
        let fresh = crate::sql::query(
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
            &[
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
            ],
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
                .args(["--exact", "sandbox::tests::replica_child", "--nocapture"])
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
    fn test_load_text_is_sandboxed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside.db");
        let streams = BTreeSet::from(["telemetry".to_string(), "climate".to_string()]);
        let load =
            |text: &str| crate::sql::load_statements(text.as_bytes(), dir.path(), &[], &streams);
        for bad in [
            format!("ATTACH '{}' AS x; CREATE TABLE x.t(a);", outside.display()),
            format!("VACUUM INTO '{}'", outside.display()),
            "SELECT load_extension('x')".into(),
            "CREATE TABLE t(a); WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) \
             INSERT INTO t SELECT randomblob(1000) FROM c"
                .into(),
        ] {
            let e = load(&bad).unwrap_err().to_string();
            eprintln!("{bad}\n    -> {e}");
        }
        assert!(!outside.exists());
        let dump = "PRAGMA foreign_keys=OFF;\nBEGIN TRANSACTION;\n\
            CREATE TABLE u(a);\nINSERT INTO u VALUES(1);\n\
            CREATE TABLE _cairn_devices(device_id, key);\nINSERT INTO _cairn_devices VALUES(1, x'00');\n\
            CREATE TABLE climate(device_id, seq, temperature);\nINSERT INTO climate VALUES(1, 1, 2.5);\n\
            CREATE INDEX ci ON climate(seq);\nCOMMIT;";
        let existing = [
            ("table".to_string(), "telemetry".to_string()),
            ("table".to_string(), "old".to_string()),
        ];
        let sts: Vec<String> =
            crate::sql::load_statements(dump.as_bytes(), dir.path(), &existing, &streams)
                .unwrap()
                .into_iter()
                .map(|s| s.sql)
                .collect();
        assert_eq!(
            sts,
            [
                "DELETE FROM \"telemetry\"",
                "DROP TABLE IF EXISTS \"old\"",
                "CREATE TABLE u(a)",
                "INSERT INTO \"u\"(\"a\") VALUES(?)",
                "INSERT INTO \"climate\"(\"device_id\", \"seq\", \"temperature\") VALUES(?, ?, ?)",
            ]
        );
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
}

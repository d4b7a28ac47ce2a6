//! Setting up a connection user SQL may run on: SQLite's hardening, the apply VFS whose clock
//! is the entry's stamp, `random()`/`randomblob()` seeded per entry, the local-time hook and
//! the progress handler (write budget, read time limit, cancellation).

use std::ffi::{CStr, c_int, c_void};
use std::sync::atomic::Ordering;
use std::time::Instant;

use rusqlite::config::DbConfig;
use rusqlite::functions::FunctionFlags;
use rusqlite::limits::Limit;
use rusqlite::{Connection, ffi};

use super::authorizer::authorize;
use super::{
    Kind, LOCAL, MAX_EXPR_DEPTH, MAX_LENGTH, MAX_SQL_LENGTH, MAX_TRIGGER_DEPTH, Mode,
    PROGRESS_INTERVAL, WRITE_BUDGET_STEPS, budget_message, in_apply,
};
use crate::db::DBPAGE;

/// The VFS the replicated database's writer is opened on: the default VFS, except that its
/// clock answers with the applying entry's stamp.
pub const APPLY_VFS: &str = "cairn-apply";

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
    without_raw_pages(conn)?;
    conn.authorizer(Some(authorize))?;
    conn.progress_handler(PROGRESS_INTERVAL as c_int, Some(progress))?;
    Ok(())
}

/// Removes the raw-page table ([`DBPAGE`], compiled in for snapshot transfers) from a
/// connection user SQL may run on: read, it would show Cairn's own tables (device keys) byte
/// for byte; written, it would bypass every rule. Every other table-valued function
/// (`json_each`, `fts5`, ...) stays. The authorizer refuses the name as well.
fn without_raw_pages(conn: &Connection) -> rusqlite::Result<()> {
    let keep: Vec<std::ffi::CString> = conn
        .prepare("SELECT name FROM pragma_module_list WHERE name <> ?1")?
        .query_map([DBPAGE], |r| r.get::<_, String>(0))?
        .filter_map(|n| n.ok().and_then(|n| std::ffi::CString::new(n).ok()))
        .collect();
    let mut list: Vec<*const std::ffi::c_char> = keep.iter().map(|n| n.as_ptr()).collect();
    list.push(std::ptr::null());
    // SAFETY: `conn.handle()` is a live connection used on this thread only for the call;
    // `list` is a NULL-terminated array of NUL-terminated strings that outlive the call
    // (SQLite copies nothing from it after returning).
    let rc = unsafe { ffi::sqlite3_drop_modules(conn.handle(), list.as_mut_ptr()) };
    if rc != ffi::SQLITE_OK {
        return Err(rusqlite::Error::SqliteFailure(
            ffi::Error::new(rc),
            Some("dropping sqlite_dbpage".into()),
        ));
    }
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

//! The replicated SQLite database as a file: opening it, its pragmas, the read-only connection
//! pool, Cairn's own tables inside it, and the SQL and device-record code that runs on a
//! connection. Nothing here knows about Raft; `command` applies entries through it and
//! `raft::state_machine` owns the applied position and the snapshots.
//!
//! - [`sql`]: rqlite-shaped statements and results, run on a connection.
//! - [`lex`]: a small SQL lexer (transaction control, the deterministic rewrite).
//! - [`schema`]: the `[[stream]]` tables device records land in.
//! - [`dead_letter`]: records that do not fit their stream, kept with the reason.
//! - [`registry`]: registered devices, their keys and high-water seqs.
//! - [`export`]: the site id, device epochs, the export journal and cursors.
//! - [`changes`]: capture of user tables' row changes while SQL entries apply, for export.
//! - [`load`]: turning an uploaded database or SQL dump into statements (`/db/load`).
//! - [`failure`]: which SQLite errors are the environment's (hold, exit, corrupt).
//! - [`sandbox`]: what user SQL may do, and making it apply identically on every replica.

pub mod changes;
pub mod dead_letter;
pub mod export;
pub mod failure;
pub mod lex;
pub mod load;
pub mod registry;
pub mod sandbox;
pub mod schema;
pub mod sql;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

/// Cairn's own tables inside the replicated database, in one place. User SQL can see their
/// names and columns but neither read nor write their contents ([`sandbox`]); `/db/load` and
/// the shell's `.tables` leave them out.
pub mod tables {
    /// The applied log id and membership (`key`, `value`), written with every applied entry.
    pub const RAFT: &str = "_cairn_raft";
    /// Registered devices: `(device_id INTEGER PRIMARY KEY, key BLOB NOT NULL)`.
    pub const DEVICES: &str = "_cairn_devices";
    /// Key rotation, revocation and protocol of devices that had any (`db::registry`); created
    /// by the first such registry command, so older entries apply to the same bytes.
    pub const DEVICE_KEYS: &str = "_cairn_device_keys";
    /// Highest applied seq per device: `(device_id INTEGER PRIMARY KEY, seq INTEGER NOT NULL)`.
    pub const HIGH_WATER: &str = "_cairn_high_water";
    /// The time of each device's latest stored record: `(device_id INTEGER PRIMARY KEY,
    /// time_ms INTEGER NOT NULL)`. A later record is never stored with an earlier time
    /// (`command::device`).
    pub const DEVICE_TIMES: &str = "_cairn_device_times";
    /// The replicated stream definitions (`key`, `value`).
    pub const STREAMS: &str = "_cairn_streams";
    /// Records of streams without a definition.
    pub const TELEMETRY: &str = "telemetry";
    /// Chunks of a `/db/load` on its way through the log (`command::load`).
    pub const LOAD: &str = "_cairn_load";
    /// Records that did not fit their stream's declared columns (`db::dead_letter`).
    pub const DEAD_LETTER: &str = "dead_letter";
    /// Continuous backup's shipped positions and the history epoch (`command::backup`).
    pub const BACKUP: &str = "_cairn_backup";
    /// The site id exports key records with (`db::export`).
    pub const SITE: &str = "_cairn_site";
    /// Each device's registration epoch (`db::export`).
    pub const DEVICE_EPOCHS: &str = "_cairn_device_epochs";
    /// Stored device batches in commit order, until every export delivered them.
    pub const EXPORT_JOURNAL: &str = "_cairn_export_journal";
    /// Each export destination's committed cursor.
    pub const EXPORT_CURSORS: &str = "_cairn_export_cursors";
    /// Per destination, the regex of user tables whose changes it exports (`db::changes`);
    /// created by the first `ExportCommand::Capture` (format version 2).
    pub const CHANGE_CAPTURE: &str = "_cairn_change_capture";
    /// Captured changes of user tables in commit order, until every capturing destination
    /// delivered them (`db::changes`); created with [`CHANGE_CAPTURE`].
    pub const CHANGE_JOURNAL: &str = "_cairn_change_journal";
    /// rqlite-style node names of members: `(id INTEGER PRIMARY KEY, name TEXT NOT NULL
    /// UNIQUE)`; created by the first name (`db::registry::set_node_name`).
    pub const NODE_NAMES: &str = "_cairn_node_names";
    /// Each member's incarnation (`command::members`): `(id INTEGER PRIMARY KEY, incarnation
    /// INTEGER NOT NULL)`, created by the first `Command::Members` entry.
    pub const MEMBERS: &str = "_cairn_members";
    /// Each device's current session (`command::registry`, `RegistryCommand::OpenSession`):
    /// `(device_id INTEGER PRIMARY KEY, session INTEGER NOT NULL)`, created by the first
    /// session opened (format version 2). Batches read in an older session are not stored.
    pub const DEVICE_SESSIONS: &str = "_cairn_device_sessions";
}

/// Free space of the file system holding `dir`, in bytes (for unprivileged users).
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    (rc == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
}

/// Whether `table` exists in the main database: a lookup in the connection's parsed schema
/// (`sqlite3_table_column_metadata`), no statement prepared or run. Apply runs this on every
/// device entry, where preparing a statement on a missing table cost more than the insert.
/// Exact on the writer, the one connection that changes the schema; a reader's parsed schema
/// can predate a table created since its last statement, so readers ask `sqlite_master`.
pub fn table_exists(conn: &Connection, table: &str) -> rusqlite::Result<bool> {
    conn.table_exists(Some("main"), table)
}

/// The cluster format version a database records as active (`_cairn_raft`, key
/// `active_version`; 1 when it records none, see `command::version`). Table layouts that
/// differ between versions are chosen by it, inside the applying entry's transaction.
pub fn active_version(conn: &Connection) -> rusqlite::Result<u32> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT value FROM {} WHERE key = 'active_version'",
            tables::RAFT
        )
    });
    // Read by every SQL and replay entry: a cached statement skips the parse.
    let v: Option<Vec<u8>> = match conn
        .prepare_cached(&SQL)
        .and_then(|mut st| st.query_row([], |r| r.get(0)).optional())
    {
        Ok(v) => v,
        // A database that never applied an entry (unit tests) records nothing.
        Err(rusqlite::Error::SqliteFailure(_, Some(m))) if m.starts_with("no such table") => None,
        Err(e) => return Err(e),
    };
    Ok(v.and_then(|b| String::from_utf8_lossy(&b).parse().ok())
        .unwrap_or(crate::version::V1))
}

/// How long truncating the WAL after a snapshot transfer may wait for readers.
const FINISH_WAIT: Duration = Duration::from_millis(200);

/// Readers kept open for reuse.
const READ_POOL: usize = 16;

/// How long a connection waits for a lock before SQLite reports `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// What a WAL file is cut back to whenever SQLite resets it (after a checkpoint that copied
/// everything back): without it a WAL keeps the largest size it ever reached.
pub const WAL_SIZE_LIMIT: i64 = 4 << 20;

/// The raw-page table (`SQLITE_ENABLE_DBPAGE_VTAB`, set in `.cargo/config.toml`), which only
/// snapshot transfers use ([`Store::pages`]). Every connection user SQL may run on is opened
/// without it and its authorizer refuses it ([`sandbox`]).
pub const DBPAGE: &str = "sqlite_dbpage";

/// Opens the live database for writing: hardened and on the apply VFS ([`sandbox`]), WAL,
/// `synchronous=NORMAL` (the Raft log is the durable record), a capped WAL, and the table of
/// the applied position.
pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = sandbox::open_writer(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {} (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID",
        tables::RAFT
    ))?;
    Ok(conn)
}

/// Checks that the bundled SQLite has the raw-page table snapshots are streamed with (built
/// with `SQLITE_ENABLE_DBPAGE_VTAB`, which the workspace's `.cargo/config.toml` sets through
/// `LIBSQLITE3_FLAGS`): a build without it could never send a snapshot, so it refuses to start.
pub fn check_raw_pages() -> anyhow::Result<()> {
    let conn = Connection::open_in_memory()?;
    let n: i64 = conn.query_row(
        "SELECT count(*) FROM pragma_module_list WHERE name = ?1",
        [DBPAGE],
        |r| r.get(0),
    )?;
    anyhow::ensure!(
        n == 1,
        "this build's SQLite lacks {DBPAGE} (snapshots are streamed with it): build the \
         gateway with LIBSQLITE3_FLAGS=\"-DSQLITE_ENABLE_DBPAGE_VTAB\" (set in the workspace's \
         .cargo/config.toml; an embedding project sets it in its own)"
    );
    Ok(())
}

/// Opens a database file read-only (a snapshot, an uploaded file).
pub fn open_read_only(path: &Path) -> rusqlite::Result<Connection> {
    Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
}

/// Makes everything committed on `conn` (the writer) durable and bounds the WAL: one
/// `synchronous=FULL` commit (it fsyncs the WAL, and with it every earlier commit), then a
/// checkpoint that waits for nobody (it copies what no reader still needs back into the main
/// file, and fsyncs that). The commit rewrites the applied position with its own value, so the
/// database's contents do not change.
pub fn make_durable(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "synchronous", "FULL")?;
    let committed = conn.execute(
        &format!(
            "INSERT OR REPLACE INTO {t}(key, value) \
             SELECT key, value FROM {t} WHERE key = 'last_applied'",
            t = tables::RAFT
        ),
        [],
    );
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    committed?;
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
}

/// Counts connections open on the live file, so that [`Store::replace_with`] can wait until
/// there are none (a connection left on the old file would share its WAL with the new one).
#[derive(Default)]
struct Gate {
    /// (connections open, a swap waiting or running)
    state: Mutex<(usize, bool)>,
    changed: Condvar,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, (usize, bool)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, (usize, bool)>) -> MutexGuard<'a, (usize, bool)> {
        self.changed.wait(g).unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one more connection, after any swap under way.
    fn arrive(&self) {
        let mut st = self.lock();
        while st.1 {
            st = self.wait(st);
        }
        st.0 += 1;
    }

    fn leave(&self) {
        self.lock().0 -= 1;
        self.changed.notify_all();
    }

    fn enter(&self) -> GateHold<'_> {
        self.arrive();
        GateHold(self)
    }

    fn enter_owned(self: std::sync::Arc<Self>) -> OwnedHold {
        self.arrive();
        OwnedHold(self)
    }
}

/// One connection's hold on the live file; dropping it lets a waiting swap go on.
struct GateHold<'g>(&'g Gate);

impl Drop for GateHold<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// A [`GateHold`] that moves between threads with the snapshot view it belongs to.
struct OwnedHold(std::sync::Arc<Gate>);

impl Drop for OwnedHold {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// The live database: one writer connection (the state machine's) and a pool of read-only
/// ones for the HTTP and device paths.
pub struct Store {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    gate: std::sync::Arc<Gate>,
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        Ok(Store {
            writer: Mutex::new(open(path)?),
            path: path.to_path_buf(),
            readers: Mutex::new(Vec::new()),
            gate: Default::default(),
        })
    }

    /// The writer connection (the state machine applies and installs through it).
    pub fn writer(&self) -> MutexGuard<'_, Connection> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on a connection to the live database opened read-only at the file level (no
    /// statement can make it a writer) and hardened ([`sandbox`]). A transaction `f` leaves
    /// open is rolled back before the connection goes back to the pool.
    pub fn read<T>(&self, f: impl FnOnce(&Connection) -> T) -> rusqlite::Result<T> {
        let _hold = self.gate.enter();
        let pooled = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match pooled {
            Some(c) => c,
            None => {
                let c = sandbox::open_reader(&self.path)?;
                c.busy_timeout(BUSY_TIMEOUT)?;
                c
            }
        };
        let out = f(&conn);
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        let mut pool = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < READ_POOL {
            pool.push(conn);
        }
        Ok(out)
    }

    /// Bytes used by the database files (main file plus WAL).
    pub fn size(&self) -> u64 {
        let wal = PathBuf::from(format!("{}-wal", self.path.display()));
        [&self.path, &wal]
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Writes a consistent, compact copy of the live database to `dest` (`VACUUM INTO`),
    /// readable without a WAL file and fsync'd.
    pub fn copy_to(&self, dest: &Path) -> std::io::Result<()> {
        let _ = std::fs::remove_file(dest);
        let vacuum = || -> rusqlite::Result<()> {
            let _hold = self.gate.enter();
            let conn = Connection::open_with_flags(&self.path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
            conn.busy_timeout(BUSY_TIMEOUT)?;
            conn.execute("VACUUM INTO ?1", [dest.to_string_lossy()])?;
            drop(conn);
            // The copy must not need a WAL file to be read, wherever it goes.
            Connection::open(dest)?.pragma_update(None, "journal_mode", "DELETE")
        };
        vacuum().map_err(std::io::Error::other)?;
        File::open(dest)?.sync_all()
    }

    /// A consistent view of the live database for a snapshot transfer: its own connection in
    /// one read transaction, read page by page ([`Pages::next_chunk`]). Nothing is copied; while
    /// the view is open the WAL cannot be checkpointed past it, so it grows by what is applied
    /// meanwhile ([`Pages::finish`] truncates it afterwards).
    pub fn pages(&self) -> rusqlite::Result<Pages> {
        let hold = self.gate.clone().enter_owned();
        let conn = Connection::open_with_flags(&self.path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // Pages not in the WAL are read through a memory map: no read call and no page-cache
        // copy per page, so the transfer (and the WAL growth it causes, every commit goes to
        // the WAL's end while this view is open) is shorter. SQLite checks the WAL first and
        // never truncates the file below a page an open view may read.
        conn.pragma_update(None, "mmap_size", PAGES_MMAP)?;
        conn.execute_batch("BEGIN")?;
        // The first read starts the transaction's view; everything below reads that view.
        let page_count: u32 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let page_size: u32 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        Ok(Pages {
            conn,
            page_count,
            page_size,
            next: 1,
            _hold: hold,
        })
    }

    /// Makes `file` (a complete database, fsync'd, on this file system) the live database: waits
    /// until no connection is open on the current one (closing the writer and the pooled
    /// readers; the last close checkpoints and removes the WAL), renames `file` over it, fsyncs
    /// the directory and reopens the writer. Readers wait meanwhile and then see the new file;
    /// a crash leaves the old or the new file, never a mix. Nothing goes through the WAL.
    pub fn replace_with(&self, file: &Path) -> std::io::Result<()> {
        // The writer first, then the gate: a snapshot view is opened under the writer lock
        // (the state machine's build), so the other order could wait on each other.
        let mut writer = self.writer();
        let gate = &self.gate;
        let mut st = gate.lock();
        while st.1 {
            st = gate.wait(st);
        }
        st.1 = true;
        while st.0 > 0 {
            st = gate.wait(st);
        }
        drop(st);
        let swapped = self.swap_closed(&mut writer, file);
        gate.lock().1 = false;
        gate.changed.notify_all();
        swapped
    }

    /// [`Store::replace_with`] once no reader is open.
    fn swap_closed(&self, writer: &mut Connection, file: &Path) -> std::io::Result<()> {
        self.readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let old = std::mem::replace(
            writer,
            Connection::open_in_memory().map_err(std::io::Error::other)?,
        );
        old.close().map_err(|(_, e)| std::io::Error::other(e))?;
        // A WAL left by a crash belongs to the old file: never let the new one read it.
        for side in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{side}", self.path.display()));
            let _ = std::fs::remove_file(format!("{}{side}", file.display()));
        }
        std::fs::rename(file, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        *writer = open(&self.path).map_err(std::io::Error::other)?;
        Ok(())
    }
}

/// The memory map a snapshot view reads the database file through (SQLite's default
/// ceiling on 64-bit targets; 256 MiB of address space on 32-bit boards).
const PAGES_MMAP: i64 = if cfg!(target_pointer_width = "64") {
    0x7fff_0000
} else {
    256 << 20
};

/// The pages of the live database as of one read transaction (see [`Store::pages`]): page 1
/// first, every page of the file in order, so the bytes are a database file (in WAL mode, with
/// no WAL needed).
pub struct Pages {
    conn: Connection,
    page_count: u32,
    page_size: u32,
    next: u32,
    _hold: OwnedHold,
}

impl std::fmt::Debug for Pages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pages({} of {} B)", self.page_count, self.page_size)
    }
}

impl Pages {
    /// The connection inside the transaction, to read what the pages hold.
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Size of the database file these pages make.
    pub fn len(&self) -> u64 {
        u64::from(self.page_count) * u64::from(self.page_size)
    }

    /// True for a database of no pages.
    pub fn is_empty(&self) -> bool {
        self.page_count == 0
    }

    /// The next pages, about `max_bytes` of them (at least one), or `None` after the last.
    pub fn next_chunk(&mut self, max_bytes: usize) -> rusqlite::Result<Option<Vec<u8>>> {
        if self.next > self.page_count {
            return Ok(None);
        }
        let n = (max_bytes / self.page_size as usize).max(1) as u32;
        let last = (self.next + n - 1).min(self.page_count);
        let mut out = Vec::with_capacity(((last - self.next + 1) * self.page_size) as usize);
        // One page per query: the table's best index takes `pgno = ?` only; a range would
        // scan every page of the file for each chunk (a transfer quadratic in the size).
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT data FROM {DBPAGE} WHERE pgno = ?1"))?;
        for pgno in self.next..=last {
            let page = stmt.query_row([pgno], |r| {
                let data = r.get_ref(0)?.as_blob()?;
                out.extend_from_slice(data);
                Ok(data.len())
            })?;
            if page != self.page_size as usize {
                return Err(rusqlite::Error::InvalidQuery);
            }
        }
        self.next = last + 1;
        Ok(Some(out))
    }

    /// Writes every remaining page to `out`.
    pub fn write_to(&mut self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        while let Some(chunk) = self.next_chunk(1 << 20).map_err(std::io::Error::other)? {
            out.write_all(&chunk)?;
        }
        Ok(())
    }

    /// Ends the read transaction and cuts the WAL back to nothing: while the view was open
    /// every commit went to the WAL's end. Best effort: the checkpoint holds SQLite's write
    /// lock while it waits for readers, so it gives up after [`FINISH_WAIT`] rather than stall
    /// apply (busy); the WAL is then cut back at its next reset (`journal_size_limit`). The
    /// error is the caller's to classify (`raft::finish_transfer`).
    pub fn finish(self) -> rusqlite::Result<()> {
        let _ = self.conn.execute_batch("COMMIT");
        self.conn.busy_timeout(FINISH_WAIT)?;
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    /// User SQL runs on the writer and the pooled readers: neither can see raw pages (they
    /// would show `_cairn_devices` byte for byte); the snapshot view can, and JSON functions
    /// stay on every connection.
    #[test]
    fn test_raw_pages_only_for_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.sqlite")).unwrap();
        let raw = "SELECT count(*) FROM sqlite_dbpage";
        let err = store.writer().query_row(raw, [], |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("no such table"), "{err}");
        let err = store
            .read(|c| c.query_row(raw, [], |_| Ok(())))
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("no such table"), "{err}");
        let n: i64 = store
            .read(|c| c.query_row("SELECT count(*) FROM json_each('[1,2]')", [], |r| r.get(0)))
            .unwrap()
            .unwrap();
        assert_eq!(n, 2);
        let pages = store.pages().unwrap();
        let n: i64 = pages.conn().query_row(raw, [], |r| r.get(0)).unwrap();
        assert!(n > 0);
    }

    /// The pages of one read transaction make a database file with exactly that state, even
    /// while the writer goes on; swapping it in leaves no WAL of the old file behind, and
    /// readers see the new file.
    #[test]
    fn test_pages_and_replace_with() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let store = Store::open(&path).unwrap();
        store
            .writer()
            .execute_batch(
                "CREATE TABLE t (x); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 \
                 FROM n WHERE i < 5000) INSERT INTO t SELECT randomblob(100) FROM n;",
            )
            .unwrap();
        let mut pages = store.pages().unwrap();
        assert_eq!(count(pages.conn()), 5000);
        // Serving a snapshot copies nothing: the directory holds the database and its WAL.
        let mut files: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(files, ["db.sqlite", "db.sqlite-shm", "db.sqlite-wal"]);
        // Written after the view began: not in the pages.
        store
            .writer()
            .execute_batch("INSERT INTO t SELECT x FROM t LIMIT 1000")
            .unwrap();
        assert_eq!(store.read(count).unwrap(), 6000);
        let staged = dir.path().join("staged.db");
        let mut out = File::create(&staged).unwrap();
        let len = pages.len();
        pages.write_to(&mut out).unwrap();
        out.sync_all().unwrap();
        pages.finish().unwrap();
        assert_eq!(std::fs::metadata(&staged).unwrap().len(), len);
        store.replace_with(&staged).unwrap();
        assert!(!staged.exists());
        assert_eq!(store.read(count).unwrap(), 5000);
        assert_eq!(count(&store.writer()), 5000);
        let ok: String = store
            .read(|c| c.query_row("PRAGMA integrity_check", [], |r| r.get(0)))
            .unwrap()
            .unwrap();
        assert_eq!(ok, "ok");
        store
            .writer()
            .execute_batch("INSERT INTO t VALUES (1)")
            .unwrap();
        assert_eq!(store.read(count).unwrap(), 5001);
    }
}

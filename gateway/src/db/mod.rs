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
//! - [`load`]: turning an uploaded database or SQL dump into statements (`/db/load`).
//! - [`failure`]: which SQLite errors are the environment's (hold, exit, corrupt).
//! - [`sandbox`]: what user SQL may do, and making it apply identically on every replica.

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
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

/// Cairn's own tables inside the replicated database, in one place. User SQL can see their
/// names and columns but neither read nor write their contents ([`sandbox`]); `/db/load` and
/// the shell's `.tables` leave them out.
pub mod tables {
    /// The applied log id and membership (`key`, `value`), written with every applied entry.
    pub const RAFT: &str = "_cairn_raft";
    /// Registered devices: `(device_id INTEGER PRIMARY KEY, key BLOB NOT NULL)`.
    pub const DEVICES: &str = "_cairn_devices";
    /// Highest applied seq per device: `(device_id INTEGER PRIMARY KEY, seq INTEGER NOT NULL)`.
    pub const HIGH_WATER: &str = "_cairn_high_water";
    /// The replicated stream definitions (`key`, `value`).
    pub const STREAMS: &str = "_cairn_streams";
    /// Records of streams without a definition.
    pub const TELEMETRY: &str = "telemetry";
    /// Chunks of a `/db/load` on its way through the log (`command::load`).
    pub const LOAD: &str = "_cairn_load";
    /// Records that did not fit their stream's declared columns (`db::dead_letter`).
    pub const DEAD_LETTER: &str = "dead_letter";
    /// The site id exports key records with (`db::export`).
    pub const SITE: &str = "_cairn_site";
    /// Each device's registration epoch (`db::export`).
    pub const DEVICE_EPOCHS: &str = "_cairn_device_epochs";
    /// Stored device batches in commit order, until every export delivered them.
    pub const EXPORT_JOURNAL: &str = "_cairn_export_journal";
    /// Each export destination's committed cursor.
    pub const EXPORT_CURSORS: &str = "_cairn_export_cursors";
}

/// Readers kept open for reuse.
const READ_POOL: usize = 16;

/// How long a connection waits for a lock before SQLite reports `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens the live database for writing: hardened and on the apply VFS ([`sandbox`]), WAL,
/// `synchronous=NORMAL` (the Raft log is the durable record), and the table of the applied
/// position.
pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = sandbox::open_writer(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {} (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID",
        tables::RAFT
    ))?;
    Ok(conn)
}

/// Opens a database file read-only (a snapshot, an uploaded file).
pub fn open_read_only(path: &Path) -> rusqlite::Result<Connection> {
    Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
}

/// The live database: one writer connection (the state machine's) and a pool of read-only
/// ones for the HTTP and device paths.
pub struct Store {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        Ok(Store {
            writer: Mutex::new(open(path)?),
            path: path.to_path_buf(),
            readers: Mutex::new(Vec::new()),
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
}

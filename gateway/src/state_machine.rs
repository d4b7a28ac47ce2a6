//! The replicated SQLite database (`sm/db.sqlite`) and its snapshots (`sm/snapshots/`).
//!
//! # Correctness requirements (from openraft's `RaftStateMachine`) and how they are met
//!
//! - Each entry is applied in one SQLite transaction that also stores its log id (and, for a
//!   membership entry, the membership) in the `_cairn_raft` table, so the data and the applied
//!   position can never disagree, whatever the crash.
//! - The database runs in WAL mode with `synchronous=NORMAL`: a commit is atomic but not
//!   fsync'd on its own. A process crash loses nothing; a power cut may roll the database back a
//!   few entries, which openraft re-applies from the log (the log itself is fsync'd).
//! - A snapshot is `VACUUM INTO` a new file from a separate connection: a consistent copy whose
//!   `_cairn_raft` table says exactly which log id it contains. It is fsync'd and renamed to
//!   `current.db` before it is reported, so a reported snapshot is durable.
//! - Installing a snapshot copies it into the live database with SQLite's backup API in a
//!   single step, which is one write transaction: readers see the old or the new database,
//!   never a mix, and a crash leaves one or the other.
//! - Snapshots are files and move as streams; the database is never held in memory whole.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::TryStreamExt;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::command::{self, ApplyContext, Command, CommandResponse};
use crate::raft_types::{Entry, LogId, SnapshotMeta, StoredMembership, TypeConfig, io_err};

/// The name of the table holding the applied log id and membership inside the database.
pub const META_TABLE: &str = "_cairn_raft";

/// A snapshot as openraft moves it around: an open file plus where it lives.
///
/// The open handle keeps the bytes readable even if a newer snapshot replaces the file.
#[derive(Debug)]
pub struct SnapshotFile {
    pub file: File,
    pub path: PathBuf,
}

/// Shared between the state machine (owned by openraft) and the HTTP readers.
pub struct Store {
    db_path: PathBuf,
    snap_dir: PathBuf,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    applied: Mutex<(Option<LogId>, StoredMembership)>,
    current_snapshot: Mutex<Option<SnapshotMeta>>,
    snapshot_seq: AtomicU64,
}

/// openraft's handle on the store.
#[derive(Clone)]
pub struct StateMachine {
    store: Arc<Store>,
}

fn open_db(path: &Path) -> rusqlite::Result<Connection> {
    let conn = crate::sandbox::open_writer(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {META_TABLE} (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID"
    ))?;
    Ok(conn)
}

/// Reads the applied log id and membership recorded inside a database.
fn read_applied(conn: &Connection) -> std::io::Result<(Option<LogId>, StoredMembership)> {
    let get = |key: &str| -> std::io::Result<Option<Vec<u8>>> {
        conn.query_row(
            &format!("SELECT value FROM {META_TABLE} WHERE key = ?1"),
            [key],
            |r| r.get(0),
        )
        .optional()
        .map_err(io_err)
    };
    let applied = match get("last_applied")? {
        Some(b) => serde_json::from_slice(&b).map_err(io_err)?,
        None => None,
    };
    let membership = match get("membership")? {
        Some(b) => serde_json::from_slice(&b).map_err(io_err)?,
        None => StoredMembership::default(),
    };
    Ok((applied, membership))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Store {
    fn read_snapshot_meta(path: &Path) -> std::io::Result<SnapshotMeta> {
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(io_err)?;
        let (last_log_id, last_membership) = read_applied(&conn)?;
        Ok(SnapshotMeta {
            last_log_id,
            last_membership,
        })
    }

    /// Runs `f` on a read-only connection to the live database.
    pub fn read<T>(&self, f: impl FnOnce(&Connection) -> T) -> anyhow::Result<T> {
        let conn = self
            .readers
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .pop();
        let conn = match conn {
            Some(c) => c,
            None => {
                // Read-only at the file level: no statement can make it a writer.
                let c = crate::sandbox::open_reader(&self.db_path)?;
                c.busy_timeout(std::time::Duration::from_secs(10))?;
                c
            }
        };
        let out = f(&conn);
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        let mut pool = self
            .readers
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?;
        if pool.len() < 16 {
            pool.push(conn);
        }
        Ok(out)
    }

    /// The last applied log id and membership (cached; updated by every apply).
    pub fn applied(&self) -> (Option<LogId>, StoredMembership) {
        self.applied.lock().expect("applied mutex").clone()
    }

    /// Bytes used by the database files (main file plus WAL).
    pub fn db_size(&self) -> u64 {
        let wal = PathBuf::from(format!("{}-wal", self.db_path.display()));
        [&self.db_path, &wal]
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Writes a consistent, compact copy of the live database to `dest` (`VACUUM INTO`).
    pub fn copy_to(&self, dest: &Path) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(dest);
        let conn = Connection::open_with_flags(&self.db_path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute("VACUUM INTO ?1", [dest.to_string_lossy()])?;
        drop(conn);
        // The copy must not need a WAL file to be read, wherever it goes.
        let copy = Connection::open(dest)?;
        copy.pragma_update(None, "journal_mode", "DELETE")?;
        drop(copy);
        File::open(dest)?.sync_all()?;
        Ok(())
    }

    fn build_snapshot(&self) -> std::io::Result<(SnapshotMeta, SnapshotFile)> {
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let building = self
            .snap_dir
            .join(format!("building-{}-{seq}.db", std::process::id()));
        self.copy_to(&building).map_err(io_err)?;
        let meta = Self::read_snapshot_meta(&building)?;
        let file = File::open(&building)?;
        let current = self.snap_dir.join("current.db");
        let mut cur = self.current_snapshot.lock().map_err(io_err)?;
        let newer = cur
            .as_ref()
            .is_none_or(|c| c.last_log_id <= meta.last_log_id);
        if newer {
            std::fs::rename(&building, &current)?;
            sync_dir(&self.snap_dir)?;
            *cur = Some(meta.clone());
            Ok((
                meta,
                SnapshotFile {
                    file,
                    path: current,
                },
            ))
        } else {
            let _ = std::fs::remove_file(&building);
            Ok((
                meta,
                SnapshotFile {
                    file,
                    path: building,
                },
            ))
        }
    }

    fn install(&self, meta: &SnapshotMeta, mut snap: SnapshotFile) -> std::io::Result<()> {
        let staged = self.snap_dir.join("installing.db");
        if snap.path.starts_with(&self.snap_dir) && snap.path != self.snap_dir.join("current.db") {
            // Received by our transport into our own directory: just move it.
            std::fs::rename(&snap.path, &staged)?;
        } else {
            snap.file.seek(SeekFrom::Start(0))?;
            let mut out = File::create(&staged)?;
            std::io::copy(&mut snap.file, &mut out)?;
            out.sync_all()?;
        }
        let got = Self::read_snapshot_meta(&staged)?;
        if got.last_log_id != meta.last_log_id {
            return Err(io_err(format!(
                "snapshot file holds {:?}, metadata says {:?}",
                got.last_log_id, meta.last_log_id
            )));
        }
        {
            let src = Connection::open_with_flags(&staged, OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(io_err)?;
            let mut dst = self.writer.lock().map_err(io_err)?;
            // One step = one write transaction on the live database: atomic.
            let backup = rusqlite::backup::Backup::new(&src, &mut dst).map_err(io_err)?;
            backup.step(-1).map_err(io_err)?;
            drop(backup);
            *self.applied.lock().map_err(io_err)? = read_applied(&dst)?;
        }
        std::fs::rename(&staged, self.snap_dir.join("current.db"))?;
        sync_dir(&self.snap_dir)?;
        *self.current_snapshot.lock().map_err(io_err)? = Some(meta.clone());
        Ok(())
    }

    fn apply_entries(&self, entries: Vec<Entry>) -> std::io::Result<Vec<CommandResponse>> {
        let mut conn = self.writer.lock().map_err(io_err)?;
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            let tx = conn.transaction().map_err(io_err)?;
            let ctx = ApplyContext {
                log_id: &entry.log_id,
            };
            let resp = match &entry.payload {
                EntryPayload::Blank => CommandResponse::Empty,
                EntryPayload::Normal(cmd) => command::apply(&tx, &ctx, cmd).map_err(io_err)?,
                EntryPayload::Membership(m) => {
                    let sm = StoredMembership::new(Some(entry.log_id), m.clone());
                    tx.execute(
                        &format!("INSERT OR REPLACE INTO {META_TABLE}(key, value) VALUES('membership', ?1)"),
                        [serde_json::to_vec(&sm).map_err(io_err)?],
                    )
                    .map_err(io_err)?;
                    self.applied.lock().map_err(io_err)?.1 = sm;
                    CommandResponse::Empty
                }
            };
            tx.execute(
                &format!(
                    "INSERT OR REPLACE INTO {META_TABLE}(key, value) VALUES('last_applied', ?1)"
                ),
                [serde_json::to_vec(&Some(entry.log_id)).map_err(io_err)?],
            )
            .map_err(io_err)?;
            tx.commit().map_err(io_err)?;
            self.applied.lock().map_err(io_err)?.0 = Some(entry.log_id);
            out.push(resp);
        }
        Ok(out)
    }
}

impl StateMachine {
    /// Opens (creating if needed) the state machine under `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let snap_dir = dir.join("snapshots");
        std::fs::create_dir_all(&snap_dir)?;
        // Leftovers of an interrupted build or transfer are never needed.
        for e in std::fs::read_dir(&snap_dir)? {
            let p = e?.path();
            if p.file_name().is_some_and(|n| n != "current.db") {
                let _ = std::fs::remove_file(&p);
            }
        }
        let db_path = dir.join("db.sqlite");
        let writer = open_db(&db_path)?;
        let applied = read_applied(&writer)?;
        let current = snap_dir.join("current.db");
        let current_snapshot = if current.exists() {
            Some(Store::read_snapshot_meta(&current)?)
        } else {
            None
        };
        Ok(StateMachine {
            store: Arc::new(Store {
                db_path,
                snap_dir,
                writer: Mutex::new(writer),
                readers: Mutex::new(Vec::new()),
                applied: Mutex::new(applied),
                current_snapshot: Mutex::new(current_snapshot),
                snapshot_seq: AtomicU64::new(0),
            }),
        })
    }

    /// The shared store, for readers outside openraft.
    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// Where the transport should write an incoming snapshot so that install can move it.
    pub fn incoming_path(store: &Store, tag: &str) -> PathBuf {
        store.snap_dir.join(format!("incoming-{tag}.db"))
    }
}

/// An entry cheap enough to apply on the calling task (see `apply`).
fn is_small(e: &Entry) -> bool {
    match &e.payload {
        EntryPayload::Blank | EntryPayload::Membership(_) => true,
        EntryPayload::Normal(Command::DeviceBatches(b)) => {
            b.len() <= 4 && b.iter().map(|b| b.body.len()).sum::<usize>() <= 4096
        }
        EntryPayload::Normal(_) => false,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(io_err)?
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(
        &mut self,
    ) -> Result<openraft::alias::SnapshotOf<TypeConfig, SnapshotFile>, std::io::Error> {
        let store = self.store.clone();
        let (meta, snapshot) = blocking(move || store.build_snapshot()).await?;
        tracing::info!(last_log_id = ?meta.last_log_id, "built snapshot");
        Ok(openraft::Snapshot { meta, snapshot })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), std::io::Error> {
        Ok(self.store.applied())
    }

    async fn apply<Strm>(&mut self, entries: Strm) -> Result<(), std::io::Error>
    where
        Strm: futures_util::Stream<Item = Result<EntryResponder<TypeConfig>, std::io::Error>>
            + Unpin
            + OptionalSend,
    {
        let items: Vec<EntryResponder<TypeConfig>> = entries.try_collect().await?;
        let (entries, responders): (Vec<_>, Vec<_>) = items.into_iter().unzip();
        let store = self.store.clone();
        let started = std::time::Instant::now();
        // A small entry (one device batch, a membership change) applies in tens of µs: run it
        // here rather than pay a hop to the blocking pool and back on the ack path. Anything
        // larger goes to the blocking pool so it never stalls the runtime's workers.
        let responses = if entries.iter().all(is_small) && entries.len() <= 4 {
            store.apply_entries(entries)?
        } else {
            blocking(move || store.apply_entries(entries)).await?
        };
        crate::ingress::metrics::METRICS
            .apply_latency
            .record(started.elapsed());
        for (resp, responder) in responses.into_iter().zip(responders) {
            if let Some(r) = responder {
                r.send(resp);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotFile,
    ) -> Result<(), std::io::Error> {
        let store = self.store.clone();
        let m = meta.clone();
        blocking(move || store.install(&m, snapshot)).await?;
        tracing::info!(last_log_id = ?meta.last_log_id, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<openraft::alias::SnapshotOf<TypeConfig, SnapshotFile>>, std::io::Error> {
        let meta = self.store.current_snapshot.lock().map_err(io_err)?.clone();
        let Some(meta) = meta else { return Ok(None) };
        let path = self.store.snap_dir.join("current.db");
        let file = File::open(&path)?;
        Ok(Some(openraft::Snapshot {
            meta,
            snapshot: SnapshotFile { file, path },
        }))
    }
}

//! openraft's state machine: applying entries to the replicated database (`sm/db.sqlite`,
//! [`crate::db::Store`]) and its snapshots (`sm/snapshots/`).
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
use rusqlite::{Connection, OptionalExtension};

use super::{Entry, LogId, SnapshotMeta, StoredMembership, TypeConfig, io_err};
use crate::command::feed::Feed;
use crate::command::{self, ApplyContext, Command, CommandResponse};
use crate::db::{self, Store, tables};
use crate::metrics::Metrics;

/// A snapshot as openraft moves it around: an open file plus where it lives.
///
/// The open handle keeps the bytes readable even if a newer snapshot replaces the file.
#[derive(Debug)]
pub struct SnapshotFile {
    pub file: File,
    pub path: PathBuf,
}

/// openraft's handle on the replicated database; cloning shares it.
#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<Store>,
    snap_dir: PathBuf,
    applied: Mutex<(Option<LogId>, StoredMembership)>,
    current_snapshot: Mutex<Option<SnapshotMeta>>,
    snapshot_seq: AtomicU64,
    metrics: Arc<Metrics>,
    feed: Arc<Feed>,
}

/// Reads the applied log id and membership recorded inside a database.
fn read_applied(conn: &Connection) -> std::io::Result<(Option<LogId>, StoredMembership)> {
    let get = |key: &str| -> std::io::Result<Option<Vec<u8>>> {
        conn.query_row(
            &format!("SELECT value FROM {} WHERE key = ?1", tables::RAFT),
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

fn read_snapshot_meta(path: &Path) -> std::io::Result<SnapshotMeta> {
    let conn = db::open_read_only(path).map_err(io_err)?;
    let (last_log_id, last_membership) = read_applied(&conn)?;
    Ok(SnapshotMeta {
        last_log_id,
        last_membership,
    })
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Inner {
    /// The last applied log id and membership (cached; updated by every apply).
    fn applied(&self) -> (Option<LogId>, StoredMembership) {
        self.applied.lock().expect("applied mutex").clone()
    }

    fn build_snapshot(&self) -> std::io::Result<(SnapshotMeta, SnapshotFile)> {
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let building = self
            .snap_dir
            .join(format!("building-{}-{seq}.db", std::process::id()));
        self.store.copy_to(&building)?;
        let meta = read_snapshot_meta(&building)?;
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
        let got = read_snapshot_meta(&staged)?;
        if got.last_log_id != meta.last_log_id {
            return Err(io_err(format!(
                "snapshot file holds {:?}, metadata says {:?}",
                got.last_log_id, meta.last_log_id
            )));
        }
        {
            let src = db::open_read_only(&staged).map_err(io_err)?;
            let mut dst = self.store.writer();
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
        let mut conn = self.store.writer();
        let ctx = ApplyContext {
            metrics: &self.metrics,
            feed: &self.feed,
        };
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            let tx = conn.transaction().map_err(io_err)?;
            let resp = match &entry.payload {
                EntryPayload::Blank => CommandResponse::Empty,
                EntryPayload::Normal(cmd) => command::apply(&tx, &ctx, cmd).map_err(io_err)?,
                EntryPayload::Membership(m) => {
                    let sm = StoredMembership::new(Some(entry.log_id), m.clone());
                    tx.execute(
                        &format!(
                            "INSERT OR REPLACE INTO {}(key, value) VALUES('membership', ?1)",
                            tables::RAFT
                        ),
                        [serde_json::to_vec(&sm).map_err(io_err)?],
                    )
                    .map_err(io_err)?;
                    self.applied.lock().map_err(io_err)?.1 = sm;
                    CommandResponse::Empty
                }
            };
            tx.execute(
                &format!(
                    "INSERT OR REPLACE INTO {}(key, value) VALUES('last_applied', ?1)",
                    tables::RAFT
                ),
                [serde_json::to_vec(&Some(entry.log_id)).map_err(io_err)?],
            )
            .map_err(io_err)?;
            tx.commit().map_err(io_err)?;
            self.feed.publish(entry.log_id.index);
            self.applied.lock().map_err(io_err)?.0 = Some(entry.log_id);
            out.push(resp);
        }
        Ok(out)
    }
}

impl StateMachine {
    /// Opens (creating if needed) the state machine under `dir`, counting into `metrics`.
    pub fn open(dir: &Path, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        Self::open_with_feed(dir, metrics, Arc::default())
    }

    /// [`StateMachine::open`], publishing stored device records to `feed`.
    pub fn open_with_feed(
        dir: &Path,
        metrics: Arc<Metrics>,
        feed: Arc<Feed>,
    ) -> anyhow::Result<Self> {
        let snap_dir = dir.join("snapshots");
        std::fs::create_dir_all(&snap_dir)?;
        // Leftovers of an interrupted build or transfer are never needed.
        for e in std::fs::read_dir(&snap_dir)? {
            let p = e?.path();
            if p.file_name().is_some_and(|n| n != "current.db") {
                let _ = std::fs::remove_file(&p);
            }
        }
        let store = Store::open(&dir.join("db.sqlite"))?;
        let applied = read_applied(&store.writer())?;
        let current = snap_dir.join("current.db");
        let current_snapshot = if current.exists() {
            Some(read_snapshot_meta(&current)?)
        } else {
            None
        };
        Ok(StateMachine {
            inner: Arc::new(Inner {
                store: Arc::new(store),
                snap_dir,
                applied: Mutex::new(applied),
                current_snapshot: Mutex::new(current_snapshot),
                snapshot_seq: AtomicU64::new(0),
                metrics,
                feed,
            }),
        })
    }

    /// The live database, for readers outside openraft.
    pub fn store(&self) -> Arc<Store> {
        self.inner.store.clone()
    }

    /// Where the transport should write an incoming snapshot so that install can move it.
    pub fn incoming_path(&self, tag: &str) -> PathBuf {
        self.inner.snap_dir.join(format!("incoming-{tag}.db"))
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
        let inner = self.inner.clone();
        let (meta, snapshot) = blocking(move || inner.build_snapshot()).await?;
        tracing::info!(last_log_id = ?meta.last_log_id, "built snapshot");
        Ok(openraft::Snapshot { meta, snapshot })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), std::io::Error> {
        Ok(self.inner.applied())
    }

    async fn apply<Strm>(&mut self, entries: Strm) -> Result<(), std::io::Error>
    where
        Strm: futures_util::Stream<Item = Result<EntryResponder<TypeConfig>, std::io::Error>>
            + Unpin
            + OptionalSend,
    {
        let items: Vec<EntryResponder<TypeConfig>> = entries.try_collect().await?;
        let (entries, responders): (Vec<_>, Vec<_>) = items.into_iter().unzip();
        let inner = self.inner.clone();
        let started = std::time::Instant::now();
        // A small entry (one device batch, a membership change) applies in tens of µs: run it
        // here rather than pay a hop to the blocking pool and back on the ack path. Anything
        // larger goes to the blocking pool so it never stalls the runtime's workers.
        let responses = if entries.iter().all(is_small) && entries.len() <= 4 {
            inner.apply_entries(entries)?
        } else {
            let applying = inner.clone();
            blocking(move || applying.apply_entries(entries)).await?
        };
        inner.metrics.apply_latency.record(started.elapsed());
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
        let inner = self.inner.clone();
        let m = meta.clone();
        blocking(move || inner.install(&m, snapshot)).await?;
        tracing::info!(last_log_id = ?meta.last_log_id, "installed snapshot");
        self.inner
            .feed
            .snapshot_installed(meta.last_log_id.map_or(0, |l| l.index));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<openraft::alias::SnapshotOf<TypeConfig, SnapshotFile>>, std::io::Error> {
        let meta = self.inner.current_snapshot.lock().map_err(io_err)?.clone();
        let Some(meta) = meta else { return Ok(None) };
        let path = self.inner.snap_dir.join("current.db");
        let file = File::open(&path)?;
        Ok(Some(openraft::Snapshot {
            meta,
            snapshot: SnapshotFile { file, path },
        }))
    }
}

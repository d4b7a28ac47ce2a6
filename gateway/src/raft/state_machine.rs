//! openraft's state machine: applying entries to the replicated database (`sm/db.sqlite`,
//! [`crate::db::Store`]) and its snapshots, which are the database itself.
//!
//! # Correctness requirements (from openraft's `RaftStateMachine`) and how they are met
//!
//! - Each entry is applied in one SQLite transaction that also stores its log id (and, for a
//!   membership entry, the membership) in the `_cairn_raft` table, so the data and the applied
//!   position can never disagree, whatever the crash.
//! - The database runs in WAL mode with `synchronous=NORMAL`: a commit is atomic but not
//!   fsync'd on its own. A process crash loses nothing; a power cut may roll the database back a
//!   few entries, which openraft re-applies from the log (the log itself is fsync'd).
//! - There is no second copy of the database at rest. Building a snapshot copies nothing: it
//!   makes the database durable ([`db::make_durable`]: a `synchronous=FULL` commit, then a
//!   checkpoint) and reports the applied log id as of that point. openraft purges the log only
//!   behind a reported snapshot, so it never drops entries a power cut could roll the database
//!   back below. Opening the state machine makes the database durable the same way, because
//!   openraft takes the snapshot it finds at start-up ([`get_current_snapshot`]) as durable too.
//! - A snapshot to send is one read transaction on its own connection
//!   ([`db::Store::pages`]): the applied log id and membership are read from `_cairn_raft`
//!   inside it, and the same transaction's pages are streamed, so metadata and data cannot
//!   disagree. The WAL grows by what is applied during the transfer and is truncated after it.
//! - Installing a snapshot writes the received pages to a file next to the database, checks
//!   that its `_cairn_raft` holds the log id the metadata names, and swaps files
//!   ([`db::Store::replace_with`]: close every connection, rename, fsync the directory,
//!   reopen): nothing is copied through the WAL, and a crash leaves the old or the new file.
//! - Snapshots move as streams; the database is never held in memory whole.
//!
//! [`get_current_snapshot`]: RaftStateMachine::get_current_snapshot

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures_util::TryStreamExt;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use rusqlite::{Connection, OptionalExtension};

use super::{Entry, LogId, SnapshotMeta, StoredMembership, TypeConfig, io_err};
use crate::command::{self, ApplyContext, Command, CommandResponse};
use crate::db::{self, Store, tables};
use crate::metrics::Metrics;

/// A snapshot as openraft moves it around.
#[derive(Debug)]
pub enum SnapshotData {
    /// The live database as of one read transaction, read page by page when sent.
    Live(db::Pages),
    /// A database file received from the leader (in this node's snapshot directory), to be
    /// installed.
    Received(PathBuf),
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
    metrics: Arc<Metrics>,
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

/// The metadata a database file's `_cairn_raft` table holds.
fn read_snapshot_meta(path: &Path) -> std::io::Result<SnapshotMeta> {
    let conn = rusqlite::Connection::open(path).map_err(io_err)?;
    let (last_log_id, last_membership) = read_applied(&conn)?;
    Ok(SnapshotMeta {
        last_log_id,
        last_membership,
    })
}

impl Inner {
    /// The last applied log id and membership (cached; updated by every apply).
    fn applied(&self) -> (Option<LogId>, StoredMembership) {
        self.applied.lock().expect("applied mutex").clone()
    }

    /// Makes the database durable and reports what it holds (see the module doc), with a view
    /// of exactly that state (opened before apply can go on).
    fn build_snapshot(&self) -> std::io::Result<(SnapshotMeta, db::Pages)> {
        let writer = self.store.writer();
        db::make_durable(&writer).map_err(io_err)?;
        let (last_log_id, last_membership) = self.applied();
        let pages = self.store.pages().map_err(io_err)?;
        drop(writer);
        Ok((
            SnapshotMeta {
                last_log_id,
                last_membership,
            },
            pages,
        ))
    }

    /// The live database as a snapshot: one read transaction, its metadata read inside it.
    /// `None` before anything was applied.
    fn current_snapshot(&self) -> std::io::Result<Option<(SnapshotMeta, db::Pages)>> {
        let pages = self.store.pages().map_err(io_err)?;
        let (last_log_id, last_membership) = read_applied(pages.conn())?;
        if last_log_id.is_none() {
            return Ok(None);
        }
        Ok(Some((
            SnapshotMeta {
                last_log_id,
                last_membership,
            },
            pages,
        )))
    }

    fn install(&self, meta: &SnapshotMeta, snap: SnapshotData) -> std::io::Result<()> {
        let staged = self.snap_dir.join("installing.db");
        let _ = std::fs::remove_file(&staged);
        match snap {
            // Received by our transport into our own directory: just move it.
            SnapshotData::Received(path) => std::fs::rename(&path, &staged)?,
            SnapshotData::Live(mut pages) => {
                let mut out = std::io::BufWriter::new(File::create(&staged)?);
                pages.write_to(&mut out)?;
                out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
                pages.finish();
            }
        }
        let got = read_snapshot_meta(&staged)?;
        if got.last_log_id != meta.last_log_id {
            let _ = std::fs::remove_file(&staged);
            return Err(io_err(format!(
                "snapshot file holds {:?}, metadata says {:?}",
                got.last_log_id, meta.last_log_id
            )));
        }
        self.store.replace_with(&staged)?;
        *self.applied.lock().map_err(io_err)? = read_applied(&self.store.writer())?;
        Ok(())
    }

    fn apply_entries(&self, entries: Vec<Entry>) -> std::io::Result<Vec<CommandResponse>> {
        let mut conn = self.store.writer();
        let ctx = ApplyContext {
            metrics: &self.metrics,
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
            self.applied.lock().map_err(io_err)?.0 = Some(entry.log_id);
            out.push(resp);
        }
        Ok(out)
    }
}

impl StateMachine {
    /// Opens (creating if needed) the state machine under `dir`, counting into `metrics`.
    pub fn open(dir: &Path, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let snap_dir = dir.join("snapshots");
        std::fs::create_dir_all(&snap_dir)?;
        // Leftovers of an interrupted transfer or install are never needed.
        for e in std::fs::read_dir(&snap_dir)? {
            let _ = std::fs::remove_file(e?.path());
        }
        let store = Store::open(&dir.join("db.sqlite"))?;
        // openraft takes what it finds here as a durable snapshot (see the module doc).
        db::make_durable(&store.writer())?;
        let applied = read_applied(&store.writer())?;
        Ok(StateMachine {
            inner: Arc::new(Inner {
                store: Arc::new(store),
                snap_dir,
                applied: Mutex::new(applied),
                metrics,
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
    type SnapshotData = SnapshotData;

    async fn build_snapshot(
        &mut self,
    ) -> Result<openraft::alias::SnapshotOf<TypeConfig, SnapshotData>, std::io::Error> {
        let inner = self.inner.clone();
        let (meta, pages) = blocking(move || inner.build_snapshot()).await?;
        tracing::info!(last_log_id = ?meta.last_log_id, "snapshot point: database durable");
        Ok(openraft::Snapshot {
            meta,
            snapshot: SnapshotData::Live(pages),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
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
        snapshot: SnapshotData,
    ) -> Result<(), std::io::Error> {
        let inner = self.inner.clone();
        let m = meta.clone();
        blocking(move || inner.install(&m, snapshot)).await?;
        tracing::info!(last_log_id = ?meta.last_log_id, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<openraft::alias::SnapshotOf<TypeConfig, SnapshotData>>, std::io::Error> {
        let inner = self.inner.clone();
        let current = blocking(move || inner.current_snapshot()).await?;
        Ok(current.map(|(meta, pages)| openraft::Snapshot {
            meta,
            snapshot: SnapshotData::Live(pages),
        }))
    }
}

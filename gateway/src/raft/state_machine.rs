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
//! - Applying never reports an environment failure of this replica as a result, nor to
//!   openraft when it can be waited out (`db::failure`): on a full disk the entry is rolled
//!   back and applied again with back-off until it goes through (the node reports the stall);
//!   an I/O error ends the process; a corrupt file stops the node with a clear error.
//!
//! [`get_current_snapshot`]: RaftStateMachine::get_current_snapshot

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use futures_util::TryStreamExt;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use rusqlite::{Connection, OptionalExtension};

use super::{Entry, LogId, SnapshotMeta, StoredMembership, TypeConfig, io_err};
use crate::command::feed::Feed;
use crate::command::{self, ApplyContext, CommandResponse};
use crate::db::failure::{self, Failure};
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
    feed: Arc<Feed>,
}

/// Reads the applied log id and membership recorded inside a database.
pub fn read_applied(conn: &Connection) -> std::io::Result<(Option<LogId>, StoredMembership)> {
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
    /// of exactly that state (opened before apply can go on). A failure is classified by the
    /// caller (`db::failure`): a full disk holds the build, an I/O error ends the process.
    fn build_snapshot(&self) -> rusqlite::Result<(SnapshotMeta, db::Pages)> {
        let writer = self.store.writer();
        db::make_durable(&writer)?;
        let (last_log_id, last_membership) = self.applied();
        let pages = self.store.pages()?;
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
        let pages = {
            // Opened on a WAL checkpointed to its end (apply waits meanwhile: no commit comes
            // between), the view reads the database file alone, and the commits made while it
            // is open reuse the WAL file from its start instead of growing it by as much (the
            // build path's `make_durable` checkpoints the same way). Best effort.
            let writer = self.store.writer();
            let _ = writer.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
            self.store.pages().map_err(io_err)?
        };
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
                super::finish_transfer(pages);
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
        let conn = self.store.writer();
        *self.applied.lock().map_err(io_err)? = read_applied(&conn)?;
        note_stamp(&conn, &self.metrics)?;
        self.metrics
            .versions
            .set_active(command::version::read_active(&conn).map_err(io_err)?);
        Ok(())
    }

    /// Applies `entries[out.len()..]`, pushing their responses to `out`: one transaction per
    /// entry, except that consecutive device entries share one ([`GROUP_MAX`] at most, each
    /// in its own savepoint): under load most entries are device groups, and each commit
    /// rewrites the pages every entry touches (`_cairn_raft`, the high-waters, the export
    /// journal, the devices' last leaves), which is most of the WAL's traffic. What is stored
    /// is the same either way. Stops at an entry that failed: rolled back (the entries before
    /// it in its group are committed), and either held (to be tried again) or fatal.
    fn apply_entries(&self, entries: &[Entry], out: &mut Vec<CommandResponse>) -> Result<(), Halt> {
        let mut conn = self.store.writer();
        while out.len() < entries.len() {
            let rest = &entries[out.len()..];
            let n = rest
                .iter()
                .take(GROUP_MAX)
                .take_while(|e| is_device(e))
                .count();
            if n > 1 {
                self.apply_group(&mut conn, &rest[..n], out)?;
                continue;
            }
            let entry = &rest[0];
            let (resp, membership) = self.apply_one(&mut conn, entry).map_err(Halt::from)?;
            self.feed.publish(entry.log_id.index);
            let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
            applied.0 = Some(entry.log_id);
            if let Some(m) = membership {
                applied.1 = m;
            }
            out.push(resp);
        }
        Ok(())
    }

    /// Device entries in one transaction, each in a savepoint (see [`Self::apply_entries`]).
    fn apply_group(
        &self,
        conn: &mut Connection,
        group: &[Entry],
        out: &mut Vec<CommandResponse>,
    ) -> Result<(), Halt> {
        self.feed.discard_staged();
        let mut tx = conn
            .transaction()
            .map_err(|e| Halt::from(Failed::from(e)))?;
        let mut done = Vec::with_capacity(group.len());
        let mut failed = None;
        for entry in group {
            let applied = tx.savepoint().map_err(Failed::from).and_then(|mut sp| {
                sp.set_drop_behavior(rusqlite::DropBehavior::Rollback);
                let resp = self.apply_payload(&sp, entry)?;
                put_raft(&sp, "last_applied", &json(&Some(entry.log_id))?)?;
                sp.commit()?;
                Ok(resp)
            });
            match applied {
                Ok(resp) => {
                    self.feed.seal(entry.log_id.index);
                    done.push((entry.log_id, resp));
                }
                Err(e) => {
                    self.feed.discard_unsealed();
                    failed = Some(e);
                    break;
                }
            }
        }
        if !done.is_empty() {
            if let Err(e) = tx.commit() {
                self.feed.discard_staged();
                return Err(Halt::from(Failed::from(e)));
            }
            self.feed.publish_sealed();
            let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
            for (log_id, resp) in done {
                applied.0 = Some(log_id);
                out.push(resp);
            }
        }
        match failed {
            Some(e) => Err(Halt::from(e)),
            None => Ok(()),
        }
    }

    /// One entry in one transaction, with its log id (and membership): the response, and the
    /// new membership if it is a membership entry.
    fn apply_one(
        &self,
        conn: &mut Connection,
        entry: &Entry,
    ) -> Result<(CommandResponse, Option<StoredMembership>), Failed> {
        self.feed.discard_staged();
        let tx = conn.transaction()?;
        let mut membership = None;
        let resp = match &entry.payload {
            EntryPayload::Blank | EntryPayload::Normal(_) => self.apply_payload(&tx, entry)?,
            EntryPayload::Membership(m) => {
                let sm = StoredMembership::new(Some(entry.log_id), m.clone());
                put_raft(&tx, "membership", &json(&sm)?)?;
                membership = Some(sm);
                CommandResponse::Empty
            }
        };
        put_raft(&tx, "last_applied", &json(&Some(entry.log_id))?)?;
        tx.commit()?;
        Ok((resp, membership))
    }
}

impl Inner {
    /// A blank or normal entry's effect inside the caller's transaction (not its log id).
    fn apply_payload(&self, conn: &Connection, entry: &Entry) -> Result<CommandResponse, Failed> {
        let EntryPayload::Normal(cmd) = &entry.payload else {
            return Ok(CommandResponse::Empty);
        };
        if let Some(v) = cmd.needs_newer_binary() {
            return Err(Failed::Blocked(command::version::too_new(v)));
        }
        if let Some(stamp) = cmd.entry_stamp_ms() {
            write_stamp(conn, stamp)?;
            self.metrics.stamp_floor.fetch_max(stamp, Ordering::Relaxed);
        }
        let ctx = ApplyContext {
            index: entry.log_id.index,
            metrics: &self.metrics,
            feed: &self.feed,
        };
        Ok(command::apply(conn, &ctx, cmd)?)
    }
}

/// Consecutive device entries applied in one transaction at most (`Inner::apply_entries`).
const GROUP_MAX: usize = 64;

/// A device entry (either kind): applied in a group with its neighbours.
fn is_device(e: &Entry) -> bool {
    matches!(&e.payload, EntryPayload::Normal(c) if c.device_batches().is_some())
}

/// A failed try at applying one entry.
enum Failed {
    Sqlite(rusqlite::Error),
    Io(std::io::Error),
    /// An entry of a newer format version: this binary cannot apply it.
    Blocked(String),
}

impl From<rusqlite::Error> for Failed {
    fn from(e: rusqlite::Error) -> Self {
        Failed::Sqlite(e)
    }
}

/// Why applying stopped before the end of a batch.
enum Halt {
    /// An environment failure to wait out (`db::failure`): the entry was rolled back and is
    /// tried again; openraft is not told.
    Held(rusqlite::Error),
    /// The node stops (openraft gets the error).
    Fatal(std::io::Error),
    /// An entry this binary cannot apply (a newer format version): the entry was rolled
    /// back; apply waits here, never skips it and never exits (no crash loop), and goes on
    /// with the same entry once a newer binary runs.
    Blocked(String),
}

impl From<Failed> for Halt {
    fn from(f: Failed) -> Self {
        match f {
            Failed::Io(e) => Halt::Fatal(e),
            Failed::Blocked(why) => Halt::Blocked(why),
            Failed::Sqlite(e) => match failure::classify(&e) {
                Failure::Hold => Halt::Held(e),
                Failure::Exit => super::exit_on_io_error("apply", &e),
                Failure::Corrupt => Halt::Fatal(super::corrupt("apply", &e)),
                Failure::Other => Halt::Fatal(io_err(e)),
            },
        }
    }
}

/// The last applied entry's stamp (`Command::Stamped`), kept in `_cairn_raft` so a node whose
/// log is empty (after a snapshot, after a restore) still never stamps below it.
fn write_stamp(conn: &Connection, stamp: i64) -> rusqlite::Result<()> {
    put_raft(conn, "stamp", stamp.to_string().as_bytes())
}

/// Sets `key` in `_cairn_raft`. Every entry writes one or two keys: the statement is cached
/// (parsing it again per entry cost more than the write).
fn put_raft(conn: &Connection, key: &str, value: &[u8]) -> rusqlite::Result<()> {
    // The statement's text is built once, not per entry.
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "INSERT OR REPLACE INTO {}(key, value) VALUES(?1, ?2)",
            tables::RAFT
        )
    });
    conn.prepare_cached(&SQL)?
        .execute(rusqlite::params![key, value])
        .map(drop)
}

/// The stamp of the last stamped entry a database holds, if any.
pub fn read_stamp(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    let v: Option<Vec<u8>> = conn
        .query_row(
            &format!("SELECT value FROM {} WHERE key = 'stamp'", tables::RAFT),
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(v.and_then(|b| String::from_utf8_lossy(&b).parse().ok()))
}

/// Raises this node's stamp floor to what the database holds.
fn note_stamp(conn: &Connection, metrics: &Metrics) -> std::io::Result<()> {
    if let Some(s) = read_stamp(conn).map_err(io_err)? {
        metrics.stamp_floor.fetch_max(s, Ordering::Relaxed);
    }
    Ok(())
}

/// A value stored as JSON in `_cairn_raft`.
fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, Failed> {
    serde_json::to_vec(v).map_err(|e| Failed::Io(io_err(e)))
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
        // Leftovers of an interrupted transfer or install are never needed.
        for e in std::fs::read_dir(&snap_dir)? {
            let _ = std::fs::remove_file(e?.path());
        }
        db::check_raw_pages()?;
        let store = Store::open(&dir.join("db.sqlite"))?;
        // openraft takes what it finds here as a durable snapshot (see the module doc); on a
        // full disk the start waits for space, an I/O error exits.
        let mut waited = false;
        while let Err(e) = db::make_durable(&store.writer()) {
            match failure::classify(&e) {
                Failure::Hold => {
                    if !waited {
                        tracing::error!(
                            "start held: making the database durable: {}; retrying every second",
                            failure::describe(&e)
                        );
                        waited = true;
                    }
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
                Failure::Exit => super::exit_on_io_error("start", &e),
                Failure::Corrupt => return Err(super::corrupt("start", &e).into()),
                Failure::Other => return Err(e.into()),
            }
        }
        let applied = read_applied(&store.writer())?;
        note_stamp(&store.writer(), &metrics)?;
        metrics
            .versions
            .set_active(command::version::read_active(&store.writer())?);
        Ok(StateMachine {
            inner: Arc::new(Inner {
                store: Arc::new(store),
                snap_dir,
                applied: Mutex::new(applied),
                metrics,
                feed,
            }),
        })
    }

    /// The live database, for readers outside openraft.
    pub fn store(&self) -> Arc<Store> {
        self.inner.store.clone()
    }

    /// Applies `entries` in order (a restore replaying a backup's segments): the same apply
    /// path as openraft's (device entries grouped the same way). Entries at or below the applied index
    /// are skipped.
    pub fn apply_restored(&self, entries: &[Entry]) -> std::io::Result<()> {
        let applied = self.inner.applied().0.map_or(0, |l| l.index);
        let fresh: Vec<Entry> = entries
            .iter()
            .filter(|e| e.log_id.index > applied)
            .cloned()
            .collect();
        let mut out = Vec::new();
        match self.inner.apply_entries(&fresh, &mut out) {
            Ok(()) => Ok(()),
            Err(Halt::Held(e)) => Err(io_err(failure::describe(&e))),
            Err(Halt::Fatal(e)) => Err(e),
            Err(Halt::Blocked(why)) => Err(io_err(why)),
        }
    }

    /// The last applied log id.
    pub fn applied_log_id(&self) -> Option<LogId> {
        self.inner.applied().0
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
        EntryPayload::Normal(c) => c
            .device_batches()
            .is_some_and(|b| b.len() <= 4 && b.iter().map(|b| b.body.len()).sum::<usize>() <= 4096),
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
        // The durable commit and checkpoint write: on a full disk the build waits for space
        // like apply does (openraft takes any storage error as fatal), an I/O error exits.
        let (meta, pages) = loop {
            let inner = self.inner.clone();
            let built = tokio::task::spawn_blocking(move || inner.build_snapshot())
                .await
                .map_err(io_err)?;
            let e = match built {
                Ok(b) => break b,
                Err(e) => e,
            };
            match failure::classify(&e) {
                Failure::Hold => {
                    let stall = &self.inner.metrics.apply_stall;
                    tokio::time::sleep(stall.hold("snapshot", &failure::describe(&e))).await;
                }
                Failure::Exit => super::exit_on_io_error("snapshot", &e),
                Failure::Corrupt => return Err(super::corrupt("snapshot", &e)),
                Failure::Other => return Err(io_err(e)),
            }
        };
        self.inner.metrics.apply_stall.clear("snapshot");
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
        let mut inline = entries.iter().all(is_small) && entries.len() <= 4;
        let mut entries = entries;
        let mut responses = Vec::with_capacity(entries.len());
        loop {
            let r = if inline {
                inner.apply_entries(&entries, &mut responses)
            } else {
                let applying = inner.clone();
                let (e, o, r) = tokio::task::spawn_blocking(move || {
                    let r = applying.apply_entries(&entries, &mut responses);
                    (entries, responses, r)
                })
                .await
                .map_err(io_err)?;
                (entries, responses) = (e, o);
                r
            };
            match r {
                Ok(()) => break,
                // Disk full and the like: wait it out and apply the same entry again; the
                // node reports the stall meanwhile.
                Err(Halt::Held(e)) => {
                    let wait = inner
                        .metrics
                        .apply_stall
                        .hold("apply", &failure::describe(&e));
                    tokio::time::sleep(wait).await;
                    inline = false;
                }
                Err(Halt::Fatal(e)) => return Err(e),
                // Never skipped, never an exit: the node reports it and waits for its upgrade.
                Err(Halt::Blocked(why)) => {
                    inner.metrics.versions.block(why);
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    inline = false;
                }
            }
        }
        inner.metrics.versions.unblock();
        inner.metrics.apply_stall.clear("apply");
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
        self.inner
            .feed
            .snapshot_installed(meta.last_log_id.map_or(0, |l| l.index));
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

//! The service layer: what one node can do for a client, whichever edge the client came in
//! by (the HTTP API, the device port). Every edge speaks to [`Cluster`] and nothing below it,
//! as rqlite's HTTP service speaks to its one `Store` interface.
//!
//! - leadership: [`Cluster::leader`] (the one lookup), [`Cluster::is_leader`],
//!   [`Cluster::confirm_leadership`];
//! - writes: [`Cluster::write`] and [`Cluster::propose`], through the one proposer
//!   (`raft::proposer`); [`Cluster::execute`] adds the deterministic rewrite for SQL;
//! - reads at each consistency level: [`Cluster::query`], [`Cluster::read`];
//! - membership ([`membership`]): join, remove, hand over leadership;
//! - the one client that reaches the leader ([`client`]);
//! - stream definitions and dead-letter replays ([`streams`]).
//! - the one client that reaches the leader ([`client`]), and SQL that goes there from
//!   anywhere ([`forward`], for the embedding API);
//! - the feed of committed device records: [`Cluster::subscribe`].
//!
//! A call that needs the leader and is made on a follower answers [`Error::NotLeader`];
//! the edge decides whether to forward (the HTTP API) or to tell the device.

pub mod bootstrap;
pub mod client;
pub mod dump;
pub mod forward;
pub mod membership;
pub mod names;
pub mod queue;
pub mod reap;
pub mod streams;
pub mod version;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;

use crate::command::feed::{Feed, Subscription};
use crate::command::sql::SqlCommand;
use crate::command::{Command, CommandResponse, rewrite};
use crate::db::Store;
use crate::db::sandbox::{CancelOnDrop, ReadLimits};
use crate::db::sql::{Statement, StatementResult};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::raft::log_store::LogStats;
use crate::raft::network::HttpClient;
use crate::raft::proposer::{Proposal, Proposer};
use crate::raft::{NodeId, Peer, Raft};

/// How consistent a read must be (rqlite's `level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Level {
    /// This node's database, whatever it has applied.
    None,
    /// The leader's database (followers forward).
    Weak,
    /// The leader's database after a ReadIndex round confirmed its leadership.
    Linearizable,
    /// Through the Raft log, like a write.
    Strong,
}

impl std::str::FromStr for Level {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "none" => Ok(Level::None),
            "weak" | "" => Ok(Level::Weak),
            "linearizable" => Ok(Level::Linearizable),
            "strong" => Ok(Level::Strong),
            other => Err(Error::BadRequest(format!(
                "unknown level {other:?}: use none, weak, linearizable or strong"
            ))),
        }
    }
}

/// `statements` as a write would put them in the log now, after the deterministic rewrite
/// (rqlite's `/db/sql`; the write queue's check before it accepts a request).
pub fn rewritten(statements: Vec<Statement>) -> Result<Vec<Statement>, Error> {
    let mut cmd = SqlCommand {
        statements,
        transaction: false,
    };
    rewrite::prepare_write(&mut cmd, &rewrite::Stamp::now())?;
    Ok(cmd.statements)
}

/// One node's view of the cluster and the operations every edge uses. Cheap to share
/// (`Arc<Cluster>`).
pub struct Cluster {
    id: NodeId,
    /// This node's advertised addresses.
    peer: Peer,
    raft: Raft,
    store: Arc<Store>,
    proposer: Proposer,
    client: HttpClient,
    metrics: Arc<Metrics>,
    log_stats: Arc<LogStats>,
    /// Where backups and loads may put scratch files (the data directory).
    scratch_dir: PathBuf,
    /// Limits of one local read (this node's settings).
    read_limits: ReadLimits,
    /// Largest database a load may bring (`max_db_size_mib`).
    max_db_bytes: u64,
    feed: Arc<Feed>,
    started: Instant,
    /// This node's configured stream definitions (set by the composition root).
    streams: streams::StreamsConfig,
    /// rqlite's queued writes (`?queue`), started on first use.
    queue: OnceLock<queue::WriteQueue>,
    queue_settings: queue::Settings,
    incarnations: Arc<crate::raft::incarnation::Incarnations>,
    /// Founding nodes that notified this one (`--bootstrap-expect`).
    notified: bootstrap::Notified,
    /// The term this node leads in and since when (reaping's stand-in for never-reached members).
    reap_since:
        std::sync::Mutex<Option<(u64, openraft::alias::InstantOf<crate::raft::TypeConfig>)>>,
}

/// The parts a [`Cluster`] is made of (the composition root builds them).
pub struct Parts {
    pub id: NodeId,
    pub peer: Peer,
    pub raft: Raft,
    pub store: Arc<Store>,
    pub proposer: Proposer,
    pub client: HttpClient,
    pub metrics: Arc<Metrics>,
    pub log_stats: Arc<LogStats>,
    pub scratch_dir: PathBuf,
    pub read_limits: ReadLimits,
    pub max_db_bytes: u64,
    /// The state machine's feed of stored device records.
    pub feed: Arc<Feed>,
    /// rqlite's queued writes: capacity, batch size, timeout, transaction.
    pub queue: queue::Settings,
    /// This node's incarnation and the members' (joins, `--replace`, leaving).
    pub incarnations: Arc<crate::raft::incarnation::Incarnations>,
}

impl Cluster {
    pub fn new(p: Parts) -> Arc<Self> {
        Arc::new(Cluster {
            id: p.id,
            peer: p.peer,
            raft: p.raft,
            store: p.store,
            proposer: p.proposer,
            client: p.client,
            metrics: p.metrics,
            log_stats: p.log_stats,
            scratch_dir: p.scratch_dir,
            read_limits: p.read_limits,
            max_db_bytes: p.max_db_bytes,
            feed: p.feed,
            started: Instant::now(),
            streams: Default::default(),
            queue: OnceLock::new(),
            queue_settings: p.queue,
            incarnations: p.incarnations,
            notified: Default::default(),
            reap_since: Default::default(),
        })
    }

    /// This node's queue of rqlite's queued writes (started on first use).
    pub fn write_queue(self: &Arc<Self>) -> &queue::WriteQueue {
        self.queue
            .get_or_init(|| queue::WriteQueue::start(Arc::downgrade(self), self.queue_settings))
    }

    /// The queue, if any request used it yet.
    pub fn write_queue_started(&self) -> Option<&queue::WriteQueue> {
        self.queue.get()
    }

    /// The queue's settings.
    pub fn write_queue_settings(&self) -> &queue::Settings {
        &self.queue_settings
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// This node's advertised addresses.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// The Raft handle, for status pages and the RPC server.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The live database (for local reads that need no leader).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// This node's counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The Raft log's counters.
    pub fn log_stats(&self) -> &LogStats {
        &self.log_stats
    }

    /// The pooled HTTP client (node-to-node).
    pub fn http(&self) -> &HttpClient {
        &self.client
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// When this node started, as RFC 3339 UTC.
    pub fn started_at(&self) -> String {
        let started = std::time::SystemTime::now() - self.uptime();
        let ms = started
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        crate::db::schema::utc_text(ms)
    }

    /// rqlite's `/readyz?sync`: waits up to `wait` until this node has applied what the
    /// leader had committed (as the leader last told it; the leader's own commit index on the
    /// leader). False on timeout.
    pub async fn wait_synced(&self, wait: Duration) -> bool {
        let m = self.raft_metrics();
        let target = if self.is_leader() {
            m.local_committed.map(|l| l.index).unwrap_or(0)
        } else {
            self.metrics.leader_contact.leader_commit()
        };
        let deadline = Instant::now() + wait;
        loop {
            let applied = self
                .raft_metrics()
                .last_applied
                .map(|l| l.index)
                .unwrap_or(0);
            if applied >= target {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn scratch_dir(&self) -> &std::path::Path {
        &self.scratch_dir
    }

    /// A subscription to the device records this replica stores from now on, each once, as
    /// their entries commit (see [`crate::command::feed`]).
    pub fn subscribe(&self) -> Subscription {
        self.feed.subscribe()
    }

    /// Whose device keys this replica changed as it commits them (`None`: anyone's, after a
    /// snapshot or a restored backup); open device sessions recheck their key then.
    pub fn registry_changes(&self) -> tokio::sync::broadcast::Receiver<Option<u64>> {
        self.feed.registry_changes()
    }

    /// Openraft's view of this node (state, term, indexes, membership), naming a leader only
    /// once one was elected ([`elected_leader`]).
    pub fn raft_metrics(&self) -> openraft::RaftMetrics<crate::raft::TypeConfig> {
        let mut m = self.raft.metrics().borrow_watched().clone();
        m.current_leader = elected_leader(&m);
        m
    }

    // -----------------------------------------------------------------------------------------
    // Leadership
    // -----------------------------------------------------------------------------------------

    /// The leader as this node currently believes, with its addresses: the one leader lookup.
    pub fn leader(&self) -> Option<(NodeId, Peer)> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let id = elected_leader(&m)?;
        let peer = m.membership_config.membership().get_node(&id)?.clone();
        Some((id, peer))
    }

    /// True when this node leads (as far as it knows).
    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        m.state == ServerState::Leader && m.current_leader == Some(self.id)
    }

    /// Waits up to `timeout` for some node to be leader.
    pub async fn wait_leader(&self, timeout: Duration) -> Option<(NodeId, Peer)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader() {
                return Some(l);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// [`Error::NotLeader`] unless this node leads.
    fn require_leader(&self) -> Result<(), Error> {
        if self.is_leader() {
            Ok(())
        } else {
            Err(Error::NotLeader(self.leader().map(|(id, _)| id)))
        }
    }

    /// Confirms with a quorum that this node still leads and waits until the read index is
    /// applied (ReadIndex); reads after it are linearizable.
    pub async fn confirm_leadership(&self) -> Result<(), Error> {
        self.require_leader()?;
        crate::raft::confirm_leadership(&self.raft).await
    }

    /// Storage work this node holds because of its environment (a full disk, ...): the Raft
    /// log writer's and apply's failures, if any. The node is not ready while it holds any.
    pub fn storage_held(&self) -> Vec<(&'static str, String)> {
        let log = self.log_stats.stall.held().map(|e| ("raft log write", e));
        let apply = self.metrics.apply_stall.held().map(|e| ("apply", e));
        let version = self
            .metrics
            .versions
            .blocked()
            .map(|e| ("format version", e));
        log.into_iter().chain(apply).chain(version).collect()
    }

    /// True while Raft runs (false once it stopped on a fatal error or shut down).
    pub fn running(&self) -> bool {
        self.raft.metrics().borrow_watched().running_state.is_ok()
    }

    // -----------------------------------------------------------------------------------------
    // Writes
    // -----------------------------------------------------------------------------------------

    /// Queues `cmd` for the log on the leader; its place in the log is fixed on return.
    pub async fn propose(&self, cmd: Command) -> Result<Proposal, Error> {
        self.require_leader()?;
        // A leader that cannot write its log or apply (a full disk) could not answer: the
        // client hears it at once and goes elsewhere (leadership moves, see membership.rs).
        if let Some((what, e)) = self.storage_held().first() {
            return Err(Error::Unavailable(format!(
                "this node's storage is held ({what}: {e}); retry shortly"
            )));
        }
        // The disk guard refuses new data, never what frees space (retention, cursors).
        if let Some(e) = self.metrics.disk_guard.held() {
            match cmd.unstamped() {
                Command::DeviceBatches(_) | Command::SessionBatches { .. } => {
                    return Err(Error::Overloaded);
                }
                Command::Sql(_) | Command::SqlAt { .. } | Command::LoadChunk(_) => {
                    return Err(Error::Unavailable(format!(
                        "disk guard: {e}; writes refused"
                    )));
                }
                _ => {}
            }
        }
        self.allowed_by_version(&cmd)?;
        self.proposer.propose(cmd).await
    }

    /// Proposes `cmd` on the leader and waits until it is applied.
    pub async fn write(&self, cmd: Command) -> Result<CommandResponse, Error> {
        self.propose(cmd).await?.applied().await
    }

    /// Runs SQL statements through the log as one command, after making them deterministic
    /// when `rewrite` (writes; not for strong reads or loads, which hold no such SQL).
    pub async fn execute(
        &self,
        statements: Vec<Statement>,
        transaction: bool,
        rewrite: bool,
    ) -> Result<Vec<StatementResult>, Error> {
        let mut cmd = SqlCommand {
            statements,
            transaction,
        };
        let stamp = rewrite::Stamp::now();
        if rewrite {
            rewrite::prepare_write(&mut cmd, &stamp)?;
        }
        let cmd = Command::SqlAt {
            stamp_ms: stamp.unix_ms(),
            sql: cmd,
        };
        match self.write(cmd).await? {
            CommandResponse::Sql(results) => Ok(results),
            other => Err(Error::Storage(format!("unexpected response {other:?}"))),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Reads
    // -----------------------------------------------------------------------------------------

    /// Runs `f` on a read-only connection to this node's database, off the async workers.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> T + Send + 'static,
    ) -> Result<T, Error> {
        let store = self.store.clone();
        Ok(tokio::task::spawn_blocking(move || store.read(f)).await??)
    }

    /// Read-only SQL at `level`. Levels other than `none` need the leader.
    pub async fn query(
        &self,
        statements: Vec<Statement>,
        level: Level,
        transaction: bool,
    ) -> Result<Vec<StatementResult>, Error> {
        self.query_within(statements, level, transaction, None)
            .await
    }

    /// rqlite's `freshness` for a `none` read on this node: the leader must have been heard
    /// from within `freshness`, and with `strict` this node must also have applied what the
    /// leader had committed when it was last heard from. A leader is always fresh.
    pub fn check_freshness(&self, freshness: Duration, strict: bool) -> Result<(), Error> {
        if self.is_leader() {
            return Ok(());
        }
        let contact = &self.metrics.leader_contact;
        let stale = || Error::Unavailable("stale read".into());
        match contact.since() {
            Some(ago) if ago <= freshness => {}
            _ => return Err(stale()),
        }
        if strict {
            let applied = self
                .raft_metrics()
                .last_applied
                .map(|l| l.index)
                .unwrap_or(0);
            if applied < contact.leader_commit() {
                return Err(stale());
            }
        }
        Ok(())
    }

    /// [`Cluster::query`] with the read interrupted after `timeout` when that is shorter than
    /// this node's `read_timeout` (rqlite's `db_timeout`).
    pub async fn query_within(
        &self,
        statements: Vec<Statement>,
        level: Level,
        transaction: bool,
        timeout: Option<Duration>,
    ) -> Result<Vec<StatementResult>, Error> {
        match level {
            Level::None => {}
            Level::Weak => self.require_leader()?,
            Level::Linearizable => self.confirm_leadership().await?,
            Level::Strong => {
                self.require_leader()?;
                if !self.all_read_only(&statements).await {
                    return Err(Error::BadRequest(
                        "attempt to change database via query operation".into(),
                    ));
                }
                return self.execute(statements, transaction, false).await;
            }
        }
        let mut limits = self.read_limits.clone();
        if let Some(t) = timeout {
            limits.timeout = limits.timeout.min(t);
        }
        // Dropped with this future when the client goes away: the read stops at once.
        let cancel = CancelOnDrop::default();
        let flag = cancel.flag();
        let out = self
            .read(move |c| crate::db::sql::query(c, &statements, transaction, &limits, Some(flag)))
            .await;
        drop(cancel);
        out
    }

    /// True when SQLite says every statement is read-only. Statements that do not prepare (for
    /// example because an earlier statement creates their table) count as writes.
    pub async fn all_read_only(&self, statements: &[Statement]) -> bool {
        let sqls: Vec<String> = statements.iter().map(|s| s.sql.clone()).collect();
        self.read(move |c| crate::db::sql::all_read_only(c, &sqls))
            .await
            .unwrap_or(false)
    }

    /// A consistent copy of this node's database as an open, already unlinked file.
    pub async fn backup(&self) -> Result<std::fs::File, Error> {
        let store = self.store.clone();
        let tmp = self
            .scratch_dir
            .join(format!("backup-{}.db", rand::random::<u64>()));
        let f = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
            store.copy_to(&tmp)?;
            let f = std::fs::File::open(&tmp)?;
            // Unlinked but open: the stream reads it, nothing is left behind.
            std::fs::remove_file(&tmp)?;
            Ok(f)
        })
        .await??;
        Ok(f)
    }

    /// Largest load this node accepts (`max_db_size_mib`), in bytes.
    pub fn max_load_bytes(&self) -> u64 {
        self.max_db_bytes
    }

    /// Loads the SQLite file or SQL text in the file `upload` (which this call deletes): the
    /// user's tables are replaced, or, from a Cairn backup, data and Cairn's state together
    /// (see `db::load`). The file goes through the log in chunks of at most
    /// [`CHUNK_BYTES`](crate::command::load::CHUNK_BYTES) and takes effect at the last one.
    /// The leader only.
    /// `restore_state`: the caller may restore Cairn's own state (the `all` permission), which
    /// a Cairn backup carries (device registry and keys, high-waters); without it such a file
    /// is refused ([`Error::Forbidden`]) and a plain SQLite file or dump loads as usual.
    pub async fn load_file(
        &self,
        upload: PathBuf,
        restore_state: bool,
    ) -> Result<Vec<StatementResult>, Error> {
        let r = self.load_prepared(&upload, restore_state).await;
        let _ = std::fs::remove_file(&upload);
        r
    }

    async fn load_prepared(
        &self,
        upload: &std::path::Path,
        restore_state: bool,
    ) -> Result<Vec<StatementResult>, Error> {
        self.require_leader()?;
        let (dir, up, max) = (
            self.scratch_dir.clone(),
            upload.to_path_buf(),
            self.max_db_bytes,
        );
        let src = tokio::task::spawn_blocking(move || crate::db::load::prepare(&up, &dir, max))
            .await?
            .map_err(|e| Error::BadRequest(format!("load: {e}")))?;
        let r = if src.backup && !restore_state {
            Err(Error::Forbidden(
                "load: a Cairn backup restores the device registry and needs permission all".into(),
            ))
        } else {
            self.send_load(&src).await
        };
        // A dump answers with its own last statement's counters, as rqlite's does.
        let r = match (r, src.counters) {
            (Ok(results), Some((last_insert_id, rows_affected)))
                if results.iter().all(|r| r.error.is_none()) =>
            {
                Ok(vec![StatementResult {
                    last_insert_id,
                    rows_affected,
                    ..Default::default()
                }])
            }
            (r, _) => r,
        };
        if src.scratch {
            let _ = std::fs::remove_file(&src.path);
        }
        r
    }

    /// Proposes the prepared file chunk by chunk, each applied before the next is read.
    async fn send_load(
        &self,
        src: &crate::db::load::Source,
    ) -> Result<Vec<StatementResult>, Error> {
        use crate::command::load::{CHUNK_BYTES, LoadChunk, LoadEnd};
        use tokio::io::AsyncReadExt;
        if src.size > self.max_db_bytes {
            return Err(Error::BadRequest(format!(
                "load: the database would be {} bytes, over this node's max_db_size_mib ({} MiB)",
                src.size,
                self.max_db_bytes >> 20
            )));
        }
        let load_id = rand::random::<u64>();
        let mut file = tokio::fs::File::open(&src.path).await?;
        let mut offset = 0u64;
        loop {
            let mut data = vec![0u8; CHUNK_BYTES];
            let mut n = 0;
            while n < data.len() {
                let got = file.read(&mut data[n..]).await?;
                if got == 0 {
                    break;
                }
                n += got;
            }
            data.truncate(n);
            let last = offset + n as u64 >= src.size;
            let chunk = LoadChunk {
                load_id,
                offset,
                data,
                last: last.then_some(LoadEnd {
                    len: src.size,
                    restore_state: src.backup,
                }),
            };
            offset += n as u64;
            match self.write(Command::LoadChunk(chunk)).await? {
                CommandResponse::Sql(results) if last => return Ok(results),
                CommandResponse::Empty if !last => {}
                other => return Err(Error::Storage(format!("unexpected response {other:?}"))),
            }
        }
    }
}

/// The leader `m` names, if an election made it leader. openraft's `initialize` gives a
/// founding node a committed vote of term 0 for itself, so until the first election its
/// metrics name it leader: two nodes founding a cluster together would each name themselves
/// (and `/status`, `/leader` and forwarding would send clients to a node that cannot write).
/// Every real leader holds a term of at least 1.
pub fn elected_leader(m: &openraft::RaftMetrics<crate::raft::TypeConfig>) -> Option<NodeId> {
    m.current_leader.filter(|_| m.current_term > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_a_founder_names_no_leader_before_an_election() {
        // What openraft's metrics say right after `initialize`: a committed vote of term 0 for
        // this node, named as the current leader.
        let mut m = openraft::RaftMetrics::<crate::raft::TypeConfig>::new_initial(1);
        m.current_leader = Some(1);
        m.current_term = 0;
        assert_eq!(elected_leader(&m), None);
        m.current_term = 1;
        assert_eq!(elected_leader(&m), Some(1));
        m.current_leader = None;
        assert_eq!(elected_leader(&m), None);
    }
}

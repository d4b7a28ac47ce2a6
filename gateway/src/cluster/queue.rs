//! rqlite's queued writes (`/db/execute?queue`): a request is put on this node's bounded queue
//! and answered at once with a sequence number; one task takes what is queued, up to
//! `batch_size` statements or `timeout` after the first, and runs it as ONE SQL command
//! through the usual write path ([`Cluster::sql`]: here on the leader, else forwarded to it,
//! and there through the one proposer). Many clients' writes so become few Raft entries.
//!
//! - `?wait` answers once the batch holding the request has been committed and applied (or
//!   given up, see below), as rqlite's flush channel does; an empty request with `wait` waits
//!   for everything queued before it.
//! - Statements are checked by the deterministic rewrite when queued, so a statement that can
//!   never be proposed is refused to its client instead of failing a batch later.
//! - A batch the cluster cannot take (no leader, leadership moving, a dead node) is tried again
//!   every [`RETRY_DELAY`] until it goes through, as rqlite's queue does: a batch whose fate
//!   was unknown (the leader died after proposing it) may then be applied twice. A statement
//!   error inside a batch is a result like any other (logged and counted), not a retry.
//! - Sequence numbers are this node's (rqlite's are too): they start at the clock's
//!   nanoseconds when the queue starts and grow by one per request.
//! - Queued writes are acknowledged before they are durable; the queue dies with the process.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::Cluster;
use super::forward::SqlRequest;
use crate::db::sql::Statement;
use crate::error::Error;

/// How long a batch the cluster could not take waits before it is tried again (rqlite: 1 s).
pub const RETRY_DELAY: Duration = Duration::from_secs(1);

/// The queue's settings (rqlite's `-write-queue-*` flags).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Requests that may wait in the queue; a writer waits while it is full.
    pub capacity: usize,
    /// Statements per batch (one Raft entry).
    pub batch_size: usize,
    /// A batch is sent this long after its first request at the latest.
    pub timeout: Duration,
    /// Run each batch in one transaction (all or nothing) instead of statement by statement.
    pub transaction: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            capacity: 1024,
            batch_size: 128,
            timeout: Duration::from_millis(50),
            transaction: false,
        }
    }
}

/// The queue's counters, named as rqlite's `queued_executions*` expvars.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Requests queued.
    pub queued: AtomicU64,
    /// Requests that asked to `wait`.
    pub waited: AtomicU64,
    /// Batches that went through (`queued_executions_ok`).
    pub batches_ok: AtomicU64,
    /// Tries that failed and were repeated (`queued_executions_failed`).
    pub retries: AtomicU64,
    /// Batches given up because the cluster refused them for good.
    pub batches_refused: AtomicU64,
    /// Statements received and sent in batches.
    pub statements_rx: AtomicU64,
    pub statements_tx: AtomicU64,
    /// Statements that came back with an error result.
    pub statement_errors: AtomicU64,
    /// The sequence number of the last request written (0 before any).
    pub last_sequence: AtomicI64,
}

struct Queued {
    seq: i64,
    statements: Vec<Statement>,
    flushed: Option<oneshot::Sender<()>>,
}

/// A queued request: its sequence number and, with `wait`, what resolves once it is written.
pub struct Ticket {
    pub sequence_number: i64,
    flushed: Option<oneshot::Receiver<()>>,
}

impl Ticket {
    /// Waits until the request's batch is written, for at most `timeout`.
    pub async fn flushed(self, timeout: Duration) -> Result<(), Error> {
        let Some(rx) = self.flushed else {
            return Ok(());
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Error::Fatal("the write queue stopped".into())),
            Err(_) => Err(Error::Unavailable("timeout".into())),
        }
    }
}

/// The handle the HTTP API queues through (one per node, started with the node).
pub struct WriteQueue {
    tx: mpsc::Sender<Queued>,
    next_seq: AtomicI64,
    settings: Settings,
    stats: Arc<QueueStats>,
}

impl WriteQueue {
    /// Starts the draining task for `cluster` (held weakly: the queue ends with the node).
    pub fn start(cluster: Weak<Cluster>, settings: Settings) -> Self {
        let (tx, rx) = mpsc::channel(settings.capacity.max(1));
        let stats = Arc::new(QueueStats::default());
        tokio::spawn(drain(cluster, rx, settings, stats.clone()));
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(1);
        WriteQueue {
            tx,
            next_seq: AtomicI64::new(now_ns),
            settings,
            stats,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn stats(&self) -> &QueueStats {
        &self.stats
    }

    /// Queues `statements` (waiting while the queue is full) after checking that they can be
    /// proposed; `wait` asks for a ticket that resolves once they are written.
    pub async fn push(&self, statements: Vec<Statement>, wait: bool) -> Result<Ticket, Error> {
        if !statements.is_empty() {
            super::rewritten(statements.clone())?;
        }
        let (flushed, rx) = if wait {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let n = statements.len() as u64;
        let permit = self
            .tx
            .reserve()
            .await
            .map_err(|_| Error::Fatal("the write queue stopped".into()))?;
        // Taken under the permit, so sequence numbers enter the queue in order.
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        permit.send(Queued {
            seq,
            statements,
            flushed,
        });
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        self.stats.statements_rx.fetch_add(n, Ordering::Relaxed);
        if wait {
            self.stats.waited.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Ticket {
            sequence_number: seq,
            flushed: rx,
        })
    }
}

async fn drain(
    cluster: Weak<Cluster>,
    mut rx: mpsc::Receiver<Queued>,
    settings: Settings,
    stats: Arc<QueueStats>,
) {
    let batch_size = settings.batch_size.max(1);
    while let Some(first) = rx.recv().await {
        let deadline = tokio::time::Instant::now() + settings.timeout;
        let mut count = first.statements.len();
        let mut batch = vec![first];
        while count < batch_size {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(q)) => {
                    count += q.statements.len();
                    batch.push(q);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let statements: Vec<Statement> = batch
            .iter_mut()
            .flat_map(|q| std::mem::take(&mut q.statements))
            .collect();
        if !statements.is_empty() && !write(&cluster, statements, &settings, &stats).await {
            return; // the node is gone
        }
        if let Some(last) = batch.last() {
            stats.last_sequence.store(last.seq, Ordering::Relaxed);
        }
        for q in batch {
            if let Some(done) = q.flushed {
                let _ = done.send(());
            }
        }
    }
}

/// Writes one batch, trying again until the cluster takes it. False when the node is gone.
async fn write(
    cluster: &Weak<Cluster>,
    statements: Vec<Statement>,
    settings: &Settings,
    stats: &QueueStats,
) -> bool {
    let n = statements.len() as u64;
    loop {
        let Some(c) = cluster.upgrade() else {
            return false;
        };
        let req = SqlRequest::Execute {
            statements: statements.clone(),
            transaction: settings.transaction,
        };
        match c.sql(req).await {
            Ok(results) => {
                let failed = results.iter().filter(|r| r.error.is_some()).count() as u64;
                if failed > 0 {
                    tracing::warn!(failed, "queued write: statements failed");
                    stats.statement_errors.fetch_add(failed, Ordering::Relaxed);
                }
                stats.statements_tx.fetch_add(n, Ordering::Relaxed);
                stats.batches_ok.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            Err(e @ (Error::BadRequest(_) | Error::Forbidden(_) | Error::NotFound(_))) => {
                tracing::warn!("queued write refused: {e}");
                stats.batches_refused.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            Err(e) => {
                tracing::warn!("queued write not taken, retrying in {RETRY_DELAY:?}: {e}");
                stats.retries.fetch_add(1, Ordering::Relaxed);
            }
        }
        drop(c);
        tokio::time::sleep(RETRY_DELAY).await;
    }
}

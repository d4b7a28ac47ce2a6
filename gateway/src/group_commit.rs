//! Group commit: a bounded queue in front of Raft that coalesces concurrent writes.
//!
//! Writers put their command on the queue and wait. One task drains everything queued (up to
//! `write_batch_max`) and hands it to openraft in one `client_write_many` call, which appends
//! the whole batch with one log write, hence one fsync on every replica, and replicates it in
//! one AppendEntries round. It does not wait for that batch to commit before taking the next,
//! so batches pipeline; under load each batch is whatever arrived during the previous fsync.
//! Each command stays its own entry, so every request keeps its own transaction and result.
//!
//! A full queue makes `submit` wait: back-pressure instead of unbounded memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::StreamExt;
use openraft::errors::ClientWriteError;
use tokio::sync::{mpsc, oneshot};

use crate::command::{Command, CommandResponse};
use crate::raft_types::{NodeId, Raft};

/// Why a write was not applied.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// This node is not the leader (the leader's id, if known); nothing was proposed.
    #[error("not the leader")]
    NotLeader(Option<NodeId>),
    /// Raft stopped or storage failed.
    #[error("raft failure: {0}")]
    Fatal(String),
    /// Any other refusal.
    #[error("{0}")]
    Other(String),
}

struct Pending {
    cmd: Command,
    done: oneshot::Sender<Result<CommandResponse, WriteError>>,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct GroupCommitStats {
    pub commands: AtomicU64,
    pub batches: AtomicU64,
}

/// Handle to the queue; cheap to clone.
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<Pending>,
    pub stats: Arc<GroupCommitStats>,
}

impl GroupCommit {
    /// Starts the draining task.
    pub fn start(raft: Raft, depth: usize, max_batch: usize) -> Self {
        let (tx, rx) = mpsc::channel(depth);
        let stats = Arc::new(GroupCommitStats::default());
        tokio::spawn(drain(raft, rx, max_batch, stats.clone()));
        GroupCommit { tx, stats }
    }

    /// Proposes `cmd` and waits until it is committed and applied (or refused).
    pub async fn submit(&self, cmd: Command) -> Result<CommandResponse, WriteError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Pending { cmd, done })
            .await
            .map_err(|_| WriteError::Fatal("write queue closed".into()))?;
        rx.await
            .map_err(|_| WriteError::Fatal("write dropped by a stopping node".into()))?
    }
}

async fn drain(
    raft: Raft,
    mut rx: mpsc::Receiver<Pending>,
    max_batch: usize,
    stats: Arc<GroupCommitStats>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats
            .commands
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let (cmds, waiters): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.cmd, p.done)).unzip();
        match raft.client_write_many(cmds).await {
            Ok(mut results) => {
                // Answer this batch on its own task so the next batch can be proposed now.
                tokio::spawn(async move {
                    for done in waiters {
                        let r = match results.next().await {
                            Some(Ok(Ok(resp))) => Ok(resp.response),
                            Some(Ok(Err(e))) => Err(map_err(e)),
                            Some(Err(fatal)) => Err(WriteError::Fatal(fatal.to_string())),
                            None => Err(WriteError::Fatal("no result for write".into())),
                        };
                        let _ = done.send(r);
                    }
                });
            }
            Err(fatal) => {
                for done in waiters {
                    let _ = done.send(Err(WriteError::Fatal(fatal.to_string())));
                }
            }
        }
    }
}

fn map_err(e: ClientWriteError<crate::raft_types::TypeConfig>) -> WriteError {
    match e {
        ClientWriteError::ForwardToLeader(f) => WriteError::NotLeader(f.leader_id),
        // Not retried for the client: the entry may have committed.
        ClientWriteError::LogEntryDiscarded(_) => WriteError::Other(
            "leader changed while the write was in flight; it may or may not have been applied"
                .into(),
        ),
        other => WriteError::Other(other.to_string()),
    }
}
